"""Inference behind ``tools/infer.py``: mmseg's ``init_model`` + ``inference_model`` over an image, a folder of
images or a folder of video frames, writing colour-coded masks and overlays.

Sliding-window inference: the vilseg configs test in mmseg's 'slide' mode (crop 512, stride 341 for ADE20K), so an
image larger than the crop is covered by overlapping crop-sized windows. mmseg averages their logits with equal
weights, which leaves a visible step wherever a window ends; :func:`init_segmentor` instead blends them with
Gaussian weights that fall off towards each window's border (``blend='gaussian'``, the weighting MONAI's
sliding-window inferer uses on the 3D side), so predictions change smoothly across window borders.
``blend='mean'`` keeps mmseg's behaviour (``tools/test.py`` always evaluates with it). By default the image is
first resized by the config's test pipeline (ADE20K: short side 512, as in training); ``native_resolution=True``
drops that resize and slides over the image at its own resolution.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import sys
import time
import types
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from mmengine.config import Config

from .config import load_config, resolve_path

__all__ = ["IMAGE_EXTENSIONS", "MIN_SIDE", "MAX_ASPECT", "BLENDS", "window_weights", "gaussian_slide_inference",
           "init_segmentor", "collect_images", "colorize", "overlay",
           "read_image", "padded_shape", "pad_for_inference", "legend_panel", "predict_labels", "infer_images"]

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


BLENDS = ("gaussian", "mean")
SIGMA_SCALE = 0.125  # Gaussian sigma per crop side, as MONAI's sliding-window inferer uses


def window_weights(h: int, w: int, flat: Tuple[bool, bool, bool, bool] = (False,) * 4, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """(1, 1, h, w) weights of one sliding window's logits: a Gaussian centred on the window (sigma ``SIGMA_SCALE``
    times each side), 1 at the centre, clamped away from 0. ``flat`` = (top, bottom, left, right): on a side that
    touches the image border the weight stays 1 from the centre outwards, because no other window covers those
    pixels better (otherwise two windows both tapered near a border would mix with comparable, tiny weights)."""
    axes = []
    for n, (low, high) in ((h, flat[:2]), (w, flat[2:])):
        t = torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2.0
        if low:
            t = t.clamp_min(0)
        if high:
            t = t.clamp_max(0)
        axes.append(torch.exp(-0.5 * (t / max(SIGMA_SCALE * n, 1e-3)) ** 2))
    return (axes[0][:, None] * axes[1][None, :]).clamp_min(1e-6)[None, None]


def gaussian_slide_inference(self, inputs: torch.Tensor, batch_img_metas: List[dict]) -> torch.Tensor:
    """mmseg's ``EncoderDecoder.slide_inference`` (same windows: ``test_cfg.crop_size`` and ``stride``, the last
    window flush with the border) with the windows' logits blended by :func:`window_weights` instead of averaged
    with equal weights. Bound to a model instance by :func:`init_segmentor`; (N, C, H, W) -> (N, classes, H, W)."""
    import torch.nn.functional as F

    h_stride, w_stride = self.test_cfg.stride
    h_crop, w_crop = self.test_cfg.crop_size
    batch, _, h_img, w_img = inputs.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch, self.out_channels, h_img, w_img))
    weight_sum = inputs.new_zeros((batch, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop = inputs[:, :, y1:y2, x1:x2]
            batch_img_metas[0]["img_shape"] = crop.shape[2:]
            weights = window_weights(y2 - y1, x2 - x1, (y1 == 0, y2 == h_img, x1 == 0, x2 == w_img),
                                     inputs.device, preds.dtype)
            logits = self.encode_decode(crop, batch_img_metas)
            preds += F.pad(logits * weights, (x1, w_img - x2, y1, h_img - y2))
            weight_sum[:, :, y1:y2, x1:x2] += weights[0]
    return preds / weight_sum


def init_segmentor(config: Union[str, Config], checkpoint: Optional[str] = None, device: str = "cpu",
                   cfg_options: Optional[dict] = None, native_resolution: bool = False,
                   allow_partial: bool = False, blend: str = "gaussian") -> torch.nn.Module:
    """``mmseg.apis.init_model`` on a vilseg config (paths resolved from any directory, BN on CPU), in sliding-
    window test mode, the windows blended as ``blend`` says ('gaussian': :func:`gaussian_slide_inference`;
    'mean': mmseg's equal weights). The checkpoint must fit the model exactly (a checkpoint of another model is an error
    naming both); ``allow_partial`` loads the tensors that fit and prints what was left out. Without a checkpoint
    (or one without class names), class names and palette come from the config's dataset (ADE20K for the vilseg
    configs).

    Raises:
        FileNotFoundError, UnsafeCheckpointError, CheckpointMismatchError (a ValueError).
    """
    from mmseg.apis import init_model
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from vilseg.utils.checkpoint import check_fits, describe_model, safe_load

    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    register_all_modules(init_default_scope=False)
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    _set_slide_mode(cfg, native_resolution)
    ckpt = None
    if checkpoint is not None:
        checkpoint = resolve_path(checkpoint, "checkpoint")
        ckpt = safe_load(checkpoint, map_location="cpu")
    model = init_model(cfg, None, device=device)
    if blend == "gaussian" and hasattr(model, "slide_inference"):
        model.slide_inference = types.MethodType(gaussian_slide_inference, model)  # this model only
    meta = {}
    if ckpt is not None:
        name = f"the model of {cfg.filename or 'the config'} ({describe_model(model)})"
        state, partial = check_fits(model, ckpt, checkpoint, name, allow_partial=allow_partial)
        model.load_state_dict(state, strict=partial is None)
        if partial:
            print(f"warning: {partial}", file=sys.stderr)
        meta = dict((ckpt.get("meta") or {}).get("dataset_meta") or {}) if isinstance(ckpt, dict) else {}
        if meta.get("classes"):
            model.dataset_meta = meta
    if not meta.get("classes") or len(meta["classes"]) != model.decode_head.num_classes:
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


# smallest side and most elongated aspect that inference takes as is; smaller or thinner images are padded (and
# the prediction cropped back): a side under two stride-32 feature cells, or one that a keep-ratio resize would
# shrink below a pixel, cannot go through the pyramid decoders
MIN_SIDE = 64
MAX_ASPECT = 8


def padded_shape(h: int, w: int) -> Tuple[int, int]:
    """(H, W) an h x w image is padded to for inference: each side at least ``MIN_SIDE`` and at least the longer
    side / ``MAX_ASPECT``."""
    need = max(MIN_SIDE, -(-max(h, w) // MAX_ASPECT))
    return max(h, need), max(w, need)


def pad_for_inference(image_bgr: np.ndarray) -> np.ndarray:
    """Zero-pad an (H, W, 3) image at the bottom / right to :func:`padded_shape`; an image within those bounds is
    returned unchanged."""
    h, w = image_bgr.shape[:2]
    ph, pw = padded_shape(h, w)
    if (ph, pw) == (h, w):
        return image_bgr
    return cv2.copyMakeBorder(image_bgr, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)


def read_image(path: str) -> Tuple[np.ndarray, List[str]]:
    """(H, W, 3) uint8 BGR image as mmseg's loader reads it, and notes on doubtful content (constant image, a
    16-bit file holding fewer bits, grayscale).

    Raises:
        ValueError: naming the file when it cannot be decoded or is empty.
    """
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ValueError(f"{path}: cannot decode image (not a readable {', '.join(IMAGE_EXTENSIONS)} file)")
    notes = []
    if raw.dtype == np.uint16:
        top = int(raw.max())
        bits = max(1, top.bit_length())
        if bits < 16:
            notes.append(f"16-bit file whose values reach only {top} ({bits}-bit data): it is read as 16-bit "
                         f"and scaled to 8 bits, so it looks dark; rescale it to the full range first")
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] == 1):
        notes.append("grayscale image: its channel is repeated as R, G and B")
    if raw.size and int(raw.min()) == int(raw.max()):
        notes.append(f"constant image (every pixel {int(raw.min())}): the prediction carries no information")
    # decoded a second time by OpenCV itself, so that the colour image is exactly what mmseg's loader sees
    # (bit-depth reduction, channel expansion, EXIF orientation)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot decode image as colour")
    return image, notes


def legend_panel(labels: np.ndarray, classes: Sequence[str], palette: Sequence[Sequence[int]],
                 height: int) -> np.ndarray:
    """A colour key for an overlay: (height, W, 3) uint8 RGB, one swatch and class name per class present in
    ``labels``, the largest first (as many as fit; the last row says how many more there are)."""
    ids, counts = np.unique(labels, return_counts=True)
    order = [int(i) for i in ids[np.argsort(-counts, kind="stable")]]
    row = int(np.clip(height // 12, 14, 28))
    scale, font = row / 34.0, cv2.FONT_HERSHEY_SIMPLEX
    fit = max(1, height // row)
    shown = order if len(order) <= fit else order[:fit - 1]
    share = dict(zip(ids.tolist(), (100.0 * counts / labels.size).tolist()))
    texts = [f"{str(classes[c]).strip() if c < len(classes) else c} {share[c]:.0f}%" for c in shown]
    if len(shown) < len(order):
        texts.append(f"+{len(order) - len(shown)} more")
    width = max(cv2.getTextSize(t, font, scale, 1)[0][0] for t in texts) + row + 12
    panel = np.full((height, width, 3), 255, np.uint8)
    for k, text in enumerate(texts):
        y = k * row
        if k < len(shown):
            colour = tuple(int(v) for v in palette[shown[k]]) if shown[k] < len(palette) else (0, 0, 0)
            cv2.rectangle(panel, (4, y + 2), (row - 2, y + row - 3), colour, thickness=-1)
            cv2.rectangle(panel, (4, y + 2), (row - 2, y + row - 3), (0, 0, 0), thickness=1)
        cv2.putText(panel, text, (row + 4, y + row - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def predict_labels(model: torch.nn.Module, image: Union[str, np.ndarray]) -> np.ndarray:
    """Run ``mmseg.apis.inference_model`` on an image path (or a BGR array); returns (H, W) int64 class indices at
    the image's original size. Images smaller or thinner than the decoders take are padded first (see
    :func:`pad_for_inference`) and the padding is cropped from the result."""
    from mmseg.apis import inference_model

    if isinstance(image, str):
        image, _ = read_image(image)
    h, w = image.shape[:2]
    padded = pad_for_inference(image)
    result = inference_model(model, padded)
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)[:h, :w]


def infer_images(model: torch.nn.Module, inputs: Union[str, Sequence[str]], out_dir: str, opacity: float = 0.5,
                 save_labels: bool = False, progress: bool = True, legend: bool = True) -> List[Dict[str, object]]:
    """Segment images and write, per input ``name.ext``: ``out_dir/masks/name.png`` (colour-coded classes) and
    ``out_dir/overlays/name.png`` (mask over image), each with a colour key of the classes present on its right
    (``legend=False``: the image alone, as large as the input), and, with ``save_labels``,
    ``out_dir/labels/name.png`` (uint8 class indices 0..num_classes-1, the exact prediction). A file that cannot be
    read does not stop the run: its record has an ``error`` and the other files are processed.

    Args:
        inputs: an image, a folder of images / video frames, or a list of image paths.

    Returns:
        one record per image: input, mask, overlay, (label), height, width, seconds, classes (pixel counts),
        notes (doubtful content, e.g. a constant image); or input, error for a file that failed.
    """
    from tqdm import tqdm

    paths = collect_images(inputs) if isinstance(inputs, str) else [p for i in inputs for p in collect_images(i)]
    palette, classes = model.dataset_meta["palette"], model.dataset_meta["classes"]
    dirs = {k: osp.join(out_dir, k) for k in (("masks", "overlays", "labels") if save_labels else
                                                ("masks", "overlays"))}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    records: List[Dict[str, object]] = []
    for path in tqdm(paths, desc="segmenting", unit="img", disable=not progress):
        try:
            image_bgr, notes = read_image(path)
        except ValueError as err:
            records.append(dict(input=path, error=str(err)))
            continue
        padded = padded_shape(*image_bgr.shape[:2])
        if padded != image_bgr.shape[:2]:
            notes.append(f"{image_bgr.shape[0]}x{image_bgr.shape[1]} px, padded to {padded[0]}x{padded[1]} for "
                         f"inference (under {MIN_SIDE} px a side or thinner than 1:{MAX_ASPECT}); the mask is "
                         f"cropped back")
        start = time.perf_counter()
        labels = predict_labels(model, image_bgr)
        seconds = time.perf_counter() - start
        mask = colorize(labels, palette)
        name = osp.splitext(osp.basename(path))[0] + ".png"
        rec: Dict[str, object] = dict(input=path, mask=osp.join(dirs["masks"], name),
                                      overlay=osp.join(dirs["overlays"], name), height=labels.shape[0],
                                      width=labels.shape[1], seconds=seconds, notes=notes,
                                      classes=dict(zip(*np.unique(labels, return_counts=True))))
        ov = overlay(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), mask, opacity)
        if legend:
            key = legend_panel(labels, classes, palette, mask.shape[0])
            mask, ov = (np.concatenate([m, key], axis=1) for m in (mask, ov))
        cv2.imwrite(rec["mask"], cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
        cv2.imwrite(rec["overlay"], cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        if save_labels:
            rec["labels"] = osp.join(dirs["labels"], name)
            cv2.imwrite(rec["labels"], labels.astype(np.uint8))
        records.append(rec)
    return records
