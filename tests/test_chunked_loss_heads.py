"""vilseg's ChunkedLoss heads: mmseg's loss and accuracy, computed in bands of rows, with a fraction of the memory."""
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

import vilseg.models  # noqa: F401  (registers the heads)
from vilseg.models.decode_heads import bilinear_rows
from vilseg.profiling.memory import LiveTensorTracker
from vilseg.engine.registry import build_model

NUM_CLASSES = 6


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(30, 41), (7, 9), (13, 4), (3, 20)])
def test_bilinear_rows_equal_interpolate(size, align_corners):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    ref = F.interpolate(x, size, mode="bilinear", align_corners=align_corners)
    bands = [bilinear_rows(x, size, s, min(size[0], s + 4), align_corners) for s in range(0, size[0], 4)]
    torch.testing.assert_close(torch.cat(bands, dim=2), ref, rtol=0, atol=1e-12)


def _uper(type_name, loss_decode, **kw):
    return build_model(dict(type=type_name, in_channels=[8] * 4, in_index=[0, 1, 2, 3], channels=8,
                            num_classes=NUM_CLASSES, pool_scales=(1, 2), dropout_ratio=0.0, align_corners=False,
                            norm_cfg=dict(type="BN", requires_grad=True), loss_decode=loss_decode, **kw))


def _samples(h, w, ignore_rows=5, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        label = torch.randint(0, NUM_CLASSES, (1, h, w), generator=g)
        label[0, :ignore_rows] = 255
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label)
        out.append(sample)
    return out


def _loss_and_grads(head, feats, samples):
    for f in feats:
        f.grad = None
    head.zero_grad()
    losses = head.loss(feats, samples, {})
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    return ({k: v.detach() for k, v in losses.items()}, [f.grad.clone() for f in feats],
            {n: p.grad.clone() for n, p in head.named_parameters()})


@pytest.mark.parametrize("case", ["two_losses_with_ignore", "class_weight"])
def test_chunked_uper_head_matches_mmseg(case):
    if case == "two_losses_with_ignore":
        loss_decode = [dict(type="CrossEntropyLoss", loss_weight=1.0),
                       dict(type="CrossEntropyLoss", loss_weight=0.3, avg_non_ignore=True, loss_name="loss_b")]
        ignore_rows = 5
    else:  # mmseg's class-weighted average cannot take ignored pixels (it indexes the weights with 255)
        loss_decode = dict(type="CrossEntropyLoss", loss_weight=0.7, class_weight=[1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
        ignore_rows = 0
    torch.manual_seed(0)
    ref = _uper("UPerHead", loss_decode).double()
    # 50 pixels per band with 64 columns: one row per band, 61 bands, the last one shorter than the rest
    chunked = _uper("ChunkedLossUPerHead", loss_decode, loss_chunk_pixels=50).double()
    chunked.load_state_dict(ref.state_dict())
    feats = [torch.randn(2, 8, s, s, dtype=torch.float64, requires_grad=True) for s in (16, 8, 4, 2)]
    samples = _samples(61, 64, ignore_rows)
    a, b = _loss_and_grads(ref, feats, samples), _loss_and_grads(chunked, feats, samples)
    assert a[0].keys() == b[0].keys()
    for key in a[0]:  # acc_seg is float32 in mmseg: equal up to float32 rounding
        tol = 1e-6 if key == "acc_seg" else 1e-10
        torch.testing.assert_close(b[0][key].to(a[0][key].dtype), a[0][key], rtol=tol, atol=0)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], rtol=1e-9, atol=1e-12)


def test_chunked_fcn_head_matches_mmseg_and_bands_do_not_matter():
    cfg = dict(in_channels=8, channels=8, num_convs=1, concat_input=False, num_classes=NUM_CLASSES,
               dropout_ratio=0.0, norm_cfg=dict(type="BN", requires_grad=True), align_corners=True,
               loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4))
    torch.manual_seed(0)
    ref = build_model(dict(type="FCNHead", **cfg)).double()
    feats = [torch.randn(2, 8, 9, 11, dtype=torch.float64, requires_grad=True)]
    samples = _samples(40, 33)
    expected = _loss_and_grads(ref, feats, samples)
    for pixels in (1, 100, 10**6):  # one row per band, several rows, one band
        head = build_model(dict(type="ChunkedLossFCNHead", loss_chunk_pixels=pixels, **cfg)).double()
        head.load_state_dict(ref.state_dict())
        got = _loss_and_grads(head, feats, samples)
        torch.testing.assert_close(got[0]["loss_ce"], expected[0]["loss_ce"], rtol=1e-10, atol=0)
        torch.testing.assert_close(got[0]["acc_seg"].double(), expected[0]["acc_seg"].double(), rtol=1e-6, atol=0)
        torch.testing.assert_close(got[1][0], expected[1][0], rtol=1e-9, atol=1e-12)


def test_chunked_loss_never_holds_the_full_resolution_logits():
    # 1/8-resolution logits upsampled to 256 x 256: mmseg keeps the upsampled logits and their log-softmax
    loss_decode = dict(type="CrossEntropyLoss", loss_weight=1.0)
    peaks = {}
    for type_name, kw in (("UPerHead", {}), ("ChunkedLossUPerHead", dict(loss_chunk_pixels=16 * 256))):
        torch.manual_seed(0)
        head = _uper(type_name, loss_decode, **kw)
        feats = [torch.randn(2, 8, s, s, requires_grad=True) for s in (32, 16, 8, 4)]
        samples = _samples(256, 256)
        tracker = LiveTensorTracker().track(head, feats, [s.gt_sem_seg.data for s in samples])
        base = tracker.current_bytes
        with tracker:
            losses = head.loss(feats, samples, {})
            losses["loss_ce"].backward()
        peaks[type_name] = tracker.peak_bytes - base
    full_logits = 2 * NUM_CLASSES * 256 * 256 * 4
    assert peaks["UPerHead"] > 2 * full_logits, peaks
    assert peaks["ChunkedLossUPerHead"] < 0.3 * peaks["UPerHead"], peaks


@pytest.mark.parametrize("override, message", [
    (dict(sampler=dict(type="OHEMPixelSampler", thresh=0.7, min_kept=100)), "sampler"),
    (dict(loss_decode=dict(type="DiceLoss")), "CrossEntropyLoss"),
    (dict(loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=True)), "use_sigmoid=False"),
    (dict(loss_decode=dict(type="CrossEntropyLoss", reduction="none")), "reduction"),
    (dict(loss_chunk_pixels=0), "loss_chunk_pixels"),
])
def test_unsupported_settings_are_refused_by_name(override, message):
    kw = dict(loss_decode=dict(type="CrossEntropyLoss"))
    kw.update(override)
    with pytest.raises(ValueError, match=message):
        _uper("ChunkedLossUPerHead", **kw)


def test_ade_configs_use_the_chunked_heads():
    from vilseg.apis.config import read_config

    for path, head, aux in (("configs/vil_upernet_ade20k.py", "ChunkedLossUPerHead", "ChunkedLossFCNHead"),
                            ("configs/baselines/deit_t_upernet_ade20k.py", "ChunkedLossUPerHead",
                             "ChunkedLossFCNHead"),
                            ("configs/vil_fpn_ade20k.py", "ChunkedLossFPNHead", None)):
        model = read_config(path).model
        assert model.decode_head.type == head, path
        assert (model.auxiliary_head or {}).get("type") == aux, path
