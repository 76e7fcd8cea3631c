"""ADE20K configs: every config loads and builds its model; the paper settings are what the configs say; the
layer-decay constructor groups ViL / DeiT parameters correctly; mmseg's high-level APIs run on vilseg configs."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from ade_helpers import MINI_CONFIG, REPO, TINY, ensure_mini_ade

ADE_CONFIGS = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py")
    if "_base_" not in p.parts and "medical" not in p.parts)


def _load(path, **options):
    from vilseg.apis import load_config

    return load_config(path, options or None)


def _build(cfg):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return MODELS.build(cfg.model)


def test_config_list_is_complete():
    expected = {"configs/vil_upernet_ade20k.py", "configs/vil_s_upernet_ade20k.py", "configs/vil_b_upernet_ade20k.py",
                "configs/vil_fpn_ade20k.py", "configs/demo/vil_upernet_ade20k_mini.py",
                "configs/baselines/deit_t_upernet_ade20k.py", "configs/baselines/deit_s_upernet_ade20k.py",
                "configs/baselines/swin_t_upernet_ade20k.py"}
    assert expected <= set(ADE_CONFIGS)


# forward passes of the full-width S / B / Swin / ResNet-50-sized models are slow on 2 CPU cores: marked slow
LIGHT = {"configs/vil_upernet_ade20k.py", "configs/vil_fpn_ade20k.py", "configs/baselines/deit_t_upernet_ade20k.py"}


def _forward_param(config):
    light = config in LIGHT or config.startswith("configs/demo/")
    return pytest.param(config, marks=() if light else pytest.mark.slow)


def test_read_config_resolves_package_bases_as_mmengine_does(monkeypatch):
    """read_config reads mmseg's metafiles once per process instead of on every ``mmseg::`` base (mmengine's
    per-load reading of them is never called); it loads the same config as mmengine's Config.fromfile, resolves
    every name as mmengine's own lookup does, and leaves mmengine's lookup in place afterwards."""
    import mmengine.config.config as config_module
    import mmengine.config.utils as config_utils
    from mmengine.config import Config
    from mmengine.config.utils import _get_external_cfg_path
    from mmengine.utils import get_installed_path

    from vilseg.apis.config import _external_config_path, _metafile_index, read_config

    path = str(REPO / "configs" / "baselines" / "deit_t_upernet_ade20k.py")
    expected = Config.fromfile(path).to_dict()
    with monkeypatch.context() as patch:
        patch.setattr(config_utils, "_get_cfg_metainfo", lambda *args: pytest.fail("metafiles read per load"))
        assert read_config(path).to_dict() == expected
    assert config_module._get_external_cfg_path is _get_external_cfg_path
    package = get_installed_path("mmsegmentation")
    listed = next(iter(_metafile_index(package)))
    for name in (listed, listed[:-3], "_base_/models/upernet_beit.py", "upernet/no_such_config.py"):
        results = []
        for lookup in (_get_external_cfg_path, _external_config_path):
            try:
                results.append(lookup(package, name))
            except (ValueError, FileNotFoundError) as err:
                results.append(type(err))
        assert results[0] == results[1], name


@pytest.mark.parametrize("config", ADE_CONFIGS)
def test_config_loads_and_builds(config):
    cfg = _load(config)
    model = _build(cfg)
    assert model.decode_head.num_classes == 150
    if model.with_auxiliary_head:
        assert model.auxiliary_head.num_classes == 150
    # no SyncBN left on a CPU machine
    if not torch.cuda.is_available():
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    # mmseg's ADE20K layout and label space through the checked dataset
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = cfg[loader].dataset
        assert ds.type == "CheckedADE20KDataset" and ds.reduce_zero_label is True, loader


# the compiled variant is vil_upernet_ade20k.py plus torch.compile, whose equality with eager has its own test
@pytest.mark.parametrize("config", [_forward_param(c) for c in ADE_CONFIGS if not c.endswith("_compiled.py")])
def test_config_forward(config):
    model = _build(_load(config)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x, mode="tensor")
        finest = model.extract_feat(x)[0]
    # logits for the 150 classes at the resolution of the finest pyramid level the head reads (1/4 for the
    # ViT/Swin/ResNet pyramids, 1/7 for Sequencer2D's stride-7 stem), never coarser than 1/8
    assert out.shape[:2] == (1, 150) and out.shape[2:] == finest.shape[2:]
    assert out.shape[2] == out.shape[3] >= 64 // 8
    assert torch.isfinite(out).all()


def test_paper_settings_vil_t_upernet():
    cfg = _load("configs/vil_upernet_ade20k.py")
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, tuple(bb.out_indices), bb.final_norm, bb.drop_path_rate) == \
        ("ViL", "tiny", (7, 11, 15, 23), False, 0.0)
    assert cfg.model.neck.type == "Feature2Pyramid" and list(cfg.model.neck.rescales) == [4, 2, 1, 0.5]
    assert cfg.model.decode_head.type == "ChunkedLossUPerHead" and cfg.model.decode_head.channels == 192
    assert cfg.model.auxiliary_head.type == "ChunkedLossFCNHead"
    assert cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    assert cfg.model.test_cfg.mode == "slide" and tuple(cfg.model.test_cfg.stride) == (341, 341)
    assert tuple(cfg.model.test_cfg.crop_size) == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size * 8 == 16 == cfg.auto_scale_lr.base_batch_size
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == "AdamW" and opt.optimizer.lr == 5e-4 and opt.optimizer.weight_decay == 0.05
    assert opt.constructor == "ViLLayerDecayOptimizerConstructor" and opt.paramwise_cfg.decay_rate == 0.65
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end) == ("LinearLR", 0, 1500)
    assert (cos.type, cos.begin, cos.end) == ("CosineAnnealingLR", 1500, 160000)
    assert math.isclose(cos.eta_min_ratio * opt.optimizer.lr, 1e-6)
    assert cfg.train_dataloader.dataset.data_root.endswith("data/ade/ADEChallengeData2016")
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomCrop"][0]
    assert tuple(crop.crop_size) == (512, 512)


@pytest.mark.parametrize("config,arch,drop_path,dims,channels", [
    ("configs/vil_s_upernet_ade20k.py", "small", 0.05, 384, 384),
    ("configs/vil_b_upernet_ade20k.py", "base", 0.1, 768, 384),
])
def test_paper_settings_s_b(config, arch, drop_path, dims, channels):
    cfg = _load(config)
    assert cfg.model.backbone.arch == arch and cfg.model.backbone.drop_path_rate == drop_path
    assert cfg.model.neck.embed_dim == dims and cfg.model.decode_head.in_channels == [dims] * 4
    assert cfg.model.decode_head.channels == channels and cfg.model.auxiliary_head.in_channels == dims
    assert tuple(cfg.model.backbone.out_indices) == (7, 11, 15, 23)


def _groups(config):
    from mmengine.optim import build_optim_wrapper

    cfg = _load(config)
    model = _build(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    by_name = {}
    for group in wrapper.optimizer.param_groups:
        for name in group["param_names"]:
            by_name[name] = group
    return cfg, model, by_name


def _official_lr_scale(name: str, pairs: int = 12, rate: float = 0.65) -> float:
    """The official recipe (vision-lstm's LayerwiseLrDecay with group_two_blocks: true), written from its formula:
    scales[i] = rate ** (num_layers - i), num_layers = pairs + 1; stem -> scales[0]; sub-block b -> layer
    (b + 1 - 1) // 2 + 1; everything outside the encoder (and its last norm) -> 1."""
    num_layers = pairs + 1
    if not name.startswith("backbone.") or name.startswith("backbone.norm"):
        return 1.0
    if name.startswith(("backbone.patch_embed", "backbone.pos_embed", "backbone.cls_token")):
        return rate ** num_layers
    parts = name.split(".")
    sub_block = 2 * int(parts[2]) + (0 if parts[3] == "rowwise_from_top_left" else 1)  # official block index
    layer = (sub_block + 1 - 1) // 2 + 1
    return rate ** (num_layers - layer)


@pytest.mark.parametrize("config,arch,drop_path", [
    ("configs/vil_upernet_ade20k.py", "tiny", 0.0),
    pytest.param("configs/vil_s_upernet_ade20k.py", "small", 0.05, marks=pytest.mark.slow),
    pytest.param("configs/vil_b_upernet_ade20k.py", "base", 0.1, marks=pytest.mark.slow),
])
def test_shipped_recipe_matches_the_official_one(config, arch, drop_path):
    """T/S/B: the optimizer they build has the official layer-decay scales; schedule, batch, crop, blocks, drop path."""
    cfg, model, groups = _groups(config)
    base_lr = 5e-4
    assert set(groups) == {k for k, p in model.named_parameters() if p.requires_grad}

    def scale(name):
        assert math.isclose(groups[name]["lr"], groups[name]["lr_scale"] * base_lr, rel_tol=1e-12)
        return groups[name]["lr_scale"]

    def first(prefix):
        return next(k for k in groups if k.startswith(prefix))

    probes = ["backbone.pos_embed", "backbone.patch_embed.proj.weight", first("decode_head."),
              first("auxiliary_head."), first("neck.")]
    for pair in (0, 5, 11):
        probes += [first(f"backbone.blocks.{pair}.rowwise_from_top_left."),
                   first(f"backbone.blocks.{pair}.rowwise_from_bot_right.")]
    for name in probes:
        assert math.isclose(scale(name), _official_lr_scale(name), rel_tol=1e-6), name
    # the figures the recipe implies, spelled out: stem 0.65^13, pair j 0.65^(12 - j), heads 1
    assert math.isclose(scale("backbone.pos_embed"), 0.65 ** 13, rel_tol=1e-6)
    assert math.isclose(scale(first("backbone.blocks.0.rowwise_from_bot_right.")), 0.65 ** 12, rel_tol=1e-6)
    assert math.isclose(scale(first("backbone.blocks.11.rowwise_from_top_left.")), 0.65, rel_tol=1e-6)
    assert scale(first("decode_head.")) == 1.0
    assert len({g["lr_scale"] for g in groups.values()}) == 14  # 13 decayed layers + the heads

    bb = cfg.model.backbone
    assert (bb.arch, tuple(bb.out_indices), bb.drop_path_rate, bb.final_norm) == (arch, (7, 11, 15, 23), drop_path,
                                                                                 False)
    dpr = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
           for pair in model.backbone.blocks for b in (pair.rowwise_from_top_left, pair.rowwise_from_bot_right)]
    assert all(math.isclose(d, drop_path * i / 23, abs_tol=1e-12) for i, d in enumerate(dpr)), dpr
    assert cfg.train_dataloader.batch_size * 8 == 16 and cfg.train_cfg.max_iters == 160000
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, tuple(opt.betas), opt.weight_decay) == ("AdamW", 5e-4, (0.9, 0.999), 0.05)
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end, cos.type, cos.end) == ("LinearLR", 0, 1500, "CosineAnnealingLR", 160000)
    assert math.isclose(cos.eta_min_ratio * opt.lr, 1e-6)
    assert tuple(cfg.model.test_cfg.stride) == (341, 341)


def test_layer_decay_per_sub_block_option_and_log_line(capsys):
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper

    cfg = _load("configs/vil_upernet_ade20k.py")
    model = _build(cfg)
    MMLogger.get_instance("vilseg-test-decay", log_level="INFO")
    grouped = build_optim_wrapper(model, cfg.optim_wrapper)
    assert "over 14 layers (vil backbone: embeddings, 12 pairs of sub-blocks (2 per layer), heads)" in \
        capsys.readouterr().out
    cfg.optim_wrapper.paramwise_cfg.group_two_blocks = False
    per_block = build_optim_wrapper(model, cfg.optim_wrapper)
    assert "over 26 layers (vil backbone: embeddings, 24 sub-blocks (1 per layer), heads)" in capsys.readouterr().out
    groups = {n: g for g in per_block.optimizer.param_groups for n in g["param_names"]}
    n, rate = 24, 0.65
    assert math.isclose(groups["backbone.pos_embed"]["lr_scale"], rate ** (n + 1))
    for pair in (0, 5, 11):
        top = next(k for k in groups if k.startswith(f"backbone.blocks.{pair}.rowwise_from_top_left."))
        bot = next(k for k in groups if k.startswith(f"backbone.blocks.{pair}.rowwise_from_bot_right."))
        assert math.isclose(groups[top]["lr_scale"], rate ** (n - 2 * pair))
        assert math.isclose(groups[bot]["lr_scale"], rate ** (n - 2 * pair - 1))
    assert len(grouped.optimizer.param_groups) < len(per_block.optimizer.param_groups)
    # weight decay: none for the position embedding, biases and 1-D parameters
    wd = {n: g["weight_decay"] for g in grouped.optimizer.param_groups for n in g["param_names"]}
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim == 1 or name.endswith(".bias") or name.endswith("pos_embed")) else 0.05
        assert wd[name] == expected, name
    cfg.optim_wrapper.paramwise_cfg.group_two_blocks = "yes"
    with pytest.raises(ValueError, match="group_two_blocks"):
        build_optim_wrapper(model, cfg.optim_wrapper)


def test_layer_decay_deit_baseline_and_errors():
    _, model, groups = _groups("configs/baselines/deit_t_upernet_ade20k.py")
    assert math.isclose(groups["backbone.layers.0.attn.attn.in_proj_weight"]["lr"], 5e-4 * 0.65 ** 12)
    assert math.isclose(groups["backbone.layers.11.ffn.layers.1.weight"]["lr"], 5e-4 * 0.65 ** 1)
    assert math.isclose(groups["backbone.cls_token"]["lr"], 5e-4 * 0.65 ** 13)
    assert groups["backbone.cls_token"]["weight_decay"] == 0.0

    from vilseg.engine.layer_decay import ViLLayerDecayOptimizerConstructor, get_layer_id_for_vil

    assert get_layer_id_for_vil("backbone.blocks.3.rowwise_from_bot_right.norm.weight", 24) == 4
    assert get_layer_id_for_vil("auxiliary_head.conv_seg.weight", 24) == 13
    assert get_layer_id_for_vil("backbone.blocks.3.rowwise_from_bot_right.norm.weight", 24,
                                group_two_blocks=False) == 8
    assert get_layer_id_for_vil("auxiliary_head.conv_seg.weight", 24, group_two_blocks=False) == 25
    with pytest.raises(ValueError, match="decay_rate"):
        ViLLayerDecayOptimizerConstructor(dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3)), {})
    ctor = ViLLayerDecayOptimizerConstructor(dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3)),
                                             dict(decay_rate=0.9))
    with pytest.raises(ValueError, match="ViL backbones"):
        ctor(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_mmseg_init_model_and_inference_model():
    from mmseg.apis import inference_model, init_model

    root = ensure_mini_ade()
    img = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    # the plain mmseg API on the config file, unchanged (mini config: BN, CPU sized; tiny model for speed)
    model = init_model(str(REPO / MINI_CONFIG), None, device="cpu", cfg_options=dict(TINY))
    result = inference_model(model, str(img))
    import cv2

    h, w = cv2.imread(str(img)).shape[:2]
    assert tuple(result.pred_sem_seg.data.shape) == (1, h, w)
    assert result.seg_logits.data.shape == (150, h, w)
    assert int(result.pred_sem_seg.data.max()) < 150


def test_mmseg_inferencer(tmp_path):
    from mmseg.apis import MMSegInferencer

    root = ensure_mini_ade()
    imgs = [str(p) for p in sorted((root / "images" / "validation").glob("*.jpg"))[:2]]
    from vilseg.apis.config import read_config

    cfg = read_config(str(REPO / MINI_CONFIG))
    cfg.merge_from_dict(dict(TINY))
    inferencer = MMSegInferencer(model=cfg, weights=None, device="cpu", dataset_name="ade20k")
    out = inferencer(imgs, out_dir=str(tmp_path), return_datasamples=True)
    preds = out["predictions"] if isinstance(out, dict) else out
    assert len(preds) == 2
    assert all(tuple(p.pred_sem_seg.data.shape[-2:]) == (128, 160) for p in preds)
    assert len(list(Path(tmp_path).rglob("*.png"))) + len(list(Path(tmp_path).rglob("*.jpg"))) >= 2


def test_vilseg_infer_tool_api(tmp_path):
    """tools/infer.py's library path: folder in, colour masks and overlays out, sliding windows over the image."""
    import cv2
    import numpy as np

    from vilseg.apis import infer_images, init_segmentor

    root = ensure_mini_ade()
    frames = tmp_path / "frames"
    frames.mkdir()
    src = sorted((root / "images" / "validation").glob("*.jpg"))[:2]
    for i, p in enumerate(src):  # a "video frame folder": natural order frame_2 < frame_10
        (frames / f"frame_{[2, 10][i]}.jpg").write_bytes(p.read_bytes())
    model = init_segmentor(MINI_CONFIG, None, device="cpu", cfg_options=dict(TINY), native_resolution=True)
    assert model.cfg.model.test_cfg.mode == "slide"
    records = infer_images(model, str(frames), str(tmp_path / "out"), save_labels=True, progress=False)
    assert [Path(r["input"]).name for r in records] == ["frame_2.jpg", "frame_10.jpg"]
    for rec in records:
        mask, ov, lab = (cv2.imread(rec[k], cv2.IMREAD_UNCHANGED) for k in ("mask", "overlay", "labels"))
        assert lab.shape == (128, 160)
        for picture in (mask, ov):  # the picture, then its colour key, the same on both
            assert picture.shape[0] == 128 and picture.shape[1] > 160
        assert np.array_equal(mask[:, 160:], ov[:, 160:])
        palette = np.asarray(model.dataset_meta["palette"], np.uint8)
        # the mask's colours are the palette entries of the predicted labels
        assert np.array_equal(cv2.cvtColor(mask[:, :160], cv2.COLOR_BGR2RGB), palette[lab])
        key = cv2.cvtColor(ov[:, 160:], cv2.COLOR_BGR2RGB)
        top = int(np.bincount(lab.ravel()).argmax())  # the largest class's swatch is the first row's colour
        assert (key == palette[top]).all(-1).sum() > 20
    plain = infer_images(model, str(frames), str(tmp_path / "plain"), progress=False, legend=False)
    assert all(cv2.imread(r[k]).shape == (128, 160, 3) for r in plain for k in ("mask", "overlay"))
    with pytest.raises(ValueError, match="no images"):
        infer_images(model, str(tmp_path / "out" / "masks" / ".."), str(tmp_path / "o2"), progress=False)


def test_gaussian_window_blending_leaves_no_seams():
    """Windows that disagree (here each window answers its own index as logits) leave a step where a window ends
    under mmseg's equal weights; the Gaussian blend changes smoothly across every window border. On windows that
    agree both blends give the same logits."""
    from vilseg.apis import init_segmentor

    height, width = 128, 300  # the mini config's crop 128, stride 85: windows start at x = 0, 85, 170, 172
    x = torch.randn(1, 3, height, width)
    metas = [dict(img_shape=(height, width), ori_shape=(height, width))]
    steps, agree = {}, {}
    for blend in ("mean", "gaussian"):
        options = {**TINY, "model.test_cfg.crop_size": (128, 128), "model.test_cfg.stride": (85, 85)}
        model = init_segmentor(MINI_CONFIG, None, cfg_options=options, blend=blend).eval()
        seen = []

        def window_index(crop, _metas, seen=seen):
            seen.append(1)
            return torch.full((1, model.out_channels, *crop.shape[-2:]), float(len(seen)))

        model.encode_decode = window_index
        logits = model.slide_inference(x, metas)
        assert len(seen) == 4
        steps[blend] = float((logits[..., 1:] - logits[..., :-1]).abs().max())
        model.encode_decode = lambda crop, _m: torch.ones(1, model.out_channels, *crop.shape[-2:])
        agree[blend] = model.slide_inference(x, metas)
    assert steps["mean"] >= 0.5, steps  # window 1 ends at x = 128: 1.5 (mean of windows 1, 2) -> 2 (window 2)
    assert steps["gaussian"] < 0.25 * steps["mean"], steps
    torch.testing.assert_close(agree["gaussian"], agree["mean"])


def test_ade_configs_train_in_mixed_precision_on_cuda_and_fp32_on_cpu(monkeypatch):
    """The shipped recipe's optimizer wrapper: mmengine's AmpOptimWrapper where CUDA is present (bf16 where
    supported, else fp16 with a dynamic loss scale), mmengine's plain OptimWrapper on a CPU machine."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper, build_optim_wrapper

    cfg = _load("configs/vil_upernet_ade20k.py")
    assert cfg.optim_wrapper.type == "AmpOnCudaOptimWrapper" and cfg.optim_wrapper.dtype == "auto"
    model = torch.nn.Module()
    model.backbone = _build(cfg).backbone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(cpu) is OptimWrapper
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(amp_module, "is_cuda_available", lambda: True)
    for bf16, expected in ((False, torch.float16), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        with warnings.catch_warnings():  # GradScaler on a CPU-only torch warns that it disables itself
            warnings.simplefilter("ignore")
            gpu = build_optim_wrapper(model, cfg.optim_wrapper)
        assert isinstance(gpu, AmpOptimWrapper) and gpu.cast_dtype == expected
        assert gpu.optimizer.param_groups[0]["lr_scale"] > 0  # the layer-decay groups are still there
