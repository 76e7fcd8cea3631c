"""vilseg's ViL and converter against the real public ViL v2 (NX-AI/vision-lstm ``VisionLSTM2``).

``tests/data/vil_public_tiny.pt`` holds a tiny public model's ``state_dict()`` in the public key layout, an input
batch and the features the public code computed from it (after its final norm, before pooling and head); see
``tests/data/make_vil_public_reference.py`` for how it was made and from which public commit. Unlike the round trip
in ``test_vil_backbone.py``, nothing here goes through vilseg's own inverse: a mapping mistake cannot cancel.

Tolerance: fp32, atol = rtol = 1e-4 (features are O(1); the public code evaluates the mLSTM in its parallel form,
vilseg's kernels differ from it only by fp32 rounding; measured max |difference| about 2e-6 for every kernel).
"""
import re
from pathlib import Path

import pytest
import torch

from vilseg.models.backbones.vil import ViL
from vilseg.models.backbones.vil_convert import convert_official_vil, is_official_vil

FIXTURE = Path(__file__).parent / "data" / "vil_public_tiny.pt"
ATOL = RTOL = 1e-4
# a negative control must move the features by far more than the tolerance
CONTROL_MIN_DIFF = 0.5


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def build(ref, img_size=None, **kw):
    """vilseg's ViL with the fixture's settings (img_size: the fixture's input size unless given)."""
    kwargs = ref["kwargs"]
    num_blocks = 2 * kwargs["depth"]  # VisionLSTM2 counts block pairs, vilseg counts sub-blocks
    return ViL(arch=dict(embed_dims=kwargs["dim"], num_blocks=num_blocks),
               img_size=img_size or kwargs["input_shape"][1:],
               patch_size=kwargs["patch_size"], in_channels=kwargs["input_shape"][0], out_indices=(num_blocks - 1,),
               final_norm=True, conv_kernel_size=kwargs["conv_kernel_size"], norm_bias=kwargs["norm_bias"],
               proj_bias=kwargs["proj_bias"], **kw).eval()


def features(model, ref):
    with torch.no_grad():
        (out,) = model(ref["input"])
    return out


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_fixture_is_the_public_layout(ref):
    sd = ref["state_dict"]
    assert is_official_vil(sd)
    assert ref["public_repo"] == "NX-AI/vision-lstm" and re.fullmatch(r"[0-9a-f]{40}", ref["public_commit"])
    assert "blocks.1.rowwise_from_bot_right.layer.conv.weight" in sd and "head.weight" in sd
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert ref["features"].shape == (2, ref["kwargs"]["dim"], 4, 5)


@pytest.mark.parametrize("kernel,chunk_size", [("parallel", 64), ("auto", 64), ("chunkwise", 8), ("chunkwise", 7),
                                               ("recurrent", 64)])
def test_converted_public_weights_reproduce_public_features(ref, kernel, chunk_size):
    # chunk sizes 8 and 7 split the 20 tokens into several chunks, 7 with a ragged last one
    model = build(ref, kernel=kernel, chunk_size=chunk_size)
    model.load_state_dict(convert_official_vil(ref["state_dict"]), strict=True)
    out = features(model, ref)
    assert out.shape == ref["features"].shape
    torch.testing.assert_close(out, ref["features"], atol=ATOL, rtol=RTOL)


def _without_plus_one(sd):
    # the LayerNorms whose weight the public code stores as a residual (effective weight = 1 + stored)
    return {k: (v - 1.0 if re.search(r"(^|\.)(norm|outnorm)\.weight$", k) else v) for k, v in sd.items()}


def _swap_directions(sd, pair=0):
    a, b = f"blocks.{pair}.rowwise_from_top_left.", f"blocks.{pair}.rowwise_from_bot_right."
    out = {}
    for k, v in sd.items():
        k = b + k[len(a):] if k.startswith(a) else a + k[len(b):] if k.startswith(b) else k
        out[k] = v
    return out


def _transpose_qkv_blocks(sd):
    # the block-diagonal q/k/v weights are (blocks, out, in); reading them as (blocks, in, out) is a plausible bug
    return {k: (v.transpose(-1, -2).contiguous() if re.search(r"\.[qkv]_proj\.weight$", k) else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("control", ["no_plus_one_on_residual_norms", "swap_directions_of_pair_0",
                                     "transposed_qkv_blocks"])
def test_negative_controls_fail_clearly(ref, control):
    """The comparison can fail: plausible conversion mistakes give features far outside the tolerance."""
    converted = convert_official_vil(ref["state_dict"])
    wrong = {"no_plus_one_on_residual_norms": _without_plus_one, "swap_directions_of_pair_0": _swap_directions,
             "transposed_qkv_blocks": _transpose_qkv_blocks}[control](converted)
    model = build(ref, kernel="parallel")
    model.load_state_dict(wrong, strict=True)  # the same keys and shapes: only the values are wrong
    assert max_diff(features(model, ref), ref["features"]) > CONTROL_MIN_DIFF
    model.load_state_dict(converted, strict=True)  # and the right mapping in the same model passes
    assert max_diff(features(model, ref), ref["features"]) < ATOL + RTOL * ref["features"].abs().max().item()


def test_public_checkpoint_through_init_cfg_pretrained(ref, tmp_path):
    ckpt = tmp_path / "vil_public_tiny.pth"
    torch.save({"state_dict": ref["state_dict"]}, ckpt)  # as the public checkpoints wrap it
    model = build(ref, kernel="chunkwise", chunk_size=8, init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
    model.init_weights()
    torch.testing.assert_close(features(model, ref), ref["features"], atol=ATOL, rtol=RTOL)


def test_public_weights_at_another_resolution(ref, tmp_path):
    """Against the public model built for a 96 x 64 input (6 x 4 grid) and loaded through the public
    ``load_state_dict`` (bicubic position-embedding interpolation): vilseg resizes in the converter when built for
    that size, and on the fly when built for the checkpoint's size."""
    ckpt = tmp_path / "vil_public_tiny.pth"
    torch.save({"state_dict": ref["state_dict"]}, ckpt)
    x, expected = ref["input_resized"], ref["features_resized"]
    assert expected.shape[-2:] == (6, 4)
    for img_size in ((96, 64), ref["kwargs"]["input_shape"][1:]):
        model = build(ref, img_size=img_size, kernel="chunkwise", chunk_size=8,
                      init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
        model.init_weights()
        assert model.pos_embed.shape[1:3] == (img_size[0] // 16, img_size[1] // 16)
        with torch.no_grad():
            (out,) = model(x)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL, msg=f"img_size={img_size}")
