"""Inference tiles of the ViL layer: how many grid rows a tile holds at least, side by side on the shipped backbone.

Builds ``--config``'s backbone (default: the shipped ``configs/vil_upernet_ade20k.py``) and times its inference
forward (batch 1) with every layer's ``inference_tile_min_rows`` set to each of ``--min-rows`` in turn (1: tiles of
about ``inference_tile_tokens`` tokens whatever the row length), alternating in one process over ``--rounds`` rounds
(median), so that all variants see the same machine. Each tile's up-projection also covers the halo rows its grid
convolution reads: thin tiles of long rows spend much of it on them, tall tiles leave the cache. The live-tensor
peak above model and input comes from one more forward of each under vilseg's tracker. Writes
``--out-dir``/vil_tiles.md with the machine, versions and command line.

    python benchmarks/vil_tiles.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

import torch

from vilseg.profiling.timing import alternating_medians
from vilseg.utils.env import provenance_lines, write_markdown


def measure(backbone: torch.nn.Module, side: int, variants: List[int], rounds: int) -> Dict[Tuple[int, str], float]:
    """{(min rows, 'seconds' | 'live_mib'): value}: median forward time over the rounds, live peak of one forward."""
    from vilseg.models.layers.vil_block import ViLLayer
    from vilseg.profiling.memory import measure_peak

    layers = [m for m in backbone.modules() if isinstance(m, ViLLayer)]
    if not layers:
        raise ValueError("the config's backbone has no ViL layers")
    x = torch.randn(1, 3, side, side)

    def use(rows: int) -> None:
        for layer in layers:
            layer.inference_tile_min_rows = rows

    result: Dict[Tuple[int, str], float] = {}
    with torch.no_grad():
        seconds = alternating_medians({v: lambda: backbone(x) for v in variants}, rounds, select=use)
        for v in variants:
            use(v)
            _, peak = measure_peak(lambda: backbone(x), track=[backbone, x])
            result[(v, "seconds")] = seconds[v]
            result[(v, "live_mib")] = (peak.peak_bytes - peak.start_bytes) / 2**20
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="image sides (pixels)")
    parser.add_argument("--min-rows", nargs="+", type=int, default=[1, 8, 16, 32],
                        help="values of inference_tile_min_rows to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="work_dirs/vil_tiles")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(s < 32 for s in args.sizes) or any(r < 1 for r in args.min_rows):
        parser.error("--rounds and every --min-rows value must be >= 1, every --sizes value >= 32")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tqdm import tqdm

    from vilseg.apis import build_backbone
    from vilseg.models.layers.vil_block import INFERENCE_TILE_MIN_ROWS

    results = {side: measure(build_backbone(args.config, side).eval(), side, args.min_rows, args.rounds)
               for side in tqdm(args.sizes, desc="sizes")}
    base = args.min_rows[0]
    lines = ["# ViL inference tiles: the fewest grid rows a tile holds", "",
             *provenance_lines("benchmarks/vil_tiles.py", sys.argv[1:] if argv is None else argv),
             f"- model: `{args.config}`'s backbone, batch 1, inference forward; all variants alternate in one "
             f"process, {args.rounds} rounds (median); vilseg's default: at least {INFERENCE_TILE_MIN_ROWS} rows", "",
             f"Seconds per forward, in brackets relative to min rows {base}; `live`: peak of live tensors above "
             "model and input (MiB).", "",
             "| min rows | " + " | ".join(f"{s}²" for s in args.sizes) + " |",
             "|---:|" + "---:|" * len(args.sizes)]
    for v in args.min_rows:
        cells = [f"{r[(v, 'seconds')]:.3f} s [{r[(v, 'seconds')] / r[(base, 'seconds')]:.2f}], "
                 f"live {r[(v, 'live_mib')]:.0f}" for r in results.values()]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    write_markdown(args.out_dir, "vil_tiles.md", lines, echo_last=len(args.min_rows) + 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
