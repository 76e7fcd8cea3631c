"""Make ``tests/data/vil_public_tiny.pt``: a tiny public ViL v2 (``VisionLSTM2``) and the features it computes.

The fixture lets ``tests/test_vil_public_reference.py`` check vilseg's converter and ViL against the real public
code without the public code being installed (none of it is copied into vilseg; only its outputs are stored).

How the committed file was made (public repository https://github.com/NX-AI/vision-lstm, commit
381ba95c95c901a2ebc8aa6eabc13e34078e0e29, its ``vision_lstm/`` folder exported outside this repository; the only
extra package the public code needs is einops, installed outside the project venv)::

    mkdir -p /tmp/vision_lstm_public
    git --git-dir=<bare clone of NX-AI/vision-lstm> archive 381ba95c95c901a2ebc8aa6eabc13e34078e0e29 vision_lstm \
        | tar x -C /tmp/vision_lstm_public
    pip install --target /tmp/pubdeps einops
    PYTHONPATH=/tmp/pubdeps .venv/bin/python tests/data/make_vil_public_reference.py /tmp/vision_lstm_public \
        --commit 381ba95c95c901a2ebc8aa6eabc13e34078e0e29

(torch 2.13.0+cpu, fp32, CPU.)

The model: ``VisionLSTM2`` with the public ViL-T settings (hubconf ``vil2-tiny``: bidirectional row-wise
alternation in block pairs, 2D conv of kernel 3, ``pooling='bilateral_flatten'``, ``legacy_norm=True``, biases on)
but dim 32 and depth 2 (``VisionLSTM2`` counts block *pairs*: depth 2 = 4 sub-blocks, vilseg ``num_blocks=4``), a
10-class head and a non-square 64 x 80 input (a 4 x 5 patch grid, so that a swapped height/width shows). After the
seeded init every parameter gets N(0, 0.1^2) noise, so the residual-stored LayerNorm weights (zero at init), the
biases, the learnable skip and the gates are all non-trivial.

Stored (a dict, loadable with ``torch.load(..., weights_only=True)``):
    state_dict: ``VisionLSTM2.state_dict()`` as the public code names it (the "hub" layout: ``blocks.{j}.rowwise_
        from_top_left.*``, ``pos_embed.embed``, ``norm.*``, ``legacy_norm.*``, ``head.*``), fp32;
    kwargs: the ``VisionLSTM2`` constructor kwargs;
    input: the (2, 3, 64, 80) image batch;
    features: the public model's token features after its final norm (``VisionLSTM2.norm``), captured with a
        forward hook during the classifier forward and reshaped (B, S, D) -> (B, D, H/16, W/16) row-major, i.e.
        before pooling, ``legacy_norm`` and head. The script checks that this equals the public
        ``mode='features', pooling='to_image'`` output of the same weights (legacy_norm off) exactly;
    logits: the classifier output (not used by the test; kept for completeness);
    input_resized, features_resized: a (1, 3, 96, 64) input (a 6 x 4 grid) and the features of the public model
        built for that size and given the same state dict through ``VisionLSTM2.load_state_dict`` (the public
        code's own bicubic position-embedding interpolation), captured the same way;
    public_repo, public_commit, torch_version, feature_hook: provenance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

NOISE_STD = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("public_src", help="folder holding the public vision_lstm/ package (NX-AI/vision-lstm)")
    parser.add_argument("--commit", required=True, help="NX-AI/vision-lstm commit the folder was exported from")
    parser.add_argument("--out", default=str(Path(__file__).with_name("vil_public_tiny.pt")))
    args = parser.parse_args()

    sys.path.insert(0, str(Path(args.public_src).resolve()))
    from vision_lstm.vision_lstm2 import VisionLSTM2  # the public class

    kwargs = dict(dim=32, depth=2, input_shape=(3, 64, 80), patch_size=16, output_shape=(10,), mode="classifier",
                  pooling="bilateral_flatten", legacy_norm=True, conv_kind="2d", conv_kernel_size=3,
                  norm_bias=True, proj_bias=True, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = VisionLSTM2(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(NOISE_STD * torch.randn_like(p))
    x = torch.randn(2, *kwargs["input_shape"])

    captured = {}
    hook = model.norm.register_forward_hook(lambda mod, inp, out: captured.__setitem__("tokens", out.detach()))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    h, w = model.patch_embed.seqlens
    tokens = captured["tokens"]  # (B, h * w, D), row-major over the patch grid
    features = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    # the same weights through the public feature mode: must give the hooked tensor
    feat_kwargs = dict(kwargs, mode="features", pooling="to_image", legacy_norm=False, output_shape=None)
    feat_model = VisionLSTM2(**feat_kwargs).eval()
    backbone_sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "legacy_norm."))}
    nn.Module.load_state_dict(feat_model, backbone_sd, strict=True)  # the public override expects legacy_norm
    with torch.no_grad():
        feat_out = feat_model(x)
    if not torch.equal(feat_out, features):
        raise SystemExit(f"hooked features differ from the public feature mode: "
                         f"{(feat_out - features).abs().max().item()}")

    # the public way to another resolution: a model built for it, loaded through VisionLSTM2.load_state_dict (which
    # interpolates the position embedding bicubically); 96 x 64 = a 6 x 4 grid, the other aspect ratio
    resized_kwargs = dict(kwargs, input_shape=(3, 96, 64))
    resized_model = VisionLSTM2(**resized_kwargs).eval()
    resized_model.load_state_dict(dict(model.state_dict()), strict=True)
    x_resized = torch.randn(1, *resized_kwargs["input_shape"])
    hook = resized_model.norm.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("tokens", out.detach()))
    with torch.no_grad():
        resized_model(x_resized)
    hook.remove()
    h, w = resized_model.patch_embed.seqlens
    tokens = captured["tokens"]
    features_resized = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    out = dict(
        state_dict={k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        kwargs=kwargs,
        input=x,
        features=features,
        logits=logits,
        input_resized=x_resized,
        features_resized=features_resized,
        public_repo="NX-AI/vision-lstm",
        public_commit=args.commit,
        torch_version=str(torch.__version__),
        feature_hook="VisionLSTM2.norm output (B, S, D) -> (B, D, H/16, W/16); equals mode='features', "
                     "pooling='to_image' with legacy_norm=False",
    )
    torch.save(out, args.out)
    print(f"wrote {args.out}: {len(out['state_dict'])} tensors, features {tuple(features.shape)}, "
          f"|features| max {features.abs().max().item():.3f} std {features.std().item():.3f}")


if __name__ == "__main__":
    main()
