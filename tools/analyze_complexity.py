#!/usr/bin/env python
"""Rank backbones before training: parameters, FLOPs and As-ViT's training-free scores at initialisation
(length distortion L^E = expressivity, NTK condition number = trainability). How each number is computed:
vilseg/profiling/complexity.py.

    python tools/analyze_complexity.py                                   # the default five models
    python tools/analyze_complexity.py --models vil-t vil-t-d12 vil-s sequencer2d-s lambdaresnet50 swin-t
    python tools/analyze_complexity.py --models configs/sequencer/sequencer2d_s_upernet_ade20k.py deit-s
    python tools/analyze_complexity.py --list                            # the model names
    python tools/analyze_complexity.py --input-size 96 96 --points 128 --ntk-batch 16 --seed 1 --out table.md

A model is one of the names tools/profile_memory.py takes (the model.backbone of a shipped config, see
vilseg/profiling/names.py) or an mmseg/vilseg config file (its model.backbone is scored). Scores are computed at
--input-size (default 64 x 64), FLOPs at --flops-size (default 512 x 512, the ADE20K crop; 0 skips them).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    import inspect

    from vilseg.profiling.complexity import DEFAULT_CANDIDATES, analyze

    d = {k: p.default for k, p in inspect.signature(analyze).parameters.items()}  # the defaults, defined there
    parser = argparse.ArgumentParser(description="Training-free architecture scores (As-ViT) with FLOPs / params",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=DEFAULT_CANDIDATES,
                        help=f"model names or config paths (default: {' '.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--input-size", nargs=2, type=int, default=d["input_size"], metavar=("H", "W"),
                        help="input size for the two scores (default %(default)s)")
    parser.add_argument("--flops-size", nargs=2, type=int, default=d["flops_size"], metavar=("H", "W"),
                        help="input size for the FLOPs (default %(default)s; 0 0 skips FLOPs)")
    parser.add_argument("--points", type=int, default=d["num_points"],
                        help="points on the input circle for L^E (%(default)s)")
    parser.add_argument("--radius", type=float, default=d["rms_radius"],
                        help="RMS displacement of an input element over the circle (%(default)s)")
    parser.add_argument("--ntk-batch", type=int, default=d["ntk_batch"], help="samples in the NTK batch (%(default)s)")
    parser.add_argument("--output", choices=["last", "all"], default=d["output"],
                        help="which backbone output the scores read: the last feature map or all of them")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="seed of the initialisation, circle and batch (%(default)s)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from vilseg.utils.console import filter_known_warnings

    filter_known_warnings()  # before mmengine's import, which already warns
    args = parse_args(argv)
    from vilseg.profiling.complexity import analyze, format_table, presets, resolve_candidate

    if args.list:
        for name, description in presets().items():
            print(f"{name:16s} {description}")
        return 0
    try:
        for m in args.models:   # fail on a bad name before building anything
            resolve_candidate(m)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flops_size = tuple(args.flops_size) if min(args.flops_size) > 0 else None
    reports = analyze(args.models, input_size=tuple(args.input_size), flops_size=flops_size,
                      num_points=args.points, rms_radius=args.radius, ntk_batch=args.ntk_batch, seed=args.seed,
                      output=args.output)
    table = format_table(reports, flops_size)
    settings = (f"scores at {args.input_size[0]}x{args.input_size[1]}, L^E: {args.points} points, RMS radius "
                f"{args.radius}, output '{args.output}'; NTK: batch {args.ntk_batch}; seed {args.seed}")
    print(table)
    print(settings)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n\n" + settings + "\n")
        print(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
