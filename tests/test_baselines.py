"""Sequencer2D and LambdaResNet: registry, shapes at non-square sizes, the math of their token mixers, the configs,
one training step through mmseg's EncoderDecoder, and the profiler's builders."""
from __future__ import annotations

import math

import pytest
import torch
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from torch import nn

import vilseg.models  # noqa: F401  (registers the backbones)
from vilseg.models.backbones.lambda_resnet import LambdaLayer, LambdaResNet
from vilseg.models.backbones.sequencer import SEQUENCER2D_ARCHS, BiLSTM2D, Sequencer2D

from ade_helpers import REPO, ensure_mini_ade

register_all_modules(init_default_scope=False)

TINY_SEQ = dict(depths=[1, 1, 2, 1], embed_dims=[16, 32, 32, 32])
TINY_LAMBDA = dict(stem_channels=8, base_channels=8, lambda_cfg=dict(dim_k=4, heads=2, r=5))
SIZE = (96, 160)   # non-square, neither side a multiple of 7


def _build(cfg: dict) -> nn.Module:
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg)


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------ Sequencer2D
def test_sequencer_registry_and_presets():
    assert MODELS.get("Sequencer2D") is Sequencer2D
    assert [sum(SEQUENCER2D_ARCHS[a]["depths"]) for a in ("s", "m", "l")] == [18, 24, 36]
    model = _build(dict(type="Sequencer2D", arch="s"))
    assert model.depths == [4, 3, 8, 3] and model.embed_dims == [192, 384, 384, 384]
    lstm = model.stages[0][0].rnn_tokens.lstm_v
    assert lstm.hidden_size == 48 and lstm.bidirectional                 # C / 4 per direction
    assert model.stages[2][0].rnn_tokens.lstm_h.hidden_size == 96
    # the paper's Sequencer2D-S has 28M parameters with its 1000-class head (0.39M): the backbone is ~27.3M
    assert 26.5e6 < _nparams(model) < 28.5e6


def test_sequencer_forward_shapes_non_square():
    model = Sequencer2D(arch=TINY_SEQ, out_indices=(0, 1, 2, 3))
    outs = model(torch.randn(2, 3, *SIZE))
    h1, w1 = math.ceil(SIZE[0] / 7), math.ceil(SIZE[1] / 7)
    h2, w2 = math.ceil(h1 / 2), math.ceil(w1 / 2)
    assert [tuple(o.shape) for o in outs] == [(2, 16, h1, w1), (2, 32, h2, w2), (2, 32, h2, w2), (2, 32, h2, w2)]
    assert tuple(Sequencer2D(arch=TINY_SEQ, out_indices=(-1,))(torch.randn(1, 3, 30, 44))[0].shape) == (1, 32, 3, 4)


def test_bilstm2d_mixes_along_the_row_and_column_only():
    torch.manual_seed(0)
    mixer = BiLSTM2D(8, 2)
    x = torch.randn(1, 5, 6, 8)
    y0 = mixer(x)
    x2 = x.clone()
    x2[0, 2, 3] += 1.0                                   # perturb the token at row 2, column 3
    changed = (mixer(x2) - y0).abs().amax(dim=-1)[0] > 1e-7
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[2, :] = True                                # the horizontal LSTM reads row 2 (both directions)
    expected[:, 3] = True                                # the vertical LSTM reads column 3
    assert torch.equal(changed, expected)


def test_sequencer_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        Sequencer2D(arch="xl")
    with pytest.raises(ValueError, match="one entry per stage"):
        Sequencer2D(arch=dict(depths=[1, 1], embed_dims=[8, 8, 8, 8]))
    with pytest.raises(ValueError, match="out_indices"):
        Sequencer2D(arch=TINY_SEQ, out_indices=(4,))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Sequencer2D(arch=TINY_SEQ)(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------------------------------------ lambda layer
def _lambda_reference(layer: LambdaLayer, x: torch.Tensor) -> torch.Tensor:
    """The lambda layer written as the paper's sums, with an explicit relative-position embedding E[n, m]
    (zero outside the r x r window) instead of the lambda convolution."""
    B, _, H, W = x.shape
    k, u, v, h, r = layer.dim_k, layer.dim_u, layer.dim_v, layer.heads, layer.r
    n = H * W
    q = layer.norm_q(layer.to_q(x)).reshape(B, h, k, n)
    keys = layer.to_k(x).reshape(B, k, u, n).softmax(-1)
    vals = layer.norm_v(layer.to_v(x)).reshape(B, v, u, n)
    emb = torch.zeros(n, n, k, u, dtype=x.dtype)          # E[n, m, k, u]
    w = layer.pos_conv.weight[:, :, 0]                     # (k, u, r, r)
    half = r // 2
    for yn in range(H):
        for xn in range(W):
            for ym in range(max(0, yn - half), min(H, yn + half + 1)):
                for xm in range(max(0, xn - half), min(W, xn + half + 1)):
                    emb[yn * W + xn, ym * W + xm] = w[:, :, ym - yn + half, xm - xn + half]
    lam_c = torch.einsum("bkum,bvum->bkv", keys, vals)
    lam_p = torch.einsum("nmku,bvum->bnkv", emb, vals)
    y = torch.einsum("bhkn,bkv->bnhv", q, lam_c) + torch.einsum("bhkn,bnkv->bnhv", q, lam_p)
    return y.reshape(B, H, W, h * v).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dim_u", [1, 2])
def test_lambda_layer_equals_the_explicit_content_plus_position_sums(dim_u):
    torch.manual_seed(0)
    layer = LambdaLayer(6, 8, dim_k=4, heads=2, dim_u=dim_u, r=3).double()
    nn.init.normal_(layer.pos_conv.weight)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _lambda_reference(layer, x), rtol=1e-10, atol=1e-10)


def test_lambda_layer_stride_dilation_and_errors():
    layer = LambdaLayer(8, 8, dim_k=4, heads=2, r=5, stride=2)
    assert tuple(layer(torch.randn(1, 8, 7, 9)).shape) == (1, 8, 4, 5)   # as a 3x3 / stride-2 / pad-1 conv
    assert tuple(LambdaLayer(8, 8, dim_k=4, heads=2, r=3, dilation=2)(torch.randn(1, 8, 6, 6)).shape) == (1, 8, 6, 6)
    with pytest.raises(ValueError, match="multiple of heads"):
        LambdaLayer(8, 10, heads=4)
    with pytest.raises(ValueError, match="odd"):
        LambdaLayer(8, 8, r=4)


# ------------------------------------------------------------------------------------------------ LambdaResNet
def test_lambda_resnet_registry_structure_and_shapes():
    assert MODELS.get("LambdaResNet") is LambdaResNet
    model = _build(dict(type="LambdaResNet", depth=50, **TINY_LAMBDA))
    for i, layer_name in enumerate(model.res_layers):
        kinds = {type(block.conv2) for block in getattr(model, layer_name)}
        assert kinds == ({LambdaLayer} if i >= 2 else {nn.Conv2d}), (layer_name, kinds)
    assert model.layer3[0].conv2.stride == 2 and model.layer3[1].conv2.stride == 1
    outs = model(torch.randn(2, 3, *SIZE))
    assert [tuple(o.shape) for o in outs] == [(2, 8 * 4 * 2 ** i, SIZE[0] // 2 ** (i + 2), SIZE[1] // 2 ** (i + 2))
                                              for i in range(4)]
    with pytest.raises(ValueError, match="bottleneck"):
        LambdaResNet(depth=18)
    with pytest.raises(ValueError, match="one bool per stage"):
        LambdaResNet(depth=50, lambda_stages=(True, True))


def test_lambda_resnet50_is_lighter_than_resnet50():
    # the paper's C->C->L->L ResNet-50: ~15.5M parameters with the 1000-class head (2M) vs 25.6M for ResNet-50
    lam = _nparams(LambdaResNet(depth=50))
    res = _nparams(_build(dict(type="ResNetV1c", depth=50)))
    assert 12.5e6 < lam < 14.5e6 and res > lam + 9e6


# ------------------------------------------------------------------------------------------------ configs
CONFIGS = {
    # UperNet configs inherit vil_upernet_ade20k's ChunkedLoss heads; the FPN ones restate mmseg's FPNHead
    "configs/sequencer/sequencer2d_s_upernet_ade20k.py": ("Sequencer2D", "ChunkedLossUPerHead"),
    "configs/sequencer/sequencer2d_s_fpn_ade20k.py": ("Sequencer2D", "FPNHead"),
    "configs/lambda/lambda_resnet50_upernet_ade20k.py": ("LambdaResNet", "ChunkedLossUPerHead"),
    "configs/demo/sequencer2d_s_upernet_ade20k_mini.py": ("Sequencer2D", "ChunkedLossUPerHead"),
    "configs/demo/sequencer2d_s_fpn_ade20k_mini.py": ("Sequencer2D", "FPNHead"),
    "configs/demo/lambda_resnet50_upernet_ade20k_mini.py": ("LambdaResNet", "ChunkedLossUPerHead"),
}


def _load(path: str):
    from vilseg.apis.config import load_config

    return load_config(path, adapt=True)


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_configs_load_and_name_the_backbone(path):
    cfg = _load(path)
    backbone, head = CONFIGS[path]
    assert cfg.model.backbone.type == backbone and cfg.model.decode_head.type == head
    assert "vilseg.models" in cfg.custom_imports.imports
    if "mini" in path:
        assert cfg.train_dataloader.dataset.data_root.endswith("mini_ade/ADEChallengeData2016")


def _tiny_model_cfg(path: str) -> dict:
    """The config's segmentor with a tiny backbone of the same type (heads' input channels follow)."""
    cfg = _load(path).model
    if cfg.backbone.type == "Sequencer2D":
        cfg.backbone.arch = TINY_SEQ
        chans = TINY_SEQ["embed_dims"]
    else:
        cfg.backbone.update(TINY_LAMBDA)
        chans = [32 * 2 ** i for i in range(4)]
    if cfg.decode_head.type == "FPNHead":
        cfg.neck.in_channels = chans
    else:
        cfg.decode_head.in_channels = chans
        cfg.auxiliary_head.in_channels = chans[2]
    cfg.data_preprocessor.size = (64, 96)
    return cfg


@pytest.mark.parametrize("path", ["configs/demo/sequencer2d_s_upernet_ade20k_mini.py",
                                  "configs/demo/sequencer2d_s_fpn_ade20k_mini.py",
                                  "configs/demo/lambda_resnet50_upernet_ade20k_mini.py"])
def test_one_training_step_through_encoder_decoder(path):
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    model = _build(_tiny_model_cfg(path))
    model.init_weights()
    model.train()
    optim = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3)))
    samples = []
    for _ in range(2):   # batch 2: UperNet's pooling BN needs more than one value per channel
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 8, (1, 64, 96)))
        s.set_metainfo(dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96)))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    log_vars = model.train_step(data, optim)
    assert math.isfinite(float(log_vars["loss"]))
    changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2        # the backbone received gradients and was updated


@pytest.mark.slow
@pytest.mark.parametrize("path", ["configs/demo/sequencer2d_s_upernet_ade20k_mini.py",
                                  "configs/demo/lambda_resnet50_upernet_ade20k_mini.py"])
def test_real_backbones_train_one_iteration_on_mini_ade(path, tmp_path):
    """Sequencer2D-S and LambdaResNet-50 (real sizes) from their mini configs: one iteration of mmseg's Runner on
    the mini dataset (64x64 crops, batch 2)."""
    from vilseg.apis.train import train

    ensure_mini_ade()
    opts = {
        "train_dataloader.batch_size": 2, "train_dataloader.num_workers": 0,
        "train_dataloader.persistent_workers": False, "val_dataloader.num_workers": 0,
        "val_dataloader.persistent_workers": False, "test_dataloader.num_workers": 0,
        "test_dataloader.persistent_workers": False, "train_cfg.max_iters": 1, "train_cfg.val_interval": 100,
        "default_hooks.logger.interval": 1, "default_hooks.checkpoint.interval": 100,
        "default_hooks.checkpoint.save_last": False, "default_hooks.visualization.draw": False,
        "model.data_preprocessor.size": (64, 64), "train_dataloader.dataset.pipeline.3.crop_size": (64, 64),
        "param_scheduler": [],
    }
    runner = train(str(REPO / path), work_dir=str(tmp_path), cfg_options=opts)
    assert runner.iter == 1
    loss = runner.message_hub.get_scalar("train/loss").current()
    assert math.isfinite(float(loss))


# ------------------------------------------------------------------------------------------------ profiler rows
@pytest.mark.parametrize("name", ["sequencer2d", "lambdaresnet"])
def test_profiler_builds_the_baselines(name):
    from vilseg.profiling.models import build_model, get_spec

    assert get_spec(name).unavailable_reason() is None
    model = build_model(name, (64, 64), 150)
    outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4
