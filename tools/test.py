#!/usr/bin/env python
"""Evaluate a checkpoint (mmseg's tools/test.py interface): mIoU, a per-class IoU / accuracy table in the log,
and overlays with --show-dir (mmseg's SegVisualizationHook: image with ground truth | prediction).

    python tools/test.py configs/vil_upernet_ade20k.py work_dirs/vil_upernet_ade20k/iter_160000.pth
    python tools/test.py CONFIG CKPT --show-dir overlays --work-dir work_dirs/eval
    bash tools/dist_test.sh CONFIG CKPT 8
"""
from __future__ import annotations

import argparse
import os
import sys

from vilseg.utils.console import filter_known_warnings

filter_known_warnings()  # before mmengine's import, which already warns

from mmengine.config import DictAction  # noqa: E402


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MMSeg test (and eval) a model",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="folder for the logs and the metrics json")
    parser.add_argument("--out", help="folder to save the predicted label maps (PNG) for offline evaluation")
    parser.add_argument("--show", action="store_true", help="show prediction results in a window")
    parser.add_argument("--show-dir", help="folder where the painted overlays are saved")
    parser.add_argument("--wait-time", type=float, default=2, help="the interval of show (s)")
    parser.add_argument("--show-interval", type=_positive_int, default=1,
                        help="draw every N-th test image with --show / --show-dir (default 1: all)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override settings of the config, key=value pairs")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher")
    parser.add_argument("--tta", action="store_true", help="test time augmentation")
    parser.add_argument("--allow-partial", action="store_true",
                        help="load a checkpoint that does not fit the model exactly (only the tensors that fit; "
                             "what was left out is printed); without it such a checkpoint is an error")
    parser.add_argument("--verbose", action="store_true",
                        help="show mmengine's full console output (environment, config, hooks); the log file in "
                             "the work dir always has it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    from mmengine.dist import get_rank

    from vilseg.apis import USER_ERRORS, close_distributed, test

    try:
        metrics = test(args.config, args.checkpoint, work_dir=args.work_dir, cfg_options=args.cfg_options,
                       launcher=args.launcher, show_dir=args.show_dir, show=args.show, wait_time=args.wait_time,
                       out=args.out, tta=args.tta, show_interval=args.show_interval, verbose=args.verbose,
                       allow_partial=args.allow_partial)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if get_rank() == 0:
        print("\n" + "  ".join(f"{k}: {float(v):.2f}" for k, v in metrics.items() if np.ndim(v) == 0))
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
