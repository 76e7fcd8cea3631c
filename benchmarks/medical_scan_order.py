#!/usr/bin/env python
"""Does rotating the scan axis order between ViL block pairs help in 3D? Held-out Dice on the MNI152 case.

    python benchmarks/medical_scan_order.py                         # both orders, seeds 0 1, the demo's budget
    python benchmarks/medical_scan_order.py --orders cycle --seeds 2
    python benchmarks/medical_scan_order.py --model vil_unetr_fine  # 4^3 patches: 1,728 tokens per window

For each scan order and seed: a ViL-UNETR config (``--model``: vil_unetr = configs/medical/vil_unetr_mni152.py,
8^3 patches; vil_unetr_fine = configs/medical/vil_unetr_fine_mni152.py, 4^3 patches) with the same data,
crops, optimizer, iteration budget and seed; only the encoder's scan order differs ('fixed': every block pair reads
the D-H-W flattening, forwards and backwards; 'cycle': pairs rotate through D-H-W, H-W-D, W-D-H). Dice: the
held-out anterior half, final model. Runs are merged into benchmarks/results/medical_scan_order.json (keyed by
order, seed and iterations; a rerun replaces its entry) and the table medical_scan_order.md is rewritten from all
stored runs, so the runs can be spread over several invocations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ORDERS = ("fixed", "cycle")


def write_table(store: dict, out: Path, machine: str, versions: str) -> str:
    import numpy as np

    for r in store.values():
        r.setdefault("model", "vil_unetr")  # runs recorded before the option existed
    runs = sorted(store.values(), key=lambda r: (r["model"], r["iters"], r["seed"], ORDERS.index(r["scan_order"])))
    names = list(runs[0]["dice"])
    lines = ["# ViL-UNETR scan order in 3D: held-out Dice on the MNI152 case", "",
             "Written by `benchmarks/medical_scan_order.py`. Configs `configs/medical/vil_unetr_mni152.py` "
             "(vil_unetr, 8³ patches, the demo's model) and `configs/medical/vil_unetr_fine_mni152.py` "
             "(vil_unetr_fine, 4³ patches): data, crops, optimizer as shipped; per run only `model.scan_order` and "
             "the seed differ. Dice on the "
             "held-out anterior half (final model), background excluded.", "",
             "| model | scan_order | seed | iterations | " + " | ".join(f"{n} Dice" for n in names) +
             " | mean Dice | train s | command |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['scan_order']} | {r['seed']} | {r['iters']} | " +
                     " | ".join(f"{r['dice'][n]:.4f}" for n in names) +
                     f" | {r['mean_dice']:.4f} | {r['train_s']:.0f} | `{r['command']}` ({r['date']}) |")
    lines.append("")
    for model, iters in sorted({(r["model"], r["iters"]) for r in runs}):
        group = [r for r in runs if r["model"] == model and r["iters"] == iters]
        seeds = sorted({r["seed"] for r in group})
        paired = [s for s in seeds if all(any(r["seed"] == s and r["scan_order"] == o for r in group)
                                          for o in ORDERS)]
        if not paired:
            continue
        means = {o: [next(r["mean_dice"] for r in group if r["seed"] == s and r["scan_order"] == o)
                     for s in paired] for o in ORDERS}
        diffs = [c - f for c, f in zip(means["cycle"], means["fixed"])]
        lines.append(f"{model}, {iters} iterations, seeds {paired}: mean Dice fixed {np.mean(means['fixed']):.4f}, "
                     f"cycle {np.mean(means['cycle']):.4f}; cycle - fixed per seed {[round(d, 4) for d in diffs]} "
                     f"(mean {np.mean(diffs):+.4f}). A difference smaller than the seed-to-seed spread is not a "
                     "finding.")
    lines += ["", f"Machine: {machine}; {versions}. Train times are wall clock (indicative).", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    import torch

    from vilseg.medical.demo import DEMO_ITERS, DEMO_MODELS, train_and_evaluate
    from vilseg.utils.env import describe_machine, library_versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vil_unetr", "vil_unetr_fine"), default="vil_unetr")
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iters", type=int, default=DEMO_ITERS)
    parser.add_argument("--work-dir", default="work_dirs/medical_scan_order")
    parser.add_argument("--out", default="work_dirs/medical_scan_order/medical_scan_order.md",
                        help="Markdown report (runs merge into the JSON beside it); the tracked table: "
                             "--out benchmarks/results/medical_scan_order.md")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store_path = out.with_suffix(".json")
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    command = " ".join(["python", "benchmarks/medical_scan_order.py"] +
                       list(argv if argv is not None else sys.argv[1:]))
    for seed in args.seeds:
        for order in args.orders:
            print(f"== {args.model} scan_order={order} seed={seed} ({args.iters} iterations)", flush=True)
            res = train_and_evaluate(DEMO_MODELS[args.model],
                                     Path(args.work_dir) / f"{args.model}_{order}_seed{seed}",
                                     max_iters=args.iters, seed=seed, cfg_options={"model.scan_order": order})
            print(f"   Dice {res['dice']}  mean {res['mean_dice']:.4f}  ({res['train_s']:.0f} s)", flush=True)
            # runs of the 8^3 model keep their original keys
            key = f"{order}/seed{seed}/iters{args.iters}"
            store[key if args.model == "vil_unetr" else f"{args.model}/{key}"] = {
                "model": args.model, "scan_order": order, "seed": seed, "iters": args.iters, "dice": res["dice"],
                "mean_dice": res["mean_dice"], "train_s": res["train_s"], "command": command,
                "date": time.strftime("%Y-%m-%d")}
            store_path.write_text(json.dumps(store, indent=2) + "\n")  # after every run: partial results survive
            versions = library_versions(("torch", "monai", "mmengine", "mmseg"))
            text = write_table(store, out, describe_machine(), ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
