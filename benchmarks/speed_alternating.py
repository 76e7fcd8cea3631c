"""Backbone training steps of shipped configs, alternating in one process: time ratios without per-process modes.

``vil_speed.py`` measures every cell in a fresh process, which memory needs. On a shared VM, though, a process can
land in a slower or faster state for its whole life (on the 2-core VM of this work ViL-T's step time in separate
processes falls into two groups about 20-40 % apart, while the ratio between models inside one process stays put),
so ratios between processes carry that spread. Here every model is built from its shipped config in one process
and the models' training steps (batch 1, forward + backward of the mean of the outputs) alternate over
``--rounds`` rounds: the median of each and its ratio to ``--reference``. The first step of each model is timed
apart (it includes any ``torch.compile``). Time only; memory: ``vil_speed.py``. Writes ``--out-dir``/``--name``.md.

    python benchmarks/speed_alternating.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vil_speed import MODELS  # noqa: E402  (one model -> config mapping for the speed benchmarks)


def training_step(model, x) -> Callable[[], None]:
    """One backbone training step of ``model`` on ``x`` (the loss: the sum of the outputs' means)."""
    import torch

    def step() -> None:
        outs = model(x)
        loss = sum(o.float().mean() for o in (outs if isinstance(outs, (list, tuple)) else [outs]))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def measure(models: List[str], side: int, rounds: int, device) -> Dict[str, Dict[str, float]]:
    """Per model: the first step's seconds and the median over the alternating rounds."""
    import torch

    from vilseg.apis import build_backbone
    from vilseg.profiling.timing import alternating_medians

    steps, first = {}, {}
    x = torch.randn(1, 3, side, side, device=device)
    for name in models:
        torch.manual_seed(0)
        model = build_backbone(MODELS[name], side).to(device)
        model.train()
        steps[name] = training_step(model, x)
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
        print(f"{name} {side}²: first step {first[name]:.1f} s", flush=True)
    medians = alternating_medians(steps, rounds)
    return {name: dict(first_s=first[name], seconds=medians[name]) for name in models}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=["vil_t", "vil_t_compiled", "deit_t"], choices=list(MODELS))
    parser.add_argument("--reference", default="deit_t", choices=list(MODELS),
                        help="the model the ratios divide by (one of --models)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="work_dirs/speed_alternating")
    parser.add_argument("--name", default="speed_alternating")
    args = parser.parse_args(argv)
    if args.reference not in args.models:
        parser.error(f"--reference {args.reference} must be one of --models {args.models}")
    import torch

    from vilseg.utils.env import provenance_lines, write_markdown

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    results = {side: measure(args.models, side, args.rounds, device) for side in args.sizes}
    lines = ["# Backbone training steps, alternating in one process", "",
             *provenance_lines("benchmarks/speed_alternating.py", argv_used),
             f"- started: {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Backbones of the shipped configs, batch 1, forward + backward; all models in one process, their steps "
             f"alternating over {args.rounds} rounds. Median seconds per step, in brackets the ratio to "
             f"{args.reference} (below 1: faster); `first`: the first step, which includes any compile.", "",
             "| model | " + " | ".join(f"{s}²" for s in args.sizes) + " |",
             "|---|" + "---:|" * len(args.sizes)]
    for name in args.models:
        cells = []
        for side in args.sizes:
            r, ref = results[side][name], results[side][args.reference]["seconds"]
            ratio = "" if name == args.reference else f" [{r['seconds'] / ref:.2f}]"
            cells.append(f"{r['seconds']:.3f} s{ratio}, first {r['first_s']:.1f} s")
        lines.append(f"| {name} (`{MODELS[name]}`) | " + " | ".join(cells) + " |")
    write_markdown(args.out_dir, f"{args.name}.md", lines, echo_last=len(args.models) + 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
