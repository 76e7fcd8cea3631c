"""How the ViL layer applies its 4 x 4 block-diagonal q/k/v projections: dense groups of G blocks, side by side.

Builds ``--config``'s backbone (default: the shipped ``configs/vil_upernet_ade20k.py``) and times its first mLSTM
layer, one training step (forward + backward, the config's layer recompute) and one inference forward, for every
group size in one process, interleaved over ``--rounds`` rounds (median of the rounds' best). G = 1 is a batched
matmul over the 4 x 4 blocks themselves, G = blocks per head one dense matmul per head; G multiplies the
projections' multiply-adds. Writes benchmarks/results/qkv_groups.md with the machine, versions and command line.

    python benchmarks/qkv_groups.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from vilseg.utils.env import provenance_lines, write_markdown


def first_layer(config: str) -> torch.nn.Module:
    """The first mLSTM layer of the config's backbone (as trained: training mode, the config's recompute)."""
    from vilseg.apis import load_config
    from vilseg.engine.registry import build_model
    from vilseg.models.layers.vil_block import ViLLayer

    backbone = build_model(load_config(config).model.backbone)
    layer = next(m for m in backbone.modules() if isinstance(m, ViLLayer))
    return layer.train()


def time_layer(layer: torch.nn.Module, side: int, groups: List[int], rounds: int,
               repeats: int = 3) -> Dict[Tuple[int, str], float]:
    """Seconds per call, {(group blocks, 'train' | 'infer'): median over rounds of the best of ``repeats``}."""
    dim = layer.proj_up.in_features
    x = torch.randn(1, side * side, dim, requires_grad=True)
    samples: Dict[Tuple[int, str], List[float]] = {}
    for _ in range(rounds):
        for g in groups:
            layer.qkv_group_blocks = g
            train, infer = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                layer(x, (side, side)).mean().backward()
                train.append(time.perf_counter() - t)
                with torch.no_grad():
                    t = time.perf_counter()
                    layer(x, (side, side))
                    infer.append(time.perf_counter() - t)
            samples.setdefault((g, "train"), []).append(min(train))
            samples.setdefault((g, "infer"), []).append(min(infer))
    return {key: statistics.median(v) for key, v in samples.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    parser.add_argument("--grids", nargs="+", type=int, default=[32, 64],
                        help="token grid sides (32: a 512² image at patch 16)")
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4, 8, 0],
                        help="blocks per dense group; 0: a whole head")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="work_dirs/qkv_groups")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from vilseg.models.layers.vil_block import QKV_GROUP_BLOCKS

    layer = first_layer(args.config)
    per_head = layer.q_proj.num_blocks // layer.mlstm_cell.num_heads
    groups = [g or per_head for g in args.groups]
    from tqdm import tqdm

    results = {side: time_layer(layer, side, groups, args.rounds) for side in tqdm(args.grids, desc="grids")}
    lines = ["# q/k/v projections in dense groups of 4 x 4 blocks: one ViL layer", "",
             *provenance_lines("benchmarks/qkv_groups.py", sys.argv[1:] if argv is None else argv),
             f"- layer: the first mLSTM layer of `{args.config}`'s backbone (dim {layer.proj_up.in_features}, "
             f"{layer.mlstm_cell.num_heads} heads, {per_head} blocks per head), batch 1; vilseg's default: groups "
             f"of {QKV_GROUP_BLOCKS}", "",
             "Milliseconds per call (median over rounds of the best of 3); in brackets the time relative to one "
             "dense matmul per head.", ""]
    head = "| group (blocks) | " + " | ".join(f"{s}x{s} train | {s}x{s} infer" for s in args.grids) + " |"
    lines += [head, "|---|" + "---:|" * (2 * len(args.grids))]
    for g in groups:
        cells = []
        for side in args.grids:
            for mode in ("train", "infer"):
                t, ref = results[side][(g, mode)], results[side][(per_head, mode)]
                cells.append(f"{1e3 * t:.1f} [{t / ref:.2f}]")
        label = f"{g} (a whole head)" if g == per_head else str(g)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_markdown(args.out_dir, "qkv_groups.md", lines, echo_last=len(groups) + 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
