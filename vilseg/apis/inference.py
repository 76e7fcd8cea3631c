"""Inference behind ``tools/infer.py``: mmseg's ``init_model`` + ``inference_model`` over an image, a folder of
images or a folder of video frames, writing colour-coded masks and overlays.

Sliding-window inference: the vilseg configs test in mmseg's 'slide' mode (crop 512, stride 341 for ADE20K), so an
image larger than the crop is covered by overlapping crop-sized windows whose logits are averaged. By default
the image is first resized by the config's test pipeline (ADE20K: short side 512, as in training);
``native_resolution=True`` drops that resize and slides over the image at its own resolution.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import time
from typing import Dict, List, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from mmengine.config import Config

from .config import load_config, resolve_path

__all__ = ["IMAGE_EXTENSIONS", "init_segmentor", "collect_images", "colorize", "overlay", "predict_labels",
           "infer_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _natural_key(name: str):
    """Sort key that orders frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def collect_images(path: str) -> List[str]:
    """An image file -> [it]; a folder (of images or of video frames) -> its image files in natural order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not an image, or a folder without images.
    """
    if not osp.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    if osp.isfile(path):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    files = sorted((f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not files:
        raise ValueError(f"{path}: folder has no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return [osp.join(path, f) for f in files]


def _set_slide_mode(cfg: Config, native_resolution: bool) -> None:
    """Make sure the model tests in sliding-window mode; optionally drop the test pipeline's resize."""
    test_cfg = cfg.model.setdefault("test_cfg", {})
    if test_cfg.get("mode") != "slide":
        crop = test_cfg.get("crop_size") or cfg.model.get("data_preprocessor", {}).get("size") or (512, 512)
        crop = tuple(int(c) for c in crop)
        test_cfg.update(mode="slide", crop_size=crop, stride=tuple(max(1, 2 * c // 3) for c in crop))
    if native_resolution:
        for key in ("test_pipeline",):
            if key in cfg:
                cfg[key] = [t for t in cfg[key] if t.get("type") not in ("Resize", "RandomResize")]
        cfg.test_dataloader.dataset.pipeline = [
            t for t in cfg.test_dataloader.dataset.pipeline if t.get("type") not in ("Resize", "RandomResize")]


def init_segmentor(config: Union[str, Config], checkpoint: Optional[str] = None, device: str = "cpu",
                   cfg_options: Optional[dict] = None, native_resolution: bool = False) -> torch.nn.Module:
    """``mmseg.apis.init_model`` on a vilseg config (paths resolved from any directory, BN on CPU), in sliding-
    window test mode. Without a checkpoint (or one without class names), class names and palette come from the
    config's dataset (ADE20K for the vilseg configs)."""
    from mmseg.apis import init_model
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    _set_slide_mode(cfg, native_resolution)
    if checkpoint is not None:
        checkpoint = resolve_path(checkpoint, "checkpoint")
    model = init_model(cfg, checkpoint, device=device)
    meta = getattr(model, "dataset_meta", None) or {}
    if checkpoint is None or not meta.get("classes") or len(meta["classes"]) != model.decode_head.num_classes:
        dataset_cls = DATASETS.get(cfg.test_dataloader.dataset.type)
        info = getattr(dataset_cls, "METAINFO", {}) if dataset_cls is not None else {}
        if len(info.get("classes", ())) == model.decode_head.num_classes:
            model.dataset_meta = dict(classes=tuple(info["classes"]), palette=[list(p) for p in info["palette"]])
    return model


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB with ``palette[c]`` per class (values outside -> black)."""
    lut = np.zeros((256, 3), np.uint8)
    pal = np.asarray(palette, np.uint8)[:256]
    lut[:len(pal)] = pal
    return lut[np.clip(labels, 0, 255).astype(np.uint8)] * (labels < len(pal))[..., None].astype(np.uint8)


def overlay(image_rgb: np.ndarray, mask_rgb: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an image, both (H, W, 3) uint8 RGB -> (H, W, 3) uint8."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if image_rgb.shape != mask_rgb.shape:
        raise ValueError(f"image {image_rgb.shape} and mask {mask_rgb.shape} shapes differ")
    out = image_rgb.astype(np.float32) * (1 - opacity) + mask_rgb.astype(np.float32) * opacity
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def predict_labels(model: torch.nn.Module, image: Union[str, np.ndarray]) -> np.ndarray:
    """Run ``mmseg.apis.inference_model`` on an image path (or a BGR array); returns (H, W) int64 class indices at
    the image's original size."""
    from mmseg.apis import inference_model

    result = inference_model(model, image)
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)


def infer_images(model: torch.nn.Module, inputs: Union[str, Sequence[str]], out_dir: str, opacity: float = 0.5,
                 save_labels: bool = False, progress: bool = True) -> List[Dict[str, object]]:
    """Segment images and write, per input ``name.ext``: ``out_dir/masks/name.png`` (colour-coded classes),
    ``out_dir/overlays/name.png`` (mask over image) and, with ``save_labels``, ``out_dir/labels/name.png``
    (uint8 class indices 0..num_classes-1).

    Args:
        inputs: an image, a folder of images / video frames, or a list of image paths.

    Returns:
        one record per image: input, mask, overlay, (label), height, width, seconds, classes (pixel counts).
    """
    from tqdm import tqdm

    paths = collect_images(inputs) if isinstance(inputs, str) else [p for i in inputs for p in collect_images(i)]
    palette = model.dataset_meta["palette"]
    dirs = {k: osp.join(out_dir, k) for k in (("masks", "overlays", "labels") if save_labels else
                                                ("masks", "overlays"))}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    records = []
    for path in tqdm(paths, desc="segmenting", unit="img", disable=not progress):
        image_bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if image_bgr is None:
            raise ValueError(f"{path}: cannot decode image")
        start = time.perf_counter()
        labels = predict_labels(model, path)
        seconds = time.perf_counter() - start
        mask = colorize(labels, palette)
        name = osp.splitext(osp.basename(path))[0] + ".png"
        rec: Dict[str, object] = dict(input=path, mask=osp.join(dirs["masks"], name),
                                      overlay=osp.join(dirs["overlays"], name), height=labels.shape[0],
                                      width=labels.shape[1], seconds=seconds,
                                      classes=dict(zip(*np.unique(labels, return_counts=True))))
        cv2.imwrite(rec["mask"], cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
        ov = overlay(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), mask, opacity)
        cv2.imwrite(rec["overlay"], cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        if save_labels:
            rec["labels"] = osp.join(dirs["labels"], name)
            cv2.imwrite(rec["labels"], labels.astype(np.uint8))
        records.append(rec)
    return records
