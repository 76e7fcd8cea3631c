"""Backbone training steps of shipped configs, alternating in one process: every model under the same machine state.

``vil_speed.py`` measures every cell in a fresh process, which memory needs, so its time ratios compare processes.
On a shared VM the machine can be in a slower or faster state, often for a process's whole life, sometimes
changing within it (on the 2-core VM of this work ViL-T's step times fall into two groups; pinning the OpenMP threads
does not remove them: ``step_time_states.py``), and a ratio between two processes carries that spread. Here every
model is built from its shipped config in one process and the models' training steps (batch 1, forward + backward
of the mean of the outputs) alternate over ``--rounds`` rounds: the median of each and its ratio
to ``--reference``, all under the same machine state. That state still differs from run to run, and it moves ViL's
time more than DeiT's, so repeat the run to see the spread of the ratios; the table records the memory bandwidth a
copy of 256 MiB reaches before and after the rounds as one description of the state. The first step of each model
is timed apart (it includes any ``torch.compile``). Time only; memory: ``vil_speed.py``. Writes
``--out-dir``/``--name``.md, rewritten after every first step and every round, so that a run cut short (a time
limit, as in ``gpu_check.sh``) leaves the first steps and the medians of the rounds it finished.

    python benchmarks/speed_alternating.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vil_speed import MODELS  # noqa: E402  (one model -> config mapping for the speed benchmarks)


def training_steps(models: List[str], side: int, device,
                   configs: Mapping[str, str] = MODELS) -> Dict[str, Callable[[], None]]:
    """Per model: a training step of its config's backbone (``configs[model]``: the shipped ones by default) on one
    side x side input (batch 1), the models built in this process from the same seed."""
    import torch

    from vilseg.apis import build_backbone
    from vilseg.profiling.timing import backbone_training_step

    steps = {}
    x = torch.randn(1, 3, side, side, device=device)
    for name in models:
        torch.manual_seed(0)
        model = build_backbone(configs[name], side).to(device)
        model.train()
        steps[name] = backbone_training_step(model, x)
    return steps


def measure(models: List[str], side: int, rounds: int, device, result: Dict[str, Dict],
            on_update: Callable[[], None]) -> None:
    """Fill ``result`` per model with the first step's seconds (``first_s``), then the median over the alternating
    rounds finished so far (``seconds``, ``rounds``), calling ``on_update`` after every first step and round."""
    import statistics

    from vilseg.profiling.timing import alternating_times

    steps = training_steps(models, side, device)
    for name in models:
        start = time.perf_counter()
        steps[name]()
        result[name] = dict(first_s=time.perf_counter() - start)
        print(f"{name} {side}²: first step {result[name]['first_s']:.1f} s", flush=True)
        on_update()

    def after_round(samples: Dict[str, List[float]]) -> None:
        for name, seconds in samples.items():
            result[name].update(seconds=statistics.median(seconds), rounds=len(seconds))
        on_update()

    alternating_times(steps, rounds, after_round=after_round)


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of copying ``mib`` MiB between two preallocated CPU buffers (read + write counted), best of
    ``repeats``: a probe of the machine's memory state."""
    import torch

    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def _inductor_cache() -> str:
    """Where inductor caches compiled code and whether anything is there yet: a first compiled step with a filled
    cache skips most of the compile."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # the location moved between torch versions
        return "unknown"
    path = Path(cache_dir())
    filled = path.is_dir() and any(path.iterdir())
    return f"`{path}`, " + ("already filled (earlier compiles of these graphs are reused)" if filled else "empty")


def _cell(result: Dict[str, Dict], name: str, reference: str, rounds: int) -> str:
    """One model's cell of one size: median and ratio to the reference, first step; what is missing said."""
    r = result.get(name)
    if r is None:
        return "- (not run)"
    first = f"first {r['first_s']:.1f} s"
    if "seconds" not in r:
        return f"- (no round finished), {first}"
    ref = result.get(reference, {}).get("seconds")
    ratio = "" if name == reference or ref is None else f" [{r['seconds'] / ref:.2f}]"
    done = "" if r["rounds"] == rounds else f" ({r['rounds']} of {rounds} rounds)"
    return f"{r['seconds']:.3f} s{ratio}{done}, {first}"


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

    from vilseg.utils.env import provenance_lines, resolve_device, write_markdown

    torch.set_num_threads(args.threads)
    device = resolve_device()
    argv_used = sys.argv[1:] if argv is None else list(argv)
    cache, started = _inductor_cache(), time.strftime("%Y-%m-%d %H:%M")
    bandwidth = [copy_bandwidth(), None]
    results: Dict[int, Dict[str, Dict]] = {}

    def write(final: bool = False) -> None:
        after = "not measured (the run ended before)" if bandwidth[1] is None else f"{bandwidth[1]:.1f} after"
        lines = ["# Backbone training steps, alternating in one process", "",
                 *provenance_lines("benchmarks/speed_alternating.py", argv_used),
                 f"- started: {started}", f"- torch.compile's cache at the start: {cache}",
                 f"- memory bandwidth (copy of 256 MiB): {bandwidth[0]:.1f} GB/s before the steps, {after}",
                 "",
                 f"Backbones of the shipped configs, batch 1, forward + backward; all models in one process, their "
                 f"steps alternating over {args.rounds} rounds. Median seconds per step, in brackets the ratio to "
                 f"{args.reference} (below 1: faster); `first`: the first step, which includes any compile. A size "
                 f"whose rounds the run did not finish says how many it did.", "",
                 "| model | " + " | ".join(f"{s}²" for s in args.sizes) + " |",
                 "|---|" + "---:|" * len(args.sizes)]
        for name in args.models:
            lines.append(f"| {name} (`{MODELS[name]}`) | "
                         + " | ".join(_cell(results.get(side, {}), name, args.reference, args.rounds)
                                      for side in args.sizes) + " |")
        write_markdown(args.out_dir, f"{args.name}.md", lines, echo_last=len(args.models) + 2 if final else 0)

    for side in args.sizes:
        results[side] = {}
        measure(args.models, side, args.rounds, device, results[side], write)
    bandwidth[1] = copy_bandwidth()
    write(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
