"""The ADE20K part of ``make demo``: train ``configs/demo/vil_upernet_ade20k_mini.py`` on the mini ADE20K set on
CPU, evaluate it (mIoU, per-class IoU), compare with a constant prediction, and draw a validation image.

    from vilseg.apis.demo import run_ade_demo
    summary = run_ade_demo()        # work_dirs/demo_ade/... under the working directory

Training reads the config's data (the embedded mini set of the checkout); when that is missing, the set is generated
under ``data/mini_ade/`` of the working directory, or in ``data_root`` when given. Nothing is written elsewhere.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import time
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np

from .config import DATALOADER_KEYS, iter_datasets, load_config

__all__ = ["MINI_CONFIG", "MINI_ROOT", "ensure_mini_ade", "load_gt", "constant_prediction_baseline", "save_panel",
           "run_ade_demo", "format_summary"]

MINI_CONFIG = "configs/demo/vil_upernet_ade20k_mini.py"
MINI_ROOT = Path("data") / "mini_ade" / "ADEChallengeData2016"   # relative to the working directory


def ensure_mini_ade(root: Path = MINI_ROOT) -> Path:
    """The mini ADE20K folder; generated (fixed seed) when files are missing."""
    from vilseg.apis.mini_ade import generate_mini_ade, mini_ade_exists

    if not mini_ade_exists(str(root)):
        print(f"generating the mini ADE20K set in {root}")
        generate_mini_ade(str(root))
    return Path(root)


def load_gt(seg_map_path: str) -> np.ndarray:
    """An ADE20K annotation as mmseg's ``LoadAnnotations(reduce_zero_label=True)`` loads it: (H, W) uint8,
    classes 0..149, 255 = ignored ("other")."""
    from mmseg.datasets.transforms import LoadAnnotations

    out = LoadAnnotations()(dict(seg_map_path=seg_map_path, reduce_zero_label=True, seg_fields=[]))
    return out["gt_seg_map"]


def _split_annotations(root: Path, split: str) -> List[str]:
    folder = Path(root) / "annotations" / split
    return sorted(str(p) for p in folder.glob("*.png"))


def constant_prediction_baseline(root: Path = MINI_ROOT, num_classes: int = 150) -> Dict[str, object]:
    """mIoU of predicting one class everywhere: the most frequent class of the training annotations, scored on
    the validation annotations with mmseg's own IoU functions (classes absent from both count as NaN, as in
    ``IoUMetric``)."""
    import torch
    from mmseg.evaluation.metrics import IoUMetric

    counts = np.zeros(256, np.int64)
    for path in _split_annotations(root, "training"):
        counts += np.bincount(load_gt(path).ravel(), minlength=256)
    counts[255] = 0
    cls = int(np.argmax(counts[:num_classes]))
    totals = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
    for path in _split_annotations(root, "validation"):
        gt = torch.from_numpy(load_gt(path).astype(np.int64))
        pred = torch.full_like(gt, cls)
        for acc, area in zip(totals, IoUMetric.intersect_and_union(pred, gt, num_classes, 255)):
            acc += area.double()
    metrics = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    return dict(class_index=cls, mIoU=float(np.nanmean(metrics["IoU"]) * 100),
                aAcc=float(metrics["aAcc"] * 100))


def save_panel(model, img_path: str, seg_map_path: Optional[str], out_path: str, opacity: float = 0.5) -> str:
    """Write ``image | ground truth | prediction overlay`` side by side (PNG); returns ``out_path``."""
    from .inference import colorize, overlay, predict_labels

    image = cv2.cvtColor(cv2.imread(img_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    palette = model.dataset_meta["palette"]
    pred = colorize(predict_labels(model, img_path), palette)
    tiles = [image]
    if seg_map_path is not None:
        gt = load_gt(seg_map_path).astype(np.int64)
        gt_rgb = colorize(np.where(gt == 255, 10 ** 6, gt), palette)   # ignored pixels black
        tiles.append(overlay(image, gt_rgb, opacity))
    tiles.append(overlay(image, pred, opacity))
    sep = np.full((image.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)
    os.makedirs(osp.dirname(osp.abspath(out_path)), exist_ok=True)
    cv2.imwrite(out_path, cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    return out_path


def _train_data_root(cfg) -> Optional[str]:
    loader = cfg.get("train_dataloader") or {}
    return next((ds["data_root"] for ds in iter_datasets(loader.get("dataset")) if ds.get("data_root")), None)


def _set_data_root(cfg, root: Path) -> None:
    for key in DATALOADER_KEYS:
        loader = cfg.get(key)
        if loader:
            for ds in iter_datasets(loader.get("dataset")):
                if "data_root" in ds:
                    ds["data_root"] = str(root)


def run_ade_demo(work_dir: str = "work_dirs/demo_ade", max_iters: Optional[int] = None,
                 cfg_options: Optional[dict] = None, config: str = MINI_CONFIG,
                 data_root: Optional[str] = None) -> Dict[str, object]:
    """Train and evaluate the mini config on CPU; print a summary; returns it as a dict.

    Args:
        work_dir: logs, checkpoints, overlays (relative to the working directory).
        max_iters: shorten / lengthen training (the config's value otherwise).
        cfg_options: further ``--cfg-options`` style overrides.
        config: the config to train (the mini ViL + UperNet config by default).
        data_root: the mini ADE20K folder to train and evaluate on (generated there when incomplete); default:
            the config's data_root if complete, else :data:`MINI_ROOT` under the working directory.
    """
    from mmengine.logging import MMLogger

    from .inference import init_segmentor
    from .mini_ade import MINI_ADE_CLASSES, mini_ade_exists
    from .train import build_runner, fit_log_interval, set_max_iters

    t0 = time.perf_counter()
    options = dict(cfg_options or {})
    cfg = load_config(config, options, work_dir=work_dir)
    if data_root is None:
        data_root = _train_data_root(cfg)
        if data_root is None or not mini_ade_exists(str(data_root)):
            data_root = MINI_ROOT
    root = ensure_mini_ade(Path(osp.normpath(data_root)))
    _set_data_root(cfg, root)
    if max_iters is not None:
        set_max_iters(cfg, int(max_iters))
    fit_log_interval(cfg)
    runner = build_runner(cfg, verbose=False)
    runner.train()  # the train loop evaluates the val set after its last iteration (per-class table in the log)
    t_train = time.perf_counter() - t0
    hub = runner.message_hub
    if "val/mIoU" in hub.log_scalars:
        metrics = {k: hub.get_scalar(f"val/{k}").current() for k in ("mIoU", "aAcc", "mAcc")
                   if f"val/{k}" in hub.log_scalars}
        t_eval = 0.0
    else:  # no evaluation configured during training: run mmseg's test loop
        metrics = dict(runner.test())
        t_eval = time.perf_counter() - t0 - t_train

    baseline = constant_prediction_baseline(root)
    ckpt = osp.join(runner.work_dir, f"iter_{cfg.train_cfg.max_iters}.pth")
    model = init_segmentor(cfg, ckpt if osp.isfile(ckpt) else None, device="cpu")
    if not osp.isfile(ckpt):  # no final checkpoint (interval): use the trained weights directly
        model.load_state_dict(runner.model.state_dict())
    val_images = sorted((root / "images" / "validation").glob("*.jpg"))
    img = str(val_images[0])
    ann = str(root / "annotations" / "validation" / (val_images[0].stem + ".png"))
    panel = save_panel(model, img, ann, osp.join(runner.work_dir, "demo_overlay.png"))

    classes = model.dataset_meta["classes"]
    summary = dict(
        mIoU=float(metrics.get("mIoU", float("nan"))), aAcc=float(metrics.get("aAcc", float("nan"))),
        mAcc=float(metrics.get("mAcc", float("nan"))), constant_mIoU=baseline["mIoU"],
        constant_aAcc=baseline["aAcc"], constant_class=classes[baseline["class_index"]].strip(),
        iters=int(cfg.train_cfg.max_iters), train_seconds=round(t_train, 1), eval_seconds=round(t_eval, 1),
        total_seconds=round(time.perf_counter() - t0, 1), work_dir=osp.abspath(runner.work_dir),
        checkpoint=osp.abspath(ckpt) if osp.isfile(ckpt) else None, overlay=osp.abspath(panel),
        log_dir=osp.abspath(runner.log_dir), dataset=str(root),
        classes=", ".join(sorted(MINI_ADE_CLASSES.values())))
    with open(osp.join(runner.work_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    MMLogger.get_current_instance().info("ADE20K demo summary: " + json.dumps(summary))
    return summary


def format_summary(summary: Dict[str, object]) -> str:
    """A small plain-text table of :func:`run_ade_demo`'s result."""
    rows = [
        ("mini ADE20K val mIoU (ViL + UperNet)", f"{summary['mIoU']:.2f}"),
        (f"constant prediction '{summary['constant_class']}' mIoU", f"{summary['constant_mIoU']:.2f}"),
        ("aAcc (model / constant)", f"{summary['aAcc']:.2f} / {summary['constant_aAcc']:.2f}"),
        ("iterations / seconds (training + evaluation)", f"{summary['iters']} / {summary['train_seconds']}"),
        ("overlay (image | ground truth | prediction)", str(summary["overlay"])),
        ("checkpoint", str(summary["checkpoint"])),
        ("logs (per-class IoU table)", str(summary["log_dir"])),
        ("dataset", str(summary["dataset"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
