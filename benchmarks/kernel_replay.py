"""What keeping the kernel's output saves in recomputing training: the shipped backbone with it and without it.

Builds ``--config``'s backbone (default: the shipped ``configs/vil_upernet_ade20k.py``) and times its training step
(forward + backward of the mean of all outputs, batch 1) with every layer's ``keep_kernel_output`` on (the recompute in
backward replays the chunkwise kernel's record of the no-autograd pass) and off (the recompute runs the kernel's
forward again), alternating in one process over ``--rounds`` rounds (median), so that both see the same
machine. The live-tensor peak above model and input comes from one more step of each under vilseg's tracker.
Writes ``--out-dir``/kernel_replay.md with the machine, versions and command line.

    python benchmarks/kernel_replay.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

import torch

from vilseg.profiling.timing import alternating_medians, backbone_training_step
from vilseg.utils.env import provenance_lines, write_markdown


def set_replay(backbone: torch.nn.Module, on: Optional[bool]) -> None:
    from vilseg.models.layers.vil_block import ViLLayer

    layers = [m for m in backbone.modules() if isinstance(m, ViLLayer)]
    if not layers:
        raise ValueError("the config's backbone has no ViL layers")
    for layer in layers:
        layer.keep_kernel_output = on


def measure(backbone: torch.nn.Module, side: int, rounds: int) -> Dict[Tuple[bool, str], float]:
    """{(kept, 'seconds' | 'live_mib'): value}: median step time over the rounds, live-tensor peak of one step."""
    from vilseg.profiling.memory import measure_peak

    x = torch.randn(1, 3, side, side)
    step = backbone_training_step(backbone, x)

    seconds = alternating_medians({True: step, False: step}, rounds, select=lambda on: set_replay(backbone, on))
    result: Dict[Tuple[bool, str], float] = {}
    for on in (True, False):
        set_replay(backbone, on)
        backbone.zero_grad(set_to_none=True)
        _, peak = measure_peak(step, track=[backbone, x])
        result[(on, "seconds")] = seconds[on]
        result[(on, "live_mib")] = (peak.peak_bytes - peak.start_bytes) / 2**20
    set_replay(backbone, None)  # back to the default
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image sides (pixels)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="work_dirs/kernel_replay")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(s < 32 for s in args.sizes):
        parser.error("--rounds must be >= 1 and every --sizes value >= 32")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tqdm import tqdm

    from vilseg.apis import build_backbone

    results = {side: measure(build_backbone(args.config, side).train(), side, args.rounds)
               for side in tqdm(args.sizes, desc="sizes")}
    lines = ["# Recomputing training: the kernel's output kept and replayed vs its forward run again", "",
             *provenance_lines("benchmarks/kernel_replay.py", sys.argv[1:] if argv is None else argv),
             f"- model: `{args.config}`'s backbone, batch 1, training step (forward + backward of the mean of the "
             f"outputs); both variants alternate in one process, {args.rounds} rounds (median)", "",
             "`live`: peak of live tensors above model and input (MiB), one step under vilseg's tracker.", "",
             "| image | kept: s | kept: live | forward again: s | forward again: live | time, kept / again "
             "| live, kept / again |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for side, r in results.items():
        on_s, off_s, on_m, off_m = r[(True, "seconds")], r[(False, "seconds")], r[(True, "live_mib")], \
            r[(False, "live_mib")]
        lines.append(f"| {side}² | {on_s:.3f} | {on_m:.0f} | {off_s:.3f} | {off_m:.0f} | {on_s / off_s:.2f} | "
                     f"{on_m / off_m:.2f} |")
    write_markdown(args.out_dir, "kernel_replay.md", lines, echo_last=len(results) + 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
