#!/usr/bin/env python
"""`make demo`: the CPU demos of vilseg.

ADE20K part: generates the mini ADE20K set if absent, trains configs/demo/vil_upernet_ade20k_mini.py (ViL +
UperNet) on CPU, evaluates it (mIoU, per-class IoU in the log), compares with a constant prediction and writes an
overlay of a validation image. Medical part: vilseg.medical.demo.run_demo() (ViL-UNETR on the MNI152 case).

    python tools/demo.py                    # both parts
    python tools/demo.py --skip-medical     # ADE20K only
    python tools/demo.py --skip-ade         # medical only
    python tools/demo.py --ade-iters 1 --medical-iters 1   # a smoke run of both (schedules scale with the budget)
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from vilseg.utils.console import filter_known_warnings

filter_known_warnings()  # before mmengine's import, which already warns


def _iterations(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of iterations >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-ade", action="store_true", help="skip the ADE20K (2D) part")
    parser.add_argument("--skip-medical", action="store_true", help="skip the medical (3D) part")
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "demo_ade"),
                        help="ADE20K part: logs, checkpoints, overlay (default work_dirs/demo_ade under the "
                             "working directory)")
    parser.add_argument("--ade-iters", type=_iterations, default=None,
                        help="ADE20K part: training iterations (default: the mini config's; its warm-up and cosine "
                             "schedule scale with it)")
    parser.add_argument("--medical-iters", type=_iterations, default=None,
                        help="medical part: training iterations (default: the demo's)")
    return parser.parse_args(argv)


def run_ade(args: argparse.Namespace) -> bool:
    from vilseg.apis.demo import format_summary, run_ade_demo

    print("=" * 30 + " ADE20K: ViL + UperNet on the mini ADE20K set (CPU) " + "=" * 30, flush=True)
    summary = run_ade_demo(work_dir=args.work_dir, max_iters=args.ade_iters)
    print("\n" + format_summary(summary), flush=True)
    if summary["mIoU"] <= summary["constant_mIoU"]:
        print(f"the model does not beat the constant prediction after {summary['iters']} iterations (exit code 1)",
              flush=True)
        return False
    return True


def run_medical(max_iters=None) -> bool:
    # ----------------------------------------------------------------------------------------------------------
    # Medical part (3D, MONAI): vilseg.medical.demo.run_demo(), provided by the medical side of vilseg.
    # Guarded: when that module is not there, the ADE20K part still runs alone.
    # ----------------------------------------------------------------------------------------------------------
    try:
        from vilseg.medical.demo import run_demo
    except ImportError as exc:
        print(f"medical demo not available ({exc}); skipped")
        return True
    print("=" * 30 + " Medical: ViL-UNETR on the MNI152 case (CPU) " + "=" * 30, flush=True)
    run_demo(**({} if max_iters is None else {"max_iters": max_iters}))  # outputs under ./work_dirs
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    ok = True
    if not args.skip_ade:
        ok = run_ade(args) and ok
    if not args.skip_medical:
        try:
            ok = run_medical(args.medical_iters) and ok
        except Exception:  # noqa: BLE001 - report, keep the ADE result, fail the run
            traceback.print_exc()
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
