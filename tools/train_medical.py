#!/usr/bin/env python
"""Train a 3D segmentation network (ViL-UNETR, MONAI UNETR/SwinUNETR, ...) from an mmengine config.

    python tools/train_medical.py configs/medical/vil_unetr_mni152.py
    python tools/train_medical.py configs/medical/vil_unetr_mni152.py --resume            # from work_dir/latest.pth
    python tools/train_medical.py configs/medical/unetr_mni152.py --work-dir work_dirs/u \\
        --cfg-options train.max_iters=200 data.dataset_json=/data/Task09_Spleen/dataset.json

This is a plain MONAI training loop (MONAI transforms, CacheDataset, DiceCELoss, sliding-window DiceMetric) driven
by an mmengine Config; it does not use mmengine's Runner (see vilseg/medical/train.py for why). Checkpoints
(work_dir/latest.pth, best.pth) are written atomically and loaded weights-only.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from mmengine.config import Config, DictAction

    from vilseg.utils.allocator import add_malloc_argument, configure_malloc

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config file, e.g. configs/medical/vil_unetr_mni152.py")
    parser.add_argument("--work-dir", help="output folder (default: the config's work_dir)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or from WORK_DIR/latest.pth when given without a path")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. train.max_iters=100 data.roi_size=[32,32,32]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    if args.malloc != "system":
        print(configure_malloc(args.malloc))

    if not os.path.isfile(args.config):
        parser.error(f"config file not found: {args.config}")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])

    from vilseg.medical.train import MissingConfigKeyError, train
    from vilseg.utils.checkpoint import CheckpointMismatchError, UnsafeCheckpointError

    try:
        result = train(cfg, work_dir=work_dir, resume=args.resume, progress=not args.no_progress)
    except (UnsafeCheckpointError, CheckpointMismatchError, FileNotFoundError, MissingConfigKeyError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"summary: {os.path.join(result['work_dir'], 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
