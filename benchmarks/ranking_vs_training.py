"""Do As-ViT's training-free scores rank backbones the way a short training run does? (mini ADE20K, CPU)

For each candidate of configs/_base_/models/ranking_mini_candidates.py (small ViL depth / width variants, a ViT, a
Swin, a Sequencer2D, a LambdaResNet, each under the same UperNet head with 64 channels): compute the scores at
initialisation (vilseg.profiling.complexity: length distortion L^E and NTK condition number, at the training crop
size), then train it with the same budget
through mmseg's Runner on the synthetic mini ADE20K set (configs/demo/vil_upernet_ade20k_mini.py's data,
pipeline and test mode; AdamW lr 5e-4, wd 0.01, linear warm-up then cosine, batch 4, 128x128 crops, seed 0 for
everyone) and evaluate the validation mIoU. Kendall's tau (scipy.stats.kendalltau) between each score and the
mIoU tells whether the ranking agrees; parameters and FLOPs are shown as naive predictors for comparison.

Writes benchmarks/results/ranking_vs_training.{md,json} (machine, versions, command line, per-candidate rows, taus).
Results are cached per candidate in the JSON: a second run only trains what is missing (--fresh to redo all).

    python benchmarks/ranking_vs_training.py                    # 8 candidates x 160 iterations (about 1 h, 2 cores)
    python benchmarks/ranking_vs_training.py --iters 100 --only vil-64x4 vil-128x8 vit-128x4 swin-mini seq-mini \
        lambda-r50-w16                                          # the run in results/ (6 candidates)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from vilseg.utils.env import describe_machine, library_versions

BASE_CONFIG = "configs/demo/vil_upernet_ade20k_mini.py"
CANDIDATES_CONFIG = "configs/_base_/models/ranking_mini_candidates.py"  # the candidates' models
CROP = 128
HEAD = 64


def load_candidates() -> Dict[str, dict]:
    """name -> the model parts (backbone, neck, decode_head, auxiliary_head) that CANDIDATES_CONFIG gives it."""
    from vilseg.apis.config import load_config

    return load_config(CANDIDATES_CONFIG, adapt=False).candidates.to_dict()


def machine() -> str:
    return describe_machine()


def versions() -> str:
    return ", ".join(f"{k} {v}" for k, v in library_versions(("torch", "mmengine", "mmseg", "scipy")).items())


def scores(backbone: dict, points: int, ntk_batch: int) -> dict:
    from vilseg.profiling.complexity import (build_backbone, count_flops, count_params, length_distortion,
                                             ntk_condition_number)

    model = build_backbone(backbone, seed=0)
    shape = (3, CROP, CROP)
    le = length_distortion(model, shape, num_points=points, rms_radius=1.0, seed=0, output="last")
    kappa, _ = ntk_condition_number(model, input_shape=shape, batch_size=ntk_batch, seed=0, output="last")
    return dict(params=count_params(model), flops=count_flops(model, shape), length_distortion=le, ntk_condition=kappa)


def train_and_eval(name: str, candidate: dict, iters: int, work_root: Path) -> dict:
    from mmengine.config import ConfigDict
    from mmengine.runner import Runner

    from vilseg.apis.config import load_config

    cfg = load_config(BASE_CONFIG, work_dir=str(work_root / name))
    cfg.model.backbone = ConfigDict(candidate["backbone"])
    cfg.model.neck = ConfigDict(candidate["neck"]) if candidate["neck"] else None
    cfg.model.decode_head.update(candidate["decode_head"])
    cfg.model.auxiliary_head.update(candidate["auxiliary_head"])
    lr, warmup = 5e-4, max(1, iters // 10)
    cfg.optim_wrapper = ConfigDict(type="OptimWrapper",
                                   optimizer=dict(type="AdamW", lr=lr, betas=(0.9, 0.999), weight_decay=0.01))
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=warmup),
        dict(type="CosineAnnealingLR", eta_min=1e-6, by_epoch=False, begin=warmup, end=iters),
    ]
    cfg.train_cfg = ConfigDict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.default_hooks.checkpoint = ConfigDict(type="CheckpointHook", by_epoch=False, interval=iters + 1,
                                              save_last=False)
    cfg.default_hooks.logger = ConfigDict(type="LoggerHook", interval=max(1, iters // 8), log_metric_by_epoch=False)
    cfg.randomness = dict(seed=0)
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    train_s = time.perf_counter() - start
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    tail = [float(v) for v in list(losses)[-max(1, iters // 8):]]
    metrics = runner.val()
    return dict(miou=float(metrics["mIoU"]), aacc=float(metrics["aAcc"]), final_loss=sum(tail) / len(tail),
                train_seconds=train_s, seconds_per_iter=train_s / iters)


def kendall(rows: Dict[str, dict], key: str, sign: float, target: str) -> tuple:
    from scipy.stats import kendalltau

    names = sorted(rows)
    res = kendalltau([sign * rows[n][key] for n in names], [rows[n][target] for n in names])
    return float(res.statistic), float(res.pvalue)


def write_report(rows: Dict[str, dict], args: argparse.Namespace, path_md: Path) -> str:
    order = sorted(rows, key=lambda n: -rows[n]["miou"])
    lines = [
        "# Training-free scores (As-ViT) vs short training on mini ADE20K",
        "",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- training: every candidate under UperNet (+ auxiliary FCN head), {HEAD} channels, BN; {args.iters} "
        f"iterations, batch 4, {CROP}x{CROP} crops of the synthetic mini ADE20K set ({BASE_CONFIG}'s pipeline), "
        "AdamW lr 5e-4 wd 0.01, linear warm-up (10 % of the iterations) then cosine to 1e-6, seed 0; mIoU on the "
        "12 validation images (sliding window 128, stride 85), percent as mmseg reports it.",
        f"- scores: on the backbone at initialisation (seed 0), input {CROP}x{CROP}; L^E from {args.points} points on "
        f"a circle of RMS radius 1 around an N(0, I) input, last feature map, per-element normalised; NTK condition "
        f"number on a batch of {args.ntk_batch} N(0, I) inputs with a fixed random read-out of the last feature map; "
        "FLOPs (mmengine FlopAnalyzer, multiply-adds) of the backbone at the crop size.",
        "",
        "| candidate | params (M) | backbone GFLOPs | L^E | NTK cond. | final train loss | mIoU (%) | aAcc (%) "
        "| train s / iter (incl. runner start) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in order:
        r = rows[n]
        lines.append(f"| {n} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.3f} | {r['length_distortion']:.4g} | "
                     f"{r['ntk_condition']:.4g} | {r['final_loss']:.3f} | {r['miou']:.2f} | {r['aacc']:.2f} | "
                     f"{r['seconds_per_iter']:.2f} |")
    lines += ["", f"Kendall tau over the {len(rows)} candidates (scipy.stats.kendalltau, tau-b; p: two-sided test "
              "of tau = 0). Each predictor is oriented so that a positive tau means 'agrees':", "",
              "| predictor | tau vs mIoU | p | tau vs -final loss | p |", "|---|---:|---:|---:|---:|"]
    taus = {}
    for label, key, sign in [("L^E (higher = better)", "length_distortion", 1.0),
                             ("NTK condition number (lower = better)", "ntk_condition", -1.0),
                             ("parameters (more = better)", "params", 1.0),
                             ("FLOPs (more = better)", "flops", 1.0)]:
        t_m, p_m = kendall(rows, key, sign, "miou")
        neg = {n: dict(rows[n], neg_loss=-rows[n]["final_loss"]) for n in rows}
        t_l, p_l = kendall(neg, key, sign, "neg_loss")
        taus[key] = (t_m, p_m, t_l, p_l)
        lines.append(f"| {label} | {t_m:+.3f} | {p_m:.3f} | {t_l:+.3f} | {p_l:.3f} |")
    lines += ["", "Reading: with this few candidates and this short a budget, only |tau| near 1 with a small p would be "
              "evidence either way; the numbers are reported as measured, whatever they are."]
    text = "\n".join(lines) + "\n"
    path_md.write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=160, help="training iterations per candidate (160)")
    parser.add_argument("--points", type=int, default=64, help="circle points for L^E (64)")
    parser.add_argument("--ntk-batch", type=int, default=8, help="NTK batch (8)")
    candidates = load_candidates()
    parser.add_argument("--only", nargs="+", choices=sorted(candidates), help="a subset of the candidates")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, OpenMP barriers over busy cores cost more than "
                             "they gain; 0 keeps torch's default)")
    parser.add_argument("--work-dir", default="work_dirs/ranking_vs_training", help="runner work dirs")
    parser.add_argument("--out", default="work_dirs/ranking_vs_training/ranking_vs_training.md",
                        help="Markdown report; its JSON (the per-candidate cache) lies beside it. The tracked table: "
                             "--out benchmarks/results/ranking_vs_training.md")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from vilseg.apis.mini_ade import generate_mini_ade, mini_ade_exists

    root = Path(__file__).resolve().parents[1] / "data" / "mini_ade" / "ADEChallengeData2016"
    if not mini_ade_exists(str(root)):
        generate_mini_ade(str(root), progress=False)
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out_md.with_suffix(".json")
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    settings = dict(iters=args.iters, points=args.points, ntk_batch=args.ntk_batch, crop=CROP, head=HEAD)
    if cache.get("settings") != settings:
        cache = dict(settings=settings, rows={})
    names = args.only or list(candidates)
    for i, name in enumerate(names):
        if name in cache["rows"]:
            print(f"[{i + 1}/{len(names)}] {name}: cached")
            continue
        print(f"[{i + 1}/{len(names)}] {name}: scores ...", flush=True)
        row = scores(candidates[name]["backbone"], args.points, args.ntk_batch)
        print(f"[{i + 1}/{len(names)}] {name}: L^E {row['length_distortion']:.4g}, NTK cond {row['ntk_condition']:.4g};"
              f" training {args.iters} iterations ...", flush=True)
        row.update(train_and_eval(name, candidates[name], args.iters, Path(args.work_dir)))
        print(f"[{i + 1}/{len(names)}] {name}: mIoU {row['miou']:.2f}", flush=True)
        cache["rows"][name] = row
        cache_path.write_text(json.dumps(cache, indent=1))
        rows = {n: cache["rows"][n] for n in names if n in cache["rows"]}
        if len(rows) >= 3:   # the report so far (complete after the last candidate)
            write_report(rows, args, out_md)
    rows = {n: cache["rows"][n] for n in names if n in cache["rows"]}
    if len(rows) < 3:
        print("fewer than 3 candidates: no Kendall tau")
        return 0
    print(write_report(rows, args, out_md))
    print(f"written: {out_md} and {cache_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
