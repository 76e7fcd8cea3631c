#!/usr/bin/env python
"""ViL-UNETR (8^3 and 4^3 patches), MONAI UNETR and MONAI SwinUNETR on the MNI152 case, side by side, several seeds.

    python benchmarks/medical_compare.py --budget-s 150                    # 4 models x seeds 0 1 2, 150 s each
    python benchmarks/medical_compare.py --iters 150                       # the same iteration budget instead
    python benchmarks/medical_compare.py --models vil_unetr_fine unetr --seeds 0 --iters 20 --out work_dirs/mc.md

Every run uses the shipped config of its model (``configs/medical/<model>_mni152.py``: same data, 48^3 crops,
DiceCELoss, AdamW + poly LR) with the same budget and seed; nothing else differs. The budget is either training
time (``--budget-s``: each model gets as many iterations as fit, from the time of a training step measured just
before; the poly schedule spans them) or iterations (``--iters``). Each run is a fresh process, which first
measures one training step at the config's crop and batch (its time, the peak of live tensors and the growth of
the process's resident memory, or reserved CUDA memory) and then trains, segments the held-out anterior half in
its own grid (sliding window) and scores it with MONAI's metrics: Dice, 95 % Hausdorff distance (mm) and normalised
surface Dice at a tolerance of one voxel (2 mm), background excluded. Runs merge into the JSON beside ``--out``
(a rerun replaces its entry), and the Markdown table (mean +- std over seeds) is rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
MODELS = ("vil_unetr", "vil_unetr_fine", "unetr", "swinunetr")
SURFACE_TOLERANCE_MM = 2.0


def training_step_memory(config: Path, device: str = "cpu") -> Dict[str, float]:
    """Time of a training step (s) and what training holds above the model's parameters and the input (MiB): the
    peak of live tensors (gradients, AdamW states, activations) and the growth of resident memory (CPU) or the
    reserved memory (CUDA), at the config's crop and batch (num_samples crops per volume x batch_size volumes)."""
    import torch
    from mmengine.config import Config

    from vilseg.medical.registry import build_loss, build_network
    from vilseg.profiling.memory import measure_peak, resident_peak_bytes

    cfg = Config.fromfile(str(config))
    dev = torch.device(device)
    net = build_network(cfg.model).to(dev).train()
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = int(cfg.data.get("num_samples", 1)) * int(cfg.data.get("batch_size", 1))
    roi = tuple(int(r) for r in cfg.data.roi_size)
    x = torch.randn(batch, 1, *roi, device=dev)
    y = torch.randint(0, int(cfg.num_classes), (batch, 1, *roi), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    base = sum(t.numel() * t.element_size() for t in [*net.parameters(), x, y])
    held0 = resident_peak_bytes()  # model, optimizer (no state yet) and input exist; training adds the rest
    step()  # gradients and optimizer states exist from here on, as in training
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _, pm = measure_peak(step, device=dev, track=[net, opt, x, y])
    if dev.type == "cuda":
        held = torch.cuda.max_memory_reserved(dev) / 2**20
    else:
        held = (resident_peak_bytes() - held0) / 2**20
    return {"live_mib": (pm.peak_bytes - base) / 2**20, "held_mib": held, "batch": batch,
            "crop": list(roi), "step_s": min(times)}


def surface_metrics(pred_path: Path, label_path: Path, num_classes: int) -> Dict[str, List[float]]:
    """Per-class (background excluded) 95 % Hausdorff distance (mm) and normalised surface Dice (one-voxel
    tolerance), from MONAI, in the label file's grid and spacing."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    label_img = nib.load(str(label_path))
    spacing = [float(z) for z in label_img.header.get_zooms()[:3]]
    pred = np.asarray(nib.load(str(pred_path)).dataobj).astype(np.int64)
    label = np.asarray(label_img.dataobj).astype(np.int64)

    def onehot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a), num_classes).permute(3, 0, 1, 2)[None].float()

    p, g = onehot(pred), onehot(label)
    hd95 = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(p, g, class_thresholds=[SURFACE_TOLERANCE_MM] * (num_classes - 1),
                               include_background=False, spacing=spacing)
    return {"hd95_mm": [float(v) for v in hd95[0]], "nsd": [float(v) for v in nsd[0]]}


def run_one(model: str, seed: int, iters: int, work_dir: Path, budget_s: float = 0.0) -> Dict[str, Any]:
    """The worker: time and memory of one step, then training (``iters`` iterations, or as many as fit in
    ``budget_s`` seconds), inference and metrics for one (model, seed)."""
    import torch

    from vilseg.medical.demo import DEMO_MODELS, HELD_OUT, train_and_evaluate

    config = REPO / DEMO_MODELS[model]
    data_dir = REPO / "data" / "mni152"
    memory = training_step_memory(config)
    if budget_s:
        iters = max(1, round(budget_s / memory["step_s"]))
    res = train_and_evaluate(config, work_dir / f"{model}_seed{seed}", max_iters=iters, seed=seed, progress=False,
                             data_dir=data_dir)
    surface = surface_metrics(Path(res["prediction"]), data_dir / HELD_OUT[1],
                              len(res["dice"]) + 1)
    return {"model": model, "seed": seed, "iters": iters, "budget_s": budget_s, "config": DEMO_MODELS[model],
            "params": res["params"],
            "dice": res["dice"], "mean_dice": res["mean_dice"], **surface, "train_s": res["train_s"],
            "s_per_step": res["train_s"] / iters, "infer_s": res["infer_s"], **memory,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def _mean_std(values: List[float]) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def _budget(run: Dict[str, Any]):
    return ("time", float(run["budget_s"])) if run.get("budget_s") else ("iters", float(run["iters"]))


def write_table(store: Dict[str, Any], out: Path, command: str) -> str:
    import numpy as np

    from vilseg.utils.env import describe_machine, library_versions

    runs = list(store.values())
    budgets = sorted({_budget(r) for r in runs})
    names = list(runs[0]["dice"])
    lines = ["# 3D: ViL-UNETR against UNETR and SwinUNETR on the MNI152 case, several seeds", "",
             "Written by `benchmarks/medical_compare.py`. Each model's shipped config "
             "(`configs/medical/<model>_mni152.py`): the posterior half of the MNI152 2 mm case for training, 48³ "
             "random crops, DiceCELoss, AdamW + poly LR, the same budget (training time or iterations) and seeds; the final "
             "model "
             "segments the held-out anterior half (sliding window, its own grid). Metrics from MONAI, background "
             "excluded: Dice, 95 % Hausdorff distance (mm), normalised surface Dice at "
             f"{SURFACE_TOLERANCE_MM:g} mm (one voxel). Mean ± sample std over seeds. Memory: one training step at "
             "the config's crop and batch in a fresh process, above the parameters and the input (live: peak of "
             "live tensors, i.e. gradients, AdamW states and activations; held: growth of resident memory).", ""]
    for budget in budgets:
        group = [r for r in runs if _budget(r) == budget]
        models = [m for m in MODELS if any(r["model"] == m for r in group)]
        title = (f"equal training time, {budget[1]:g} s per run" if budget[0] == "time" else
                 f"equal iterations, {budget[1]:g} per run")
        lines += [f"## {title}", "",
                  "| model | seeds | params | iterations | " + " | ".join(f"{n} Dice" for n in names) +
                  " | mean Dice | mean HD95 mm | mean NSD | s / step | train s | infer s | live MiB | held MiB |",
                  "|---|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|---:|---:|---:|---:|"]
        stats = {}
        for m in models:
            rs = sorted((r for r in group if r["model"] == m), key=lambda r: r["seed"])
            stats[m] = {"mean_dice": [r["mean_dice"] for r in rs],
                        "hd95": [float(np.mean(r["hd95_mm"])) for r in rs]}
            lines.append(
                f"| {m} | {[r['seed'] for r in rs]} | {rs[0]['params'] / 1e6:.2f} M | "
                f"{'/'.join(str(r['iters']) for r in rs)} | " +
                " | ".join(_mean_std([r["dice"][n] for r in rs]) for n in names) +
                f" | {_mean_std(stats[m]['mean_dice'])} | {_mean_std(stats[m]['hd95'])} | "
                f"{_mean_std([float(np.mean(r['nsd'])) for r in rs])} | "
                f"{np.mean([r['s_per_step'] for r in rs]):.3f} | {np.mean([r['train_s'] for r in rs]):.0f} | "
                f"{np.mean([r['infer_s'] for r in rs]):.1f} | {np.mean([r['live_mib'] for r in rs]):.0f} | "
                f"{np.mean([r['held_mib'] for r in rs]):.0f} |")
        lines.append("")
        if "vil_unetr_fine" in stats:
            fine = np.asarray(stats["vil_unetr_fine"]["mean_dice"])
            for m in models:
                if m == "vil_unetr_fine":
                    continue
                other = np.asarray(stats[m]["mean_dice"])
                spread = max(fine.std(ddof=1) if len(fine) > 1 else 0.0, other.std(ddof=1) if len(other) > 1 else 0.0)
                diff = fine.mean() - other.mean()
                verdict = ("more than two standard deviations of the seed spread" if spread > 0 and
                           abs(diff) > 2 * spread else "within two standard deviations of the seed spread: not a "
                           "finding" if spread > 0 else "one seed: no spread to compare with")
                lines.append(f"- vil_unetr_fine - {m}: mean Dice {diff:+.4f} ({verdict})")
            lines.append("")
    versions = library_versions(("torch", "monai", "mmengine", "nibabel"))
    lines += [f"Machine: {describe_machine()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) +
              f". Command: `{command}`. Times are wall clock on a shared machine (indicative; compare within a "
              "run).", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=150, help="training iterations per run (default: the demo's)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="training time per run instead: each model trains as many iterations as fit")
    parser.add_argument("--work-dir", default="work_dirs/medical_compare")
    parser.add_argument("--out", default="work_dirs/medical_compare/medical_compare.md",
                        help="Markdown report (runs merge into the JSON beside it); the tracked table: "
                             "--out benchmarks/results/medical_compare.md")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "SEED", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    if args.worker:
        model, seed, path = args.worker
        Path(path).write_text(json.dumps(run_one(model, int(seed), args.iters, work_dir, args.budget_s), indent=2))
        return 0

    from tqdm import tqdm

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store_path = out.with_suffix(".json")
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    command = " ".join(["python", "benchmarks/medical_compare.py"] + list(argv if argv is not None else sys.argv[1:]))
    jobs = [(m, s) for s in args.seeds for m in args.models]
    failed = []
    for model, seed in tqdm(jobs, desc="runs", unit="run"):
        tmp = work_dir / f"{model}_seed{seed}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", model, str(seed), str(tmp), "--iters",
                               str(args.iters), "--budget-s", str(args.budget_s), "--work-dir", str(work_dir)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            failed.append(model)
            tqdm.write(f"{model} seed {seed} failed:\n{proc.stderr[-2000:]}")
            continue
        res = json.loads(tmp.read_text())
        tqdm.write(f"{model} seed {seed}: {res['iters']} iterations, mean Dice {res['mean_dice']:.4f}, HD95 "
                   f"{[round(h, 2) for h in res['hd95_mm']]} mm, {res['train_s']:.0f} s")
        budget = f"budget{args.budget_s:g}s" if args.budget_s else f"iters{args.iters}"
        store[f"{model}/seed{seed}/{budget}"] = res
        store_path.write_text(json.dumps(store, indent=2) + "\n")  # after every run: partial results survive
        write_table(store, out, command)
    if store:
        print(write_table(store, out, command))
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
