"""vilseg's ColorJitter: torchvision's colour jitter semantics on mmseg's BGR uint8 images."""
import cv2
import numpy as np
import pytest

from vilseg.engine import ColorJitter


def _img(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)


def test_zero_strength_is_the_identity():
    img = _img()
    out = ColorJitter()(dict(img=img.copy()))["img"]
    assert np.array_equal(out, img)


def test_each_adjustment_does_what_torchvision_does():
    img = _img(1)
    x = img.astype(np.float32) / 255
    gray = x @ np.array([0.114, 0.587, 0.299], np.float32)
    np.random.seed(0)
    f = np.random.uniform(0.5, 1.5)
    np.random.seed(0)
    out = ColorJitter(brightness=0.5)(dict(img=img.copy()))["img"]
    assert np.abs(out.astype(int) - np.rint(np.clip(x * f, 0, 1) * 255).astype(int)).max() <= 1
    np.random.seed(0)
    out = ColorJitter(contrast=0.5)(dict(img=img.copy()))["img"]
    expected = np.clip(x * f + gray.mean() * (1 - f), 0, 1)
    assert np.abs(out.astype(int) - np.rint(expected * 255).astype(int)).max() <= 1
    np.random.seed(0)
    out = ColorJitter(saturation=0.5)(dict(img=img.copy()))["img"]
    expected = np.clip(x * f + gray[..., None] * (1 - f), 0, 1)
    assert np.abs(out.astype(int) - np.rint(expected * 255).astype(int)).max() <= 1


def test_hue_turns_the_colour_wheel():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 2] = 255  # BGR
    t = ColorJitter(hue=0.5)
    np.random.seed(3)
    shift = np.random.uniform(-0.5, 0.5)
    np.random.seed(3)
    out = t(dict(img=red.copy()))["img"]
    hue = cv2.cvtColor(out.astype(np.float32) / 255, cv2.COLOR_BGR2HSV)[0, 0, 0]
    assert abs(((hue - shift * 360) + 180) % 360 - 180) < 2  # red has hue 0: the output's hue is the shift


def test_bad_arguments_and_images():
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.6)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=-1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ColorJitter(brightness=0.5)(dict(img=np.zeros((4, 4), np.uint8), img_path="x.png"))


def test_shipped_pipeline_uses_it_and_runs(tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import TRANSFORMS

    from vilseg.apis import load_config

    cfg = load_config("configs/vil_upernet_ade20k.py")
    types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert "ColorJitter" in types and "PhotoMetricDistortion" not in types
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomResize"][0]
    assert resize.interpolation == "bicubic"
    init_default_scope("mmseg")
    img = _img(2)
    steps = [TRANSFORMS.build(t) for t in cfg.train_dataloader.dataset.pipeline[2:-1]]
    results = dict(img=img, gt_seg_map=np.zeros(img.shape[:2], np.uint8), seg_fields=["gt_seg_map"],
                   img_shape=img.shape[:2], ori_shape=img.shape[:2])
    for step in steps:
        results = step(results)
    assert max(results["img"].shape[:2]) <= 512 and results["img"].shape[2] == 3 and results["img"].dtype == np.uint8
