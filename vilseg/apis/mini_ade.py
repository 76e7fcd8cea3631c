"""A small synthetic dataset in ADE20K's format (``ADEChallengeData2016``), generated from a fixed seed.

The images are not noise: each one is a little outdoor scene painted from a label map. A horizon splits sky
from the ground; the ground is cut into bands of grass, road and water by wavy boundaries; buildings, trees,
cars and persons stand on it; a few clutter patches are labelled 0 ("other", ignored with
``reduce_zero_label=True``). Every class has its own texture (window grids, leaf speckle, grass streaks,
water ripples, lane marks, wheels, ...) and a colour that varies from image to image, so a segmentation model
has to learn shape and texture, not one fixed colour per class (mmseg's ``PhotoMetricDistortion`` shifts
hue and saturation anyway).

Layout written (the one mmseg's ``ADE20KDataset`` reads)::

    <root>/images/training/ADE_train_00000001.jpg      RGB, H x W
    <root>/images/validation/ADE_val_00000001.jpg
    <root>/annotations/training/ADE_train_00000001.png  uint8 single channel, 0 = other, 1..150 = ADE classes
    <root>/annotations/validation/ADE_val_00000001.png

Label values are ADE20K's 1-based class indices (``ADE20KDataset.METAINFO['classes'][value - 1]``), so the
same 150-class heads, metrics and palettes work unchanged.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["MINI_ADE_CLASSES", "MiniADESpec", "render_scene", "generate_mini_ade", "mini_ade_exists"]

# ADE20K 1-based label value -> name (checked against mmseg's ADE20KDataset.METAINFO in the tests).
MINI_ADE_CLASSES: Dict[int, str] = {
    2: "building",
    3: "sky",
    5: "tree",
    7: "road",
    10: "grass",
    13: "person",
    21: "car",
    22: "water",
}
SKY, BUILDING, TREE, ROAD, GRASS, PERSON, CAR, WATER = 3, 2, 5, 7, 10, 13, 21, 22
OTHER = 0

SPLITS = {"training": "train", "validation": "val"}


@dataclass(frozen=True)
class MiniADESpec:
    """What to generate: ``num_train`` / ``num_val`` scenes of ``height`` x ``width`` pixels from ``seed``."""

    num_train: int = 48
    num_val: int = 12
    height: int = 128
    width: int = 160
    seed: int = 2024
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if self.height < 32 or self.width < 32:
            raise ValueError(f"height and width must be >= 32 pixels, got {self.height}x{self.width}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


# ----------------------------------------------------------------------------------------------- label map
def _wavy_boundary(rng: np.random.Generator, width: int, base: float, amp: float) -> np.ndarray:
    """Row of a boundary for every column: base + a sum of two random sinusoids, shape (width,)."""
    x = np.arange(width, dtype=np.float64)
    y = np.full(width, base)
    for _ in range(2):
        period = rng.uniform(0.5, 2.0) * width
        y += rng.uniform(0.3, 1.0) * amp * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    return y


def _layout(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, List[tuple]]:
    """Paint a scene's label map, (h, w) uint8 with values in {0} | MINI_ADE_CLASSES, and list the details drawn
    over the textures afterwards (car windows and wheels, faces) as (kind, *cv2 arguments, RGB colour)."""
    label = np.full((h, w), SKY, np.uint8)
    decorations: List[tuple] = []
    rows = np.arange(h)[:, None]
    horizon = _wavy_boundary(rng, w, rng.uniform(0.35, 0.55) * h, 0.03 * h)

    # ground: 1-3 bands below the horizon, each grass / road / water, split by wavy boundaries
    n_bands = int(rng.integers(1, 4))
    kinds = rng.choice([GRASS, ROAD, WATER], size=n_bands, replace=n_bands > 3)
    cuts = np.sort(rng.uniform(0.0, 1.0, size=n_bands - 1))
    top = horizon
    for b, kind in enumerate(kinds):
        if b < n_bands - 1:
            frac = cuts[b]
            bottom = _wavy_boundary(rng, w, horizon.mean() + frac * (h - horizon.mean()), 0.05 * h)
        else:
            bottom = np.full(w, float(h))
        band = (rows >= top[None, :]) & (rows < bottom[None, :])
        label[band] = kind
        top = np.maximum(bottom, top)
    ground_top = int(horizon.min())

    # buildings standing on the horizon
    for _ in range(int(rng.integers(0, 4))):
        bw = int(rng.uniform(0.12, 0.3) * w)
        x0 = int(rng.integers(-bw // 2, w - bw // 2))
        height = rng.uniform(0.2, 0.45) * h
        base = int(horizon[np.clip(x0 + bw // 2, 0, w - 1)]) + 2
        y0 = int(max(1, base - height))
        cv2.rectangle(label, (x0, y0), (x0 + bw, base), int(BUILDING), thickness=-1)
        if rng.random() < 0.5:  # a pitched roof
            roof = np.array([[x0, y0], [x0 + bw, y0], [x0 + bw // 2, int(y0 - 0.3 * bw)]], np.int32)
            cv2.fillPoly(label, [roof], int(BUILDING))

    # trees: a trunk and a crown of overlapping discs
    for _ in range(int(rng.integers(0, 4))):
        cx = int(rng.integers(0, w))
        base = int(horizon[cx]) + int(rng.integers(0, max(1, h // 10)))
        r = int(rng.uniform(0.07, 0.14) * h)
        trunk_h = int(1.2 * r)
        cv2.rectangle(label, (cx - max(1, r // 5), base - trunk_h), (cx + max(1, r // 5), base), int(TREE), -1)
        for _ in range(int(rng.integers(3, 6))):
            ox, oy = rng.normal(0, 0.5 * r, size=2)
            cv2.circle(label, (int(cx + ox), int(base - trunk_h - r * 0.6 + oy)), int(r * rng.uniform(0.6, 1.0)),
                       int(TREE), -1)

    # cars on the ground: a body, a cabin with dark windows and two black wheels (all labelled car)
    for _ in range(int(rng.integers(0, 3))):
        cw = int(rng.uniform(0.22, 0.38) * w)
        ch = max(6, int(0.38 * cw))
        x0 = int(rng.integers(-cw // 4, max(1, w - 3 * cw // 4)))
        y1 = int(rng.uniform(max(ground_top + ch + 2, 0.55 * h), h + ch // 4))
        cv2.rectangle(label, (x0, y1 - ch), (x0 + cw, y1 - ch // 4), int(CAR), -1)
        cabin = ((x0 + cw // 4, y1 - ch - ch // 2), (x0 + 3 * cw // 4, y1 - ch))
        cv2.rectangle(label, cabin[0], cabin[1], int(CAR), -1)
        decorations.append(("rect", (cabin[0][0] + 2, cabin[0][1] + 2), (cabin[1][0] - 2, cabin[1][1]),
                            (40, 50, 60)))
        for wx in (x0 + cw // 5, x0 + 4 * cw // 5):
            r = max(2, ch // 3)
            cv2.circle(label, (wx, y1 - ch // 4), r, int(CAR), -1)
            decorations.append(("circle", (wx, y1 - ch // 4), r, (15, 15, 15)))

    # persons: skin-coloured head, striped torso, legs
    for _ in range(int(rng.integers(0, 3))):
        ph = int(rng.uniform(0.28, 0.45) * h)
        px = int(rng.integers(4, w - 4))
        y1 = int(rng.uniform(max(ground_top + ph, 0.55 * h), h + ph // 6))
        head = max(3, ph // 9)
        half = max(3, ph // 6)
        cv2.circle(label, (px, y1 - ph + head), head, int(PERSON), -1)
        cv2.rectangle(label, (px - half, y1 - ph + 2 * head), (px + half, y1 - ph // 2 + 2), int(PERSON), -1)
        leg = max(2, ph // 10)
        cv2.line(label, (px - half // 2, y1 - ph // 2), (px - half // 2 - 2, y1), int(PERSON), leg)
        cv2.line(label, (px + half // 2, y1 - ph // 2), (px + half // 2 + 2, y1), int(PERSON), leg)
        skin = tuple(float(v) for v in _jitter(rng, (225, 180, 150), 25))
        decorations.append(("circle", (px, y1 - ph + head), head, skin))

    # clutter labelled "other" (0): ignored in training and evaluation after reduce_zero_label
    for _ in range(int(rng.integers(0, 3))):
        n = int(rng.integers(3, 6))
        c = rng.uniform([0, 0], [w, h])
        pts = (c + rng.normal(0, 0.06 * min(h, w), size=(n, 2))).astype(np.int32)
        cv2.fillPoly(label, [pts], int(OTHER))
    return label, decorations


# ----------------------------------------------------------------------------------------------- textures
def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float = 25.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float64) + rng.uniform(-amount, amount, size=3), 0, 255)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (h, w): random values on a coarse grid, bicubically upsampled."""
    coarse = rng.uniform(-1, 1, size=(max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), -1, 1).astype(np.float64)


def _textures(rng: np.random.Generator, h: int, w: int, label: np.ndarray) -> Dict[int, np.ndarray]:
    """One full-frame RGB float texture per label value, each (h, w, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fine = rng.normal(0, 1, size=(h, w))
    tex: Dict[int, np.ndarray] = {}

    # sky: vertical gradient from a blue to a pale tone, soft clouds
    top, bottom = _jitter(rng, (70, 130, 220), 30), _jitter(rng, (190, 215, 240), 15)
    t = (yy / h)[..., None]
    clouds = np.clip(_smooth_noise(rng, h, w, 24), 0, 1)[..., None]
    tex[SKY] = (1 - t) * top + t * bottom + clouds * 60

    # building: flat wall with a regular grid of dark windows
    wall = _jitter(rng, (170, 150, 130), 40)
    period_x, period_y = int(rng.integers(6, 10)), int(rng.integers(7, 11))
    windows = ((xx % period_x) < period_x // 2) & ((yy % period_y) < period_y // 2)
    tex[BUILDING] = wall + 4 * fine[..., None] - 90 * windows[..., None]

    # tree: dark green, strong leaf speckle
    leaf = _jitter(rng, (40, 105, 40), 20)
    speckle = cv2.GaussianBlur(rng.normal(0, 1, size=(h, w)).astype(np.float32), (0, 0), 0.8)
    tex[TREE] = leaf + 45 * speckle[..., None] * np.array([0.6, 1.0, 0.5])

    # grass: lighter green with fine vertical streaks
    streaks = np.tile(rng.normal(0, 1, size=(1, w)), (h, 1)) + 0.3 * fine
    tex[GRASS] = _jitter(rng, (95, 170, 60), 25) + 22 * streaks[..., None] * np.array([0.5, 1.0, 0.4])

    # road: dark grey asphalt, fine grain, a dashed light lane line
    asphalt = _jitter(rng, (80, 80, 85), 15)
    lane_y = rng.uniform(0.6, 0.9) * h
    lane = (np.abs(yy - lane_y) < 1.5) & ((xx % 16) < 9)
    tex[ROAD] = asphalt + 8 * fine[..., None] + 140 * lane[..., None]

    # water: blue with horizontal ripples
    ripple = np.sin(2 * np.pi * yy / rng.uniform(3.0, 5.0) + 0.6 * _smooth_noise(rng, h, w, 16) * np.pi)
    tex[WATER] = _jitter(rng, (40, 90, 160), 25) + 35 * ripple[..., None] * np.array([0.4, 0.7, 1.0])

    # car: saturated paint with a darker lower half (wheels / shadow), glossy highlight
    paint = np.zeros(3)
    paint[rng.integers(0, 3)] = rng.uniform(170, 240)
    paint += rng.uniform(0, 60, size=3)
    gloss = np.clip(_smooth_noise(rng, h, w, 8), 0, 1)[..., None] * 50
    tex[CAR] = paint + gloss + 3 * fine[..., None]

    # person: clothes of two colours in bold horizontal stripes
    cloth_a, cloth_b = rng.uniform(20, 235, size=3), rng.uniform(20, 235, size=3)
    stripes = (((yy + rng.integers(0, 6)) // 3) % 2)[..., None]
    tex[PERSON] = stripes * cloth_a + (1 - stripes) * cloth_b

    # other: a magenta/yellow checkerboard clutter
    checker = (((xx // 3) + (yy // 3)) % 2)[..., None]
    tex[OTHER] = checker * _jitter(rng, (220, 60, 200), 30) + (1 - checker) * _jitter(rng, (230, 210, 60), 30)
    return {k: np.clip(v, 0, 255) for k, v in tex.items()}


def render_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Returns:
        image: (height, width, 3) uint8 RGB.
        label: (height, width) uint8, 0 = other, else an ADE20K class index from ``MINI_ADE_CLASSES``.
    """
    label, decorations = _layout(rng, height, width)
    textures = _textures(rng, height, width, label)
    image = np.zeros((height, width, 3), np.float64)
    for value, tex in textures.items():
        mask = label == value
        image[mask] = tex[mask]
    for kind, *args in decorations:  # details inside objects (the label map already covers them)
        if kind == "rect":
            cv2.rectangle(image, args[0], args[1], args[2], -1)
        else:
            cv2.circle(image, args[0], args[1], args[2], -1)
    # a little global light variation and sensor noise
    image *= 1.0 + 0.15 * _smooth_noise(rng, height, width, 48)[..., None]
    image += rng.normal(0, 3, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


# ----------------------------------------------------------------------------------------------- files
def _expected_files(root: str, spec: MiniADESpec) -> List[str]:
    files = []
    for split, short in SPLITS.items():
        n = spec.num_train if split == "training" else spec.num_val
        for i in range(1, n + 1):
            files.append(osp.join(root, "images", split, f"ADE_{short}_{i:08d}.jpg"))
            files.append(osp.join(root, "annotations", split, f"ADE_{short}_{i:08d}.png"))
    return files


def mini_ade_exists(root: str, spec: Optional[MiniADESpec] = None) -> bool:
    """True when every image and annotation file that ``generate_mini_ade(root, spec)`` writes is present."""
    return all(osp.isfile(f) for f in _expected_files(root, spec or MiniADESpec()))


def generate_mini_ade(root: str, spec: Optional[MiniADESpec] = None, overwrite: bool = False,
                      progress: bool = True) -> Dict[str, int]:
    """Write the mini dataset under ``root`` (an ``ADEChallengeData2016`` folder).

    The same ``spec`` (seed included) always gives the same label maps and image pixels before JPEG encoding;
    scene ``i`` of a split depends only on (seed, split, i), so growing ``num_train`` keeps the first scenes.

    Args:
        root: output folder; ``images/{training,validation}`` and ``annotations/{...}`` are created in it.
        spec: sizes and seed (defaults: 48 train / 12 val scenes of 128 x 160 pixels, seed 2024).
        overwrite: rewrite files that already exist (otherwise they are kept).
        progress: show a progress bar.

    Returns:
        dict with the number of files written and kept per split, and the pixel count per label value.
    """
    spec = spec or MiniADESpec()
    if osp.exists(root) and not osp.isdir(root):
        raise ValueError(f"mini ADE root {root!r} exists and is not a directory")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    stats: Dict[str, int] = {"written": 0, "kept": 0}
    counts = np.zeros(256, np.int64)
    jobs = [(split, i) for split in SPLITS for i in range(
        1, (spec.num_train if split == "training" else spec.num_val) + 1)]
    it = tqdm(jobs, desc="mini ADE20K", unit="img", disable=not progress) if tqdm else jobs
    for split, i in it:
        short = SPLITS[split]
        img_path = osp.join(root, "images", split, f"ADE_{short}_{i:08d}.jpg")
        ann_path = osp.join(root, "annotations", split, f"ADE_{short}_{i:08d}.png")
        os.makedirs(osp.dirname(img_path), exist_ok=True)
        os.makedirs(osp.dirname(ann_path), exist_ok=True)
        rng = np.random.default_rng([spec.seed, list(SPLITS).index(split), i])
        image, label = render_scene(rng, spec.height, spec.width)
        counts += np.bincount(label.ravel(), minlength=256)
        if not overwrite and osp.isfile(img_path) and osp.isfile(ann_path):
            stats["kept"] += 1
            continue
        ok = cv2.imwrite(img_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                         [int(cv2.IMWRITE_JPEG_QUALITY), spec.jpeg_quality])
        ok = ok and cv2.imwrite(ann_path, label)
        if not ok:
            raise OSError(f"could not write {img_path} / {ann_path}")
        stats["written"] += 1
    meta = dict(spec=spec.__dict__, classes={str(k): v for k, v in MINI_ADE_CLASSES.items()},
                pixel_counts={str(k): int(counts[k]) for k in [OTHER, *sorted(MINI_ADE_CLASSES)]})
    with open(osp.join(root, "mini_ade.json"), "w") as f:
        json.dump(meta, f, indent=2)
    stats.update({f"pixels_{k}": int(counts[k]) for k in [OTHER, *sorted(MINI_ADE_CLASSES)]})
    return stats
