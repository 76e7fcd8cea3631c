#!/usr/bin/env python
"""Profile peak memory, time and FLOPs of ViL / ViT / Swin (2D) and ViL-UNETR / UNETR / SwinUNETR (3D)
against input resolution. Thin CLI over :mod:`vilseg.profiling.runner`.

Examples::

    # CPU, real runs where the estimate fits in 16 GiB, estimates elsewhere
    python tools/profile_memory.py --models vil-t,vit-t,vit-t+upernet --sizes 256 512 1024

    # estimates only (fake tensors), with the 80 GB out-of-memory search
    python tools/profile_memory.py --models 2d --sizes 256 512 1024 2048 --estimate --oom-search-gb 80

    python tools/profile_memory.py --list-models
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sizes(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size must be an integer edge length in pixels/voxels, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["2d"],
                   help="model names or groups (2d, 2d-backbones, 2d-segmentors, 3d, all), comma or space "
                        "separated; --list-models shows them (default: 2d)")
    p.add_argument("--sizes", nargs="+", type=_sizes, default=[256, 512, 1024, 2048],
                   help="2D input edges (s means s x s; default 256 512 1024 2048)")
    p.add_argument("--sizes-3d", nargs="+", type=_sizes, default=[64, 96, 128, 160],
                   help="3D input edges (s means s^3; default 64 96 128 160)")
    p.add_argument("--real-sizes", nargs="+", type=_sizes, default=None,
                   help="2D sizes that may run for real (default: all); the others are estimated only")
    p.add_argument("--real-sizes-3d", nargs="+", type=_sizes, default=None,
                   help="3D sizes that may run for real (default: all)")
    p.add_argument("--real-train-sizes", nargs="+", type=_sizes, default=None,
                   help="2D sizes whose training step may run for real (default: the real sizes); "
                        "inference still runs at every real size")
    p.add_argument("--real-train-sizes-3d", nargs="+", type=_sizes, default=None,
                   help="3D sizes whose training step may run for real (default: the real 3D sizes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 autocast")
    p.add_argument("--batch", type=int, default=2, help="2D training batch (default 2: UperNet's BN needs >= 2)")
    p.add_argument("--infer-batch", type=int, default=1, help="2D inference batch (default 1)")
    p.add_argument("--batch-3d", type=int, default=1, help="3D training batch (default 1)")
    p.add_argument("--infer-batch-3d", type=int, default=1, help="3D inference batch (default 1)")
    p.add_argument("--num-classes", type=int, default=150, help="2D classes (default 150, ADE20K)")
    p.add_argument("--num-classes-3d", type=int, default=4, help="3D classes (default 4)")
    p.add_argument("--steps", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                   help="which steps to profile (default both)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true",
                      help="estimate only: fake tensors, no real run (any size, no memory used)")
    mode.add_argument("--real-only", action="store_true",
                      help="real runs only, no estimate first (so no skipping by estimate; --max-mem-gb still "
                           "caps the worker's memory and an overrun is recorded as oom)")
    p.add_argument("--max-mem-gb", type=float, default=16.0,
                   help="real runs whose estimate exceeds this are skipped (estimate only), and a real "
                        "worker's memory is capped a little above it (default 16; 0 = no cap)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (default 900)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up run (default 3)")
    p.add_argument("--max-repeat-seconds", type=float, default=60.0,
                   help="stop repeating once this many seconds are spent on a step (default 60)")
    p.add_argument("--optimizer-step", action="store_true", help="include an AdamW step in the training step")
    p.add_argument("--head-loss", default="chunked", choices=["chunked", "mmseg"],
                   help="2D segmentors' UperNet / FCN heads: 'chunked' (default: vilseg's ChunkedLoss heads, same "
                        "loss computed in bands of rows) or 'mmseg' (mmseg's heads, full-resolution logits)")
    p.add_argument("--backend", default="live", choices=["live", "torch"],
                   help="CPU tracker: live (vilseg's, O(1) per op) or torch "
                        "(torch.distributed._tools MemTracker); both give the same peak")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--oom-search-gb", type=float, default=None,
                   help="after the sweep, estimate the training step at growing sizes until this many GiB "
                        "are exceeded (e.g. 80), and extrapolate the fitted growth law to it")
    p.add_argument("--oom-search-timeout", type=float, default=None,
                   help="seconds per estimate of that search (default: --timeout); a time-out ends the "
                        "search and the extrapolation stands")
    p.add_argument("--out-dir", default="work_dirs/profile_memory",
                   help="where CSV / JSON / PNG go (the tracked tables: --out-dir benchmarks/results)")
    p.add_argument("--prefix", default="profile_memory", help="file name stem (default profile_memory)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list-models", action="store_true", help="list the known models and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    from vilseg.profiling.models import MODEL_GROUPS, MODEL_SPECS
    from vilseg.profiling.runner import ProfileConfig, run_profile, summary_tables, validate_config
    from vilseg.utils.console import print_tables

    console = Console()
    if args.list_models:
        for name, spec in MODEL_SPECS.items():
            reason = spec.unavailable_reason()
            console.print(f"{name:<24} {spec.dims}D  {spec.description}" + (f"  [unavailable: {reason}]" if reason else ""))
        console.print("groups: " + ", ".join(f"{g} ({len(m)})" for g, m in MODEL_GROUPS.items()))
        return 0
    cfg = ProfileConfig(
        models=args.models, sizes_2d=args.sizes, sizes_3d=args.sizes_3d, real_sizes_2d=args.real_sizes,
        real_sizes_3d=args.real_sizes_3d, real_train_sizes_2d=args.real_train_sizes,
        real_train_sizes_3d=args.real_train_sizes_3d, device=args.device, dtype=args.dtype, batch=args.batch,
        infer_batch=args.infer_batch, batch_3d=args.batch_3d, infer_batch_3d=args.infer_batch_3d,
        num_classes=args.num_classes, num_classes_3d=args.num_classes_3d, steps=tuple(args.steps),
        estimate_only=args.estimate, real_only=args.real_only,
        max_mem_gb=args.max_mem_gb if args.max_mem_gb > 0 else None, timeout_s=args.timeout,
        repeats=args.repeats, max_repeat_seconds=args.max_repeat_seconds, optimizer_step=args.optimizer_step,
        head_loss=args.head_loss, backend=args.backend, threads=args.threads, count_flops=not args.no_flops,
        oom_search_gb=args.oom_search_gb, oom_search_timeout_s=args.oom_search_timeout, out_dir=args.out_dir, prefix=args.prefix,
        command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        plot=not args.no_plot, quiet=args.quiet,
    )
    try:
        validate_config(cfg)
    except ValueError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True, markup=True)
        return 2
    report = run_profile(cfg)
    if not args.quiet:
        print_tables(summary_tables(report))
        console.print("written: " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
