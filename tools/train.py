#!/usr/bin/env python
"""Train a segmentor from an mmseg/vilseg config (mmseg's tools/train.py interface).

    python tools/train.py configs/vil_upernet_ade20k.py
    python tools/train.py configs/demo/vil_upernet_ade20k_mini.py --work-dir work_dirs/mini
    python tools/train.py CONFIG --resume                     # from work_dir's last checkpoint
    python tools/train.py CONFIG --cfg-options train_dataloader.dataset.data_root=data/mini_ade/ADEChallengeData2016
    bash tools/dist_train.sh CONFIG 8                         # torchrun, --launcher pytorch

Works from any working directory: config paths and relative data roots are also looked up in the repository.
On a machine without CUDA, SyncBN becomes BN and torchrun uses gloo.
"""
from __future__ import annotations

import argparse
import os
import sys

from vilseg.utils.console import filter_known_warnings

filter_known_warnings()  # before mmengine's import, which already warns

from mmengine.config import DictAction  # noqa: E402

from vilseg.utils.allocator import add_malloc_argument  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentor",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in the work_dir automatically, or from CHECKPOINT")
    parser.add_argument("--amp", action="store_true", default=False,
                        help="enable automatic-mixed-precision training (CUDA)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override settings of the config, key=value pairs (e.g. train_cfg.max_iters=100)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher")
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument("--verbose", action="store_true",
                        help="show mmengine's full console output (environment, config, hooks); the log file in "
                             "the work dir always has it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.amp and not torch.cuda.is_available():
        print("error: --amp needs a CUDA device and none is available here (the ViL configs already train in "
              "mixed precision whenever CUDA is present)", file=sys.stderr)
        return 2
    from mmengine.dist import get_rank

    from vilseg.apis import USER_ERRORS, close_distributed, train
    from vilseg.apis.train import run_log_file

    try:
        runner = train(args.config, work_dir=args.work_dir, resume=args.resume, amp=args.amp,
                       cfg_options=args.cfg_options, launcher=args.launcher, verbose=args.verbose,
                       malloc=args.malloc)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if get_rank() == 0:
        last = os.path.join(runner.work_dir, f"iter_{runner.iter}.pth")
        print(f"done: {runner.iter} iterations; checkpoints in {runner.work_dir}"
              + (f" (last: {os.path.basename(last)})" if os.path.exists(last) else "")
              + f"; log {run_log_file(runner)}")
    del runner  # its DDP wrapper uses the process group: freed before the group, not at interpreter shutdown
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
