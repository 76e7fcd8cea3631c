"""The 3D part of ``make demo``: a short CPU training of ViL-UNETR (or UNETR) on the MNI152 case, inference on the
held-out anterior half, per-class Dice and a PNG of axial/coronal/sagittal slices.

    from vilseg.medical.demo import run_demo
    run_demo()                      # ViL-UNETR
    run_demo(model='unetr')         # MONAI UNETR, same data, crops, loss, optimizer and iteration budget

Everything runs from the shipped configs (``configs/medical/<model>_mni152.py``, found from the working directory
or the checkout) through the same library code as ``tools/train_medical.py`` and ``tools/medical_infer.py``; only
the iteration budget is shortened. Outputs go under the ``out_dir`` given (``work_dirs/`` of the working directory
by default). A run can also record its numbers in ``medical_demo.json`` of a results folder it is given and
regenerate ``medical_demo.md`` next to it (``record=FOLDER``; ``tools/medical_demo.py --record`` passes the
checkout's ``benchmarks/results``, ``make demo`` records nothing).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from vilseg.utils.env import describe_machine, library_versions
from vilseg.utils.paths import find_path, resolve_path

__all__ = ["DEMO_MODELS", "MNI152_DIR", "DEMO_ITERS", "ensure_mni152", "train_and_evaluate", "save_slices_png",
           "run_demo", "record_result", "render_demo_table"]

DEMO_MODELS = {"vil_unetr": "configs/medical/vil_unetr_mni152.py",
               "vil_unetr_fine": "configs/medical/vil_unetr_fine_mni152.py",
               "unetr": "configs/medical/unetr_mni152.py", "swinunetr": "configs/medical/swinunetr_mni152.py"}
DEMO_ITERS = 150
HELD_OUT = ("imagesTs/mni152_anterior.nii.gz", "labelsTs/mni152_anterior.nii.gz")
MNI152_DIR = Path("data") / "mni152"   # relative to the working directory


def ensure_mni152(data_dir: Optional[Union[str, Path]] = None) -> Path:
    """Return the MNI152 case folder, building it from nilearn's template if its dataset.json is missing.

    ``data_dir`` None: :data:`MNI152_DIR` of the working directory, else the checkout's copy (read only); when
    neither has the case, it is built under the working directory.
    """
    if data_dir is None:
        found = find_path(MNI152_DIR / "dataset.json")
        data_dir = Path(found).parent if found else MNI152_DIR
    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").is_file():
        from vilseg.medical.mni152 import build_mni152_cases

        print(f"building the MNI152 case in {data_dir} (from nilearn's bundled template)")
        build_mni152_cases(data_dir)
    return data_dir


def train_and_evaluate(config: Union[str, Path], work_dir: Union[str, Path], max_iters: int = DEMO_ITERS,
                       seed: int = 0, data_dir: Optional[Union[str, Path]] = None,
                       cfg_options: Optional[Dict[str, Any]] = None, device: str = "cpu",
                       progress: bool = True, verbose: bool = False) -> Dict[str, Any]:
    """Train ``config`` for ``max_iters`` iterations on the MNI152 training half, then segment the held-out half
    with :class:`~vilseg.medical.inference.NiftiSegmenter` in its own grid.

    ``config``: a path relative to the working directory or to the checkout; ``data_dir``: see
    :func:`ensure_mni152`. Everything is written under ``work_dir``.

    Returns {'dice': {class: Dice}, 'mean_dice', 'train_s', 'infer_s', 'params', 'checkpoint', 'prediction',
    'config' (as given), 'data_dir', ...} (Dice on the held-out half, final model, no checkpoint selection).
    """
    import torch
    from mmengine.config import Config

    from vilseg.medical.inference import NiftiSegmenter, check_nifti, dice_per_class
    from vilseg.medical.registry import build_network
    from vilseg.medical.train import train

    data_dir = ensure_mni152(data_dir)
    cfg = Config.fromfile(resolve_path(config, "config"))
    opts = {"train.max_iters": int(max_iters), "train.val_interval": 0, "train.checkpoint_interval": int(max_iters),
            "train.seed": int(seed), "train.device": device, "data.dataset_json": str(data_dir / "dataset.json")}
    opts.update(cfg_options or {})
    cfg.merge_from_dict(opts)
    cfg.data.val_key = "no_validation_during_demo"  # no model selection on the held-out half
    cfg.data.val_fraction = 0.0
    work_dir = Path(work_dir)
    result = train(cfg, work_dir=work_dir, progress=progress, verbose=verbose)

    params = sum(p.numel() for p in build_network(cfg.model).parameters())
    t0 = time.perf_counter()
    seg = NiftiSegmenter.from_checkpoint(result["latest"], device=device, progress=False)
    img, data = check_nifti(data_dir / HELD_OUT[0])
    pred = seg.predict(img, data)
    pred_path = seg.save(pred, img, work_dir / "mni152_anterior_seg.nii.gz")
    _, label = check_nifti(data_dir / HELD_OUT[1])
    dice = dice_per_class(pred, label, seg.num_classes)
    infer_s = time.perf_counter() - t0
    names = seg.class_names[1:]
    valid = [d for d in dice if not np.isnan(d)]
    return {"dice": dict(zip(names, dice)), "mean_dice": float(np.mean(valid)) if valid else float("nan"),
            "train_s": result["time_s"], "infer_s": infer_s, "params": int(params), "iters": int(max_iters),
            "seed": int(seed), "checkpoint": result["latest"], "prediction": str(pred_path),
            "config": str(config), "data_dir": str(data_dir),
            "model": dict(cfg.model), "roi_size": list(cfg.data.roi_size), "torch_threads": torch.get_num_threads()}


def save_slices_png(image: np.ndarray, label: np.ndarray, pred: np.ndarray, out_path: Union[str, Path],
                    title: str = "", spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """3 x 3 panel: axial / coronal / sagittal slices (rows) of image, ground truth and prediction (columns).

    Arrays are (X, Y, Z) in RAS order; labels 0 background, 1 gray matter, 2 white matter.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([(0, 0, 0, 0), (0.95, 0.55, 0.1, 0.85), (0.2, 0.6, 1.0, 0.85)])
    x, y, z = image.shape
    fg = np.argwhere(label > 0)
    cx, cy, cz = (fg.mean(0).round().astype(int) if len(fg) else (x // 2, y // 2, z // 2))
    cx = int(x * 0.3) if abs(cx - x / 2) < x * 0.1 else cx  # a sagittal slice through one hemisphere
    views = {"axial": (lambda a: a[:, :, cz].T, spacing[1] / spacing[0]),
             "coronal": (lambda a: a[:, cy, :].T, spacing[2] / spacing[0]),
             "sagittal": (lambda a: a[cx, :, :].T, spacing[2] / spacing[1])}
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (view, (cut, aspect)) in enumerate(views.items()):
        for c, (name, overlay) in enumerate((("image", None), ("ground truth", label), ("prediction", pred))):
            ax = axes[r, c]
            ax.imshow(cut(image), cmap="gray", origin="lower", aspect=aspect)
            if overlay is not None:
                ax.imshow(cut(overlay), cmap=cmap, vmin=0, vmax=2, origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(view)
    fig.suptitle(title + "\norange: gray matter, blue: white matter", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def record_result(result: Dict[str, Any], key: str, results_dir: Union[str, Path],
                  command: Optional[str] = None) -> Path:
    """Store ``result`` under ``key`` in ``results_dir``/medical_demo.json and rewrite medical_demo.md there from
    all stored runs."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    store_path = results_dir / "medical_demo.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    entry = {k: result[k] for k in ("dice", "mean_dice", "train_s", "infer_s", "params", "iters", "seed", "config",
                                    "model", "roi_size")}
    entry.update(machine=describe_machine(),
                 versions=library_versions(("torch", "monai", "mmengine", "mmseg", "nibabel", "nilearn")),
                 command=command or " ".join([os.path.basename(sys.executable)] + sys.argv),
                 date=time.strftime("%Y-%m-%d"), load_avg=round(os.getloadavg()[0], 1))
    store[key] = entry
    store_path.write_text(json.dumps(store, indent=2) + "\n")
    return render_demo_table(results_dir)


def render_demo_table(results_dir: Union[str, Path]) -> Path:
    """Rewrite ``results_dir``/medical_demo.md from the runs stored in medical_demo.json there."""
    results_dir = Path(results_dir)
    store = json.loads((results_dir / "medical_demo.json").read_text())
    lines = ["# 3D demo: held-out Dice on the MNI152 case", "",
             "Written by `vilseg.medical.demo.record_result` (run `python tools/medical_demo.py --model vil_unetr "
             "--record` and `--model unetr --record`). Training: the posterior half of the MNI152 2 mm case (`data/mni152`), "
             "random crops, DiceCELoss, AdamW + poly LR, a fixed iteration budget, final model (no checkpoint "
             "selection). Dice: the held-out anterior half, segmented by `NiftiSegmenter` (sliding window, "
             "Gaussian blending) in its own grid; background excluded.", "",
             "| model | config | params | iterations | crop | gray matter Dice | white matter Dice | mean | "
             "train s | infer s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in store.items():
        d = list(e["dice"].values())
        lines.append(f"| {name} | `{e['config']}` | {e['params'] / 1e6:.2f} M | {e['iters']} | "
                     f"{'x'.join(str(r) for r in e['roi_size'])} | {d[0]:.4f} | {d[1]:.4f} | {e['mean_dice']:.4f} | "
                     f"{e['train_s']:.0f} | {e['infer_s']:.1f} |")
    lines += ["", "Runs:", ""]
    for name, e in store.items():
        vers = ", ".join(f"{k} {v}" for k, v in e["versions"].items())
        load = f"; 1-min load average {e['load_avg']} when recorded" if "load_avg" in e else ""
        lines.append(f"- {name} ({e['date']}, seed {e['seed']}): `{e['command']}`; machine: {e['machine']}{load}; "
                     f"{vers}")
    lines += ["", "Wall-clock times depend on what else ran on the machine (see the load average when recorded): "
              "indicative only. Compare Dice at equal iterations.", ""]
    md = results_dir / "medical_demo.md"
    md.write_text("\n".join(lines))
    return md


def run_demo(model: str = "vil_unetr", max_iters: int = DEMO_ITERS, out_dir: Union[str, Path] = "work_dirs",
             seed: int = 0, record: Optional[Union[str, Path]] = None, progress: bool = True,
             threads: Optional[int] = None, data_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Train ``model`` ('vil_unetr' | 'unetr' | 'swinunetr') briefly on CPU, print held-out Dice, write a PNG.

    Returns the dict of :func:`train_and_evaluate` plus 'png'. Outputs go to ``out_dir/medical_demo_<model>/``;
    ``record``: a results folder to add the run to (:func:`record_result`), None to record nothing.
    """
    import nibabel as nib
    import torch

    if model not in DEMO_MODELS:
        raise ValueError(f"model must be one of {sorted(DEMO_MODELS)}, got {model!r}")
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out_dir) / f"medical_demo_{model}"
    print(f"[medical demo] {model}: {max_iters} iterations on the posterior half of MNI152 (CPU), "
          f"evaluation on the held-out anterior half")
    result = train_and_evaluate(DEMO_MODELS[model], out / "work_dir", max_iters=max_iters, seed=seed,
                                progress=progress, data_dir=data_dir)
    data_dir = Path(result["data_dir"])
    image = np.asarray(nib.load(str(data_dir / HELD_OUT[0])).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(data_dir / HELD_OUT[1])).dataobj)
    pred = np.asarray(nib.load(result["prediction"]).dataobj)
    title = (f"{model}: held-out Dice " + ", ".join(f"{n} {d:.3f}" for n, d in result["dice"].items()) +
             f" ({max_iters} it, {result['train_s']:.0f} s)")
    result["png"] = str(save_slices_png(image, label, pred, out / "mni152_anterior_slices.png", title=title))
    from vilseg.medical.train import print_summary

    rows = [[n, f"{d:.4f}"] for n, d in result["dice"].items()]
    rows += [["mean Dice", f"{result['mean_dice']:.4f}"], ["parameters", f"{result['params'] / 1e6:.2f} M"],
             ["train time", f"{result['train_s']:.0f} s ({max_iters} it)"],
             ["inference time", f"{result['infer_s']:.1f} s"], ["slices", result["png"]],
             ["segmentation", result["prediction"]]]
    print_summary(f"medical demo ({model}): held-out Dice, MNI152 anterior half", rows, ["", ""])
    if record is not None:
        md = record_result(result, model, record)
        print(f"recorded in {md}")
    return result
