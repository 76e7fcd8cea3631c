"""How accurate a ViL layer's gradients are under autocast, gate by gate, as its forget gates decay faster.

Builds the first mLSTM layer of ``--config``'s backbone (default: the shipped ``configs/vil_upernet_ade20k.py``; as
trained: training mode, the config's recompute), sets every forget-gate bias to each value of
``--forget-gate-biases`` (``init``: the layer's initialisation, 3 to 6; lower values forget faster, as trained models'
faster-forgetting heads do), and runs one training step (forward + backward of the mean square of the output) on the
same (1, side^2, dim) tokens in float64 (the reference), in float32 and under autocast to each ``--dtypes`` (with
the loss scaled by ``--loss-scale`` and the gradients unscaled, as mixed-precision training scales float16 losses:
unscaled, a float16 step's small gradients fall below its range). For each, the largest error against the
reference as a fraction of the reference's largest entry: of the output, the input's gradient, the input gates' and
the forget gates' parameter gradients (weight and bias) and every other parameter's gradient. Writes
``--out-dir``/``--name``.md with the machine, versions and command line. ``--device cuda`` runs it on a GPU (the
kernel's Python form, as mixed-precision training there does; ``benchmarks/gpu_check.sh``).

    python benchmarks/autocast_gate_gradients.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

COLUMNS = ("output", "input", "input gates", "forget gates", "other parameters")


def column(name: str) -> str:
    """The table column of a parameter's gradient."""
    if "igate" in name:
        return "input gates"
    if "fgate" in name:
        return "forget gates"
    return "other parameters"


def step(layer, x, side: int, dtype=None, autocast=None, loss_scale: float = 1.0) -> Dict[str, "object"]:
    """Output and gradients (by parameter name, and 'input') of one training step of ``layer`` in ``dtype`` (float32
    under autocast to ``autocast`` where given, on x's device; the loss times ``loss_scale``, the gradients divided by
    it), all as float64."""
    import torch

    layer.to(dtype)
    xi = x.detach().to(dtype, copy=True).requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(xi, (side, side))
        loss = y.to(dtype).square().mean() * loss_scale
    loss.backward()
    out = {"output": y.detach().double(), "input": xi.grad.double() / loss_scale}
    out.update({name: p.grad.double() / loss_scale for name, p in layer.named_parameters()})
    layer.zero_grad(set_to_none=True)
    return out


def errors(result: Dict[str, "object"], reference: Dict[str, "object"]) -> Dict[str, float]:
    """Per column: the largest error of its tensors, each as a fraction of its reference's largest entry."""
    table: Dict[str, float] = {}
    for name, ref in reference.items():
        key = name if name in ("output", "input") else column(name)
        err = float((result[name] - ref).abs().max() / (ref.abs().max() or 1.0))
        table[key] = max(table.get(key, 0.0), err)
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    parser.add_argument("--side", type=int, default=32, help="token grid side (32: a 512² image at patch 16)")
    parser.add_argument("--forget-gate-biases", nargs="+", default=["init", "1", "-1"],
                        help="'init' (the layer's initialisation) or numbers")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=("bfloat16", "float16"),
                        help="autocast dtypes")
    parser.add_argument("--loss-scale", type=float, default=2.0 ** 16,
                        help="loss scale of the autocast steps (mmengine's dynamic loss scaling starts at 2^16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default="autocast_gate_gradients")
    args = parser.parse_args(argv)
    biases = []
    for value in args.forget_gate_biases:
        try:
            biases.append(None if value == "init" else float(value))
        except ValueError:
            parser.error(f"--forget-gate-biases: 'init' or numbers expected, got {value!r}")

    import torch

    from vilseg.utils.env import provenance_lines, write_markdown

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from qkv_groups import first_layer  # (the config's first mLSTM layer, as trained)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.manual_seed(args.seed)
    layer = first_layer(args.config).to(args.device)
    initial = {name: p.detach().clone() for name, p in layer.named_parameters()}
    x = torch.randn(1, args.side ** 2, layer.proj_up.in_features, dtype=torch.float64).to(args.device)
    rows = []
    for bias in biases:
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(initial[name])
                if bias is not None and name.endswith("fgate.bias"):
                    p.fill_(bias)
        reference = step(layer, x, args.side, torch.float64)
        label = "init (3 to 6)" if bias is None else f"{bias:g}"
        runs = [("float32", step(layer, x, args.side, torch.float32))]
        runs += [(f"{d} autocast", step(layer, x, args.side, torch.float32, getattr(torch, d), args.loss_scale))
                 for d in args.dtypes]
        for precision, result in runs:
            rows.append((label, precision, errors(result, reference)))
            print(label, precision, " ".join(f"{c}: {rows[-1][2][c]:.1e}" for c in COLUMNS), flush=True)
    lines = ["# A ViL layer's gradients under autocast, as its forget gates decay faster", "",
             *provenance_lines("benchmarks/autocast_gate_gradients.py", sys.argv[1:] if argv is None else argv), "",
             f"The first mLSTM layer of `{args.config}` (training mode, on {args.device}), one training step on "
             f"(1, {args.side ** 2}, "
             f"{layer.proj_up.in_features}) tokens with every forget-gate bias set as given (autocast steps: loss "
             f"scaled by {args.loss_scale:g}, gradients unscaled). Largest error against "
             "the float64 step, as a fraction of the reference's largest entry (over weight and bias for the gates; "
             "over all the other parameters' gradients in the last column).", "",
             "| forget-gate bias | precision | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for label, precision, table in rows:
        lines.append(f"| {label} | {precision} | " + " | ".join(f"{table[c]:.1e}" for c in COLUMNS) + " |")
    write_markdown(args.out_dir, f"{args.name}.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
