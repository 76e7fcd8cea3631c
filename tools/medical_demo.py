#!/usr/bin/env python
"""The 3D demo alone: short CPU training on the MNI152 case, held-out Dice, slice PNG under work_dirs/.

    python tools/medical_demo.py                      # ViL-UNETR
    python tools/medical_demo.py --model unetr        # MONAI UNETR, same data, crops and iteration budget

Outputs go under --out-dir (work_dirs/ of the working directory). --record adds the run to the tracked table
benchmarks/results/medical_demo.md of this checkout (--record DIR: to DIR/medical_demo.md instead).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRACKED_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main(argv=None) -> int:
    from vilseg.medical.demo import DEMO_ITERS, DEMO_MODELS, run_demo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="vil_unetr")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS, help=f"training iterations (default {DEMO_ITERS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="work_dirs", help="outputs go to OUT_DIR/medical_demo_<model>/")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--record", nargs="?", const=str(TRACKED_RESULTS), default=None, metavar="DIR",
                        help="add the result to benchmarks/results/medical_demo.md (or DIR/medical_demo.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    run_demo(model=args.model, max_iters=args.iters, out_dir=args.out_dir, seed=args.seed,
             record=args.record, progress=not args.no_progress, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
