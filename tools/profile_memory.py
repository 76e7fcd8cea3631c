#!/usr/bin/env python
"""Profile peak memory, time and FLOPs of models against input resolution: ViL-T, DeiT-T (as shipped and through
SDPA), Swin-T, Sequencer2D-S, LambdaResNet-50, each alone and with its config's UperNet (2D), and ViL-UNETR, UNETR,
SwinUNETR (3D), all built from the shipped configs. Thin CLI over :mod:`vilseg.profiling.sweep`.

Examples::

    # CPU, real runs where the estimate fits in 16 GiB, estimates elsewhere
    python tools/profile_memory.py --models vil-t,deit-t,deit-t+upernet --sizes 256 512 1024

    # estimates only (fake tensors), with the 80 GB out-of-memory search
    python tools/profile_memory.py --models 2d --sizes 256 512 1024 2048 --estimate --oom-search-gb 80

    # a config file works wherever a name does (+upernet: its whole segmentor)
    python tools/profile_memory.py --models configs/vil_fpn_ade20k.py+upernet --sizes 256

    python tools/profile_memory.py --list-models
"""

from __future__ import annotations

import argparse
import shlex
import sys

from vilseg.profiling.settings import BACKENDS, DTYPES, STEPS, ProfileConfig

D = ProfileConfig()  # the defaults


def _size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size must be an integer edge length in pixels/voxels, got {text!r}")


def _list(values) -> str:
    return " ".join(map(str, values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=D.models,
                   help="model names, config paths or groups (2d, 2d-backbones, 2d-segmentors, 3d, all), comma or "
                        f"space separated; --list-models shows them (default: {_list(D.models)})")
    p.add_argument("--sizes", nargs="+", type=_size, default=D.sizes_2d,
                   help=f"2D input edges (s means s x s; default {_list(D.sizes_2d)})")
    p.add_argument("--sizes-3d", nargs="+", type=_size, default=D.sizes_3d,
                   help=f"3D input edges (s means s^3; default {_list(D.sizes_3d)})")
    p.add_argument("--real-sizes", nargs="+", type=_size, default=D.real_sizes_2d,
                   help="2D sizes that may run for real (default: all); the others are estimated only")
    p.add_argument("--real-sizes-3d", nargs="+", type=_size, default=D.real_sizes_3d,
                   help="3D sizes that may run for real (default: all)")
    p.add_argument("--real-train-sizes", nargs="+", type=_size, default=D.real_train_sizes_2d,
                   help="2D sizes whose training step may run for real (default: the real sizes); "
                        "inference still runs at every real size")
    p.add_argument("--real-train-sizes-3d", nargs="+", type=_size, default=D.real_train_sizes_3d,
                   help="3D sizes whose training step may run for real (default: the real 3D sizes)")
    p.add_argument("--device", default=D.device, help=f"cpu, cuda or cuda:N (default {D.device})")
    p.add_argument("--dtype", default=D.dtype, choices=DTYPES, help="float32, or bfloat16 autocast")
    p.add_argument("--batch", type=int, default=D.batch,
                   help=f"2D training batch (default {D.batch}: UperNet's BN needs >= 2)")
    p.add_argument("--infer-batch", type=int, default=D.infer_batch, help=f"2D inference batch ({D.infer_batch})")
    p.add_argument("--batch-3d", type=int, default=D.batch_3d, help=f"3D training batch ({D.batch_3d})")
    p.add_argument("--infer-batch-3d", type=int, default=D.infer_batch_3d,
                   help=f"3D inference batch ({D.infer_batch_3d})")
    p.add_argument("--num-classes", type=int, default=D.num_classes,
                   help="2D classes (default: the config's, 150 for the ADE20K configs)")
    p.add_argument("--num-classes-3d", type=int, default=D.num_classes_3d,
                   help="3D classes (default: the config's, 3 for the MNI152 configs)")
    p.add_argument("--steps", nargs="+", default=list(D.steps), choices=STEPS,
                   help="which steps to profile (default both)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true",
                      help="estimate only: fake tensors, no real run (any size, no memory used)")
    mode.add_argument("--real-only", action="store_true",
                      help="real runs only, no estimate first (so no skipping by estimate; --max-mem-gb still "
                           "caps the worker's memory and an overrun is recorded as oom)")
    p.add_argument("--max-mem-gb", type=float, default=D.max_mem_gb,
                   help="real runs whose estimate exceeds this are skipped (estimate only), and a real "
                        f"worker's memory is capped a little above it (default {D.max_mem_gb:g}; 0 = no cap)")
    p.add_argument("--timeout", type=float, default=D.timeout_s,
                   help=f"seconds per configuration (default {D.timeout_s:g})")
    p.add_argument("--repeats", type=int, default=D.repeats,
                   help=f"timed repeats after the warm-up run (default {D.repeats})")
    p.add_argument("--max-repeat-seconds", type=float, default=D.max_repeat_seconds,
                   help=f"stop repeating once this many seconds are spent on a step (default {D.max_repeat_seconds:g})")
    p.add_argument("--optimizer-step", action="store_true", help="include an AdamW step in the training step")
    p.add_argument("--head-loss", default=D.head_loss, choices=["chunked", "mmseg"],
                   help="2D segmentors' UperNet / FCN heads: 'chunked' (default, as the configs ship them: vilseg's "
                        "ChunkedLoss heads, same loss computed in bands of rows) or 'mmseg' (mmseg's heads, "
                        "full-resolution logits)")
    p.add_argument("--backend", default=D.backend, choices=BACKENDS,
                   help="CPU tracker: live (vilseg's, O(1) per op) or torch "
                        "(torch.distributed._tools MemTracker); both give the same peak")
    p.add_argument("--threads", type=int, default=D.threads, help="torch threads per worker (default: torch's)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--oom-search-gb", type=float, default=D.oom_search_gb,
                   help="after the sweep, estimate the training step at growing sizes until this many GiB "
                        "are exceeded (e.g. 80; a swept size's peak is taken from the sweep, not run again), and "
                        "extrapolate the fitted growth law to it")
    p.add_argument("--oom-search-timeout", type=float, default=D.oom_search_timeout_s,
                   help="seconds per estimate of that search (default: --timeout); a time-out ends the "
                        "search and the extrapolation stands")
    p.add_argument("--out-dir", default=D.out_dir,
                   help=f"where CSV / JSON / PNG go (default {D.out_dir}; the tracked tables: --out-dir "
                        "benchmarks/results)")
    p.add_argument("--prefix", default=D.prefix, help=f"file name stem (default {D.prefix})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list-models", action="store_true", help="list the known models and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from vilseg.utils.console import filter_known_warnings

    filter_known_warnings()  # before mmengine's import, which already warns
    args = build_parser().parse_args(argv)
    from rich.console import Console

    from vilseg.profiling.names import ALIASES, MODEL_GROUPS, MODEL_NAMES
    from vilseg.profiling.report import summary_tables
    from vilseg.profiling.settings import validate_config
    from vilseg.profiling.sweep import run_profile
    from vilseg.utils.console import print_tables

    if args.list_models:
        for name, entry in MODEL_NAMES.items():
            options = " ".join(f"{k}={v!r}" for k, v in entry.options)
            print(f"{name:<16} {entry.dims}D  {entry.description}; {entry.config}" + (f" {options}" if options else ""))
        print("2D names also take '+upernet' (the config's whole segmentor); a config path works as a name")
        print("aliases: " + ", ".join(f"{a} = {n}" for a, n in ALIASES.items()))
        print("groups: " + ", ".join(f"{g} ({len(m)})" for g, m in MODEL_GROUPS.items()))
        return 0
    console = Console()
    cfg = ProfileConfig(
        models=args.models, sizes_2d=args.sizes, sizes_3d=args.sizes_3d, real_sizes_2d=args.real_sizes,
        real_sizes_3d=args.real_sizes_3d, real_train_sizes_2d=args.real_train_sizes,
        real_train_sizes_3d=args.real_train_sizes_3d, device=args.device, dtype=args.dtype, batch=args.batch,
        infer_batch=args.infer_batch, batch_3d=args.batch_3d, infer_batch_3d=args.infer_batch_3d,
        num_classes=args.num_classes, num_classes_3d=args.num_classes_3d, steps=tuple(args.steps),
        estimate_only=args.estimate, real_only=args.real_only,
        max_mem_gb=args.max_mem_gb if args.max_mem_gb and args.max_mem_gb > 0 else None, timeout_s=args.timeout,
        repeats=args.repeats, max_repeat_seconds=args.max_repeat_seconds, optimizer_step=args.optimizer_step,
        head_loss=args.head_loss, backend=args.backend, threads=args.threads, count_flops=not args.no_flops,
        oom_search_gb=args.oom_search_gb, oom_search_timeout_s=args.oom_search_timeout, out_dir=args.out_dir,
        prefix=args.prefix, plot=not args.no_plot, quiet=args.quiet,
        command="python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
    )
    try:
        validate_config(cfg)
    except (ValueError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True, markup=True)
        return 2
    report = run_profile(cfg)
    if not args.quiet:
        print_tables(summary_tables(report))
        console.print("written: " + ", ".join(report["files"].values()), soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
