"""ViL layers of a git revision against the working tree: the training step, alternating in one process.

Loads ``vilseg/ops/mlstm.py``, ``vilseg/ops/vil_layer.py`` and ``vilseg/models/layers/vil_block.py`` as they are at
``--ref`` (``git show``; this repository's own history, run as code) next to the working tree's, on the native
extension of the same revision: where ``vilseg/ops/csrc`` at ``--ref`` differs from the working tree's, that C++ is
built first (in a temporary directory, with the installed extension's flags from ``vilseg/ops/native_build.py``),
else both share the installed extension. Then it builds the same stack of ``--layers`` ViL-T
layers (dim 192, 4 heads, alternating reading directions, default tiles and recompute) from both with the same
weights, checks that outputs and gradients agree, then times forward + backward of a (1, side^2, 192) token grid for
each side of ``--sides`` with the two alternating over ``--rounds`` rounds (median): a change to the layer or the
kernels measured alone, on the same machine state. ``--forget-gate-bias`` sets every layer's forget-gate bias (the
initialised layers' slow decays never reach the float range's denormals; faster-forgetting gates do). Writes
``--out-dir``/``--name``.md with the machine, versions, command line and both revisions. With ``--operators`` (where the
C++ differs) it also times each native operator of one ViL-T layer's step on the first side's grid, the ref's
extension and the working tree's alternating: a change to one operator, measured where the layer stack's noise
would hide it.

    python benchmarks/layer_revisions.py --ref HEAD~1 --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from vilseg.profiling.timing import alternating_medians
from vilseg.utils.env import provenance_lines, write_markdown

ROOT = Path(__file__).resolve().parents[1]
# under autocast each revision's output and gradients must stay within this fraction of each tensor's largest entry
# of the fp32 step: bf16 rounding through a few layers reaches a few percent on the gate weights' gradients, a wrong
# result is off by its own size
AUTOCAST_TOLERANCE = 0.15
MODULES = {"mlstm": "vilseg/ops/mlstm.py", "vil_layer": "vilseg/ops/vil_layer.py",
           "vil_block": "vilseg/models/layers/vil_block.py"}
NATIVE_SOURCES = "vilseg/ops/csrc"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def native_differs(ref: str) -> bool:
    """Whether the native extension's sources at ``ref`` differ from the working tree's."""
    return subprocess.run(["git", "diff", "--quiet", ref, "--", NATIVE_SOURCES], cwd=ROOT).returncode != 0


def build_native(ref: str, tag: str) -> types.ModuleType:
    """The native extension as it is at ``ref``, compiled into a temporary directory under the module name
    ``{tag}_native``, with the installed extension's flags (:mod:`vilseg.ops.native_build`)."""
    import tempfile

    from torch.utils.cpp_extension import load

    from vilseg.ops.native_build import compile_flags

    build_dir = Path(tempfile.mkdtemp(prefix=f"{tag}_native_"))
    sources = []
    for name in _git("ls-tree", "--name-only", f"{ref}:{NATIVE_SOURCES}").split():
        (build_dir / name).write_text(_git("show", f"{ref}:{NATIVE_SOURCES}/{name}"))
        if name.endswith(".cpp"):
            sources.append(str(build_dir / name))
    print(f"building the native extension of {ref} in {build_dir} ...", flush=True)
    cflags, ldflags = compile_flags()
    module = load(f"{tag}_native", sources, extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(build_dir))
    sys.modules[module.__name__] = module
    return module


def load_revision(ref: str, native: bool) -> types.ModuleType:
    """``vil_block`` as it is at ``ref``, importing the kernels and fused operators of the same revision (module
    names of their own, so nothing of the working tree's package is replaced), on the extension of ``ref`` built by
    :func:`build_native` where ``native``, else on the installed one."""
    tag = "vilseg_rev_" + _git("rev-parse", "--short", ref).strip()
    imports = {"from vilseg.ops.mlstm import": f"from {tag}_mlstm import",
               "from vilseg.ops.vil_layer import": f"from {tag}_vil_layer import"}
    if native:
        build_native(ref, tag)
        imports.update({"from vilseg.ops import _native as _ext": f"import {tag}_native as _ext",
                        "from vilseg.ops import _native": f"import {tag}_native as _native"})
    for key in MODULES:
        source = _git("show", f"{ref}:{MODULES[key]}")
        for old, new in imports.items():
            source = source.replace(old, new)
        module = types.ModuleType(f"{tag}_{key}")
        sys.modules[module.__name__] = module
        exec(compile(source, f"{ref}:{MODULES[key]}", "exec"), module.__dict__)
    return sys.modules[f"{tag}_vil_block"]


def operator_calls(ext: types.ModuleType, side: int) -> Dict[str, Callable[[], object]]:
    """The native operators of one ViL-T layer's training step (dim 192: inner 384 channels, 4 heads, chunks of 64;
    batch 1, a side x side grid, one tile) on extension ``ext``, each a call with fixed inputs (seed 0), in the order
    the step runs them."""
    torch.manual_seed(0)
    B, C, NH, L = 1, 384, 4, 64
    T = side * side
    up = torch.randn(B, T, 2 * C)
    x, z = up[..., :C], up[..., C:]
    conv_w, conv_b = torch.randn(C, 9) * 0.2, torch.randn(C) * 0.1
    proj = [torch.randn(C // 4, 4, 4) * 0.3 for _ in range(3)]
    gate_wc, gate_wm, gate_b = torch.randn(C, 2 * NH) * 0.05, torch.randn(C, 2 * NH) * 0.05, torch.randn(2 * NH)
    norm_w, norm_b, skip = torch.randn(C), torch.randn(C), torch.randn(C)
    grad = torch.randn(B, T, C)
    xc = ext.conv_silu_forward(x, conv_w, conv_b, side, side, 0, side)
    cell = ext.cell_inputs_forward(xc, x, *proj, None, None, None, gate_wc, gate_wm, gate_b, NH)
    q, k, v, ig, fg = [t.view(B, NH, T // L, L, *t.shape[3:]) for t in cell]
    m0 = ig.new_full((B, NH), -1e30)
    c_in, n_in, m_in, c_f, n_f, m_f, h, denom, normaliser, m, *scores = ext.chunkwise_forward(
        q, k, v, ig, fg, None, None, m0, 1e-6, True)  # (scores: from extensions whose backward may be handed them)
    h_tokens = h.view(B, NH, T, -1)
    _, mean, rstd = ext.gated_norm_forward(h_tokens, norm_w, norm_b, skip, xc, z, 1e-5, None)
    dh, dxc = ext.gated_norm_backward(grad, h_tokens, mean, rstd, norm_w, norm_b, skip, xc, z, None)[:2]
    states = (c_in, n_in, m_in, m_f)
    try:
        dq, dk, dv, dig, dfg = ext.chunkwise_backward(dh.view(h.shape), None, None, q, k, v, ig, fg, *states, h,
                                                      denom, normaliser, m, False)[:5]
    except TypeError:  # an extension from before the kernel's backward took m after the last chunk: C and n there
        states = (c_in, n_in, m_in, c_f, n_f)
        dq, dk, dv, dig, dfg = ext.chunkwise_backward(dh.view(h.shape), None, None, q, k, v, ig, fg, *states, h,
                                                      denom, normaliser, m, False)[:5]
    d_cell = [t.view(B, NH, T, -1) for t in (dq, dk, dv)] + [t.view(B, NH, T) for t in (dig, dfg)]
    dxc, dxm = ext.cell_inputs_backward(*d_cell, xc, x, *proj, gate_wc, gate_wm, dxc)[:2]
    return {
        "conv_silu_forward": lambda: ext.conv_silu_forward(x, conv_w, conv_b, side, side, 0, side),
        "cell_inputs_forward": lambda: ext.cell_inputs_forward(xc, x, *proj, None, None, None, gate_wc, gate_wm,
                                                               gate_b, NH),
        "chunkwise_forward": lambda: ext.chunkwise_forward(q, k, v, ig, fg, None, None, m0, 1e-6, True),
        "gated_norm_forward": lambda: ext.gated_norm_forward(h_tokens, norm_w, norm_b, skip, xc, z, 1e-5, None),
        "gated_norm_backward": lambda: ext.gated_norm_backward(grad, h_tokens, mean, rstd, norm_w, norm_b, skip, xc,
                                                               z, None),
        "chunkwise_backward": lambda: ext.chunkwise_backward(dh.view(h.shape), None, None, q, k, v, ig, fg, *states,
                                                             h, denom, normaliser, m, False, *scores),
        "cell_inputs_backward": lambda: ext.cell_inputs_backward(*d_cell, xc, x, *proj, gate_wc, gate_wm, dxc),
        "conv_silu_backward": lambda: ext.conv_silu_backward(dxc, x, conv_w, conv_b, side, side, 0, side, None, T,
                                                             dxm),
    }


def measure_operators(ref_ext: types.ModuleType, side: int, rounds: int) -> List[Tuple[str, float, float]]:
    """(operator, ref seconds, working tree seconds) per native operator (:func:`operator_calls`), each the median
    of ``rounds`` alternating rounds of 20 calls each (per call); the two revisions' results checked to agree."""
    from vilseg.ops import _native

    calls = {"ref": operator_calls(ref_ext, side), "new": operator_calls(_native, side)}
    rows = []
    for name in calls["new"]:
        outs = [calls[key][name]() for key in ("ref", "new")]
        for a, b in zip(*[o if isinstance(o, (list, tuple)) else [o] for o in outs]):
            if a is not None and a.numel() and not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item()):
                raise AssertionError(f"{name}: the revisions' results differ")

        def repeat(fn: Callable[[], object]) -> Callable[[], None]:
            return lambda: [fn() for _ in range(20)]

        t = alternating_medians({key: repeat(calls[key][name]) for key in calls}, rounds)
        rows.append((name, t["ref"] / 20, t["new"] / 20))
    return rows


def build(module: types.ModuleType, layers: int) -> torch.nn.ModuleList:
    directions = ("rowwise_from_top_left", "rowwise_from_bot_right")
    return torch.nn.ModuleList([module.ViLLayer(192, direction=directions[i % 2]) for i in range(layers)])


def measure(stacks: Dict[str, torch.nn.ModuleList], side: int, rounds: int,
            autocast: Optional[torch.dtype] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median seconds of a training step per stack (under CPU autocast to ``autocast`` where given), and under
    autocast each stack's largest error against the first stack's fp32 step (over output and gradients, as a
    fraction of each tensor's largest entry; else empty). Raises if their outputs or gradients differ: in fp32 from
    each other (summation order apart); under autocast from that fp32 step by more than ``AUTOCAST_TOLERANCE``."""
    x = torch.randn(1, side * side, 192, requires_grad=True)

    def step(stack: torch.nn.ModuleList, dtype: Optional[torch.dtype] = autocast):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = x
            for layer in stack:
                y = layer(y, (side, side))
            loss = y.float().square().mean()
        loss.backward()
        grads = [x.grad] + [p.grad for p in stack.parameters()]
        stack.zero_grad(set_to_none=True)
        x.grad = None
        return y.detach().float(), grads

    results = [step(stack) for stack in stacks.values()]
    errors: Dict[str, float] = {}
    if autocast is None:
        (y_a, g_a), (y_b, g_b) = results
        torch.testing.assert_close(y_a, y_b, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_a, g_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    else:
        y_ref, g_ref = step(next(iter(stacks.values())), None)
        for name, (y, grads) in zip(stacks, results):
            for what, a, b in [("output", y, y_ref)] + [(f"gradient {i}", a, b) for i, (a, b)
                                                        in enumerate(zip(grads, g_ref, strict=True))]:
                err = float((a.float() - b).abs().max() / (b.abs().max() or 1.0))
                errors[name] = max(errors.get(name, 0.0), err)
                if err > AUTOCAST_TOLERANCE:
                    raise AssertionError(f"{name}: {what} differs from fp32 by {err:.3f} of its largest entry")
    times = alternating_medians({name: functools.partial(step, stack) for name, stack in stacks.items()}, rounds)
    return times, errors


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ref", default="HEAD~1", help="git revision to compare the working tree with")
    parser.add_argument("--sides", nargs="+", type=int, default=[32, 64], help="token grid sides (32: a 512² image "
                                                                                "at patch 16)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="run both under CPU autocast")
    parser.add_argument("--forget-gate-bias", type=float,
                        help="every layer's forget-gate bias (default: the layers' initialisation, 3 to 6): lower "
                             "values decay the mLSTM state faster, as in a trained model's faster-forgetting heads")
    parser.add_argument("--operators", action="store_true",
                        help="also time each native operator of a layer's step, the ref's extension against the "
                             "working tree's (where the C++ differs), on the first side's grid")
    parser.add_argument("--out-dir", default="work_dirs/layer_revisions")
    parser.add_argument("--name", default="layer_revisions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref_commit = _git("rev-parse", "--short", args.ref).strip()
    head = _git("rev-parse", "--short", "HEAD").strip()
    dirty = bool(_git("status", "--porcelain", "--", *MODULES.values(), NATIVE_SOURCES).strip())
    native = native_differs(args.ref)
    from vilseg.models.layers import vil_block

    torch.manual_seed(0)
    old = build(load_revision(args.ref, native), args.layers)
    if args.forget_gate_bias is not None:
        for layer in old:
            torch.nn.init.constant_(layer.mlstm_cell.fgate.bias, args.forget_gate_bias)
    new = build(vil_block, args.layers)
    new.load_state_dict(old.state_dict())
    stacks = {"ref": old, "new": new}
    argv_used = sys.argv[1:] if argv is None else list(argv)
    lines = [f"# ViL layers: {args.ref} ({ref_commit}) against the working tree", "",
             *provenance_lines("benchmarks/layer_revisions.py", argv_used),
             f"- revisions: `{args.ref}` = {ref_commit}; working tree at {head}"
             + (" with uncommitted changes to the layer or kernels" if dirty else ""),
             "- native extension: " + (f"`{args.ref}`'s `{NATIVE_SOURCES}` built for it, the working tree's installed"
                                       if native else f"`{NATIVE_SOURCES}` unchanged: both on the installed one"),
             f"- stack: {args.layers} ViL-T layers (dim 192, 4 heads, alternating directions, default tiles and "
             "recompute), batch 1, forward + backward"
             + ("" if args.forget_gate_bias is None else f", forget-gate biases {args.forget_gate_bias:g}")
             + (f" under CPU autocast to {args.autocast}; outputs and gradients of both checked against the fp32 "
                f"step (within {AUTOCAST_TOLERANCE:.0%} of each tensor's largest entry)" if args.autocast
                else "; outputs and gradients of both checked to agree"), "",
             "Seconds per training step, median over alternating rounds; the ratio below 1: the working tree is "
             "faster." + (" Error: each revision's largest difference from the fp32 step over the output and all "
                          "gradients, as a fraction of that tensor's largest entry." if args.autocast else ""), "",
             "| grid (tokens) | ref | working tree | working tree / ref |" + (" error ref | error working tree |"
                                                                          if args.autocast else ""),
             "|---|---:|---:|---:|" + ("---:|---:|" if args.autocast else "")]
    for side in args.sides:
        t, err = measure(stacks, side, args.rounds, getattr(torch, args.autocast) if args.autocast else None)
        lines.append(f"| {side}x{side} ({side * side}) | {t['ref']:.4f} | {t['new']:.4f} | "
                     f"{t['new'] / t['ref']:.3f} |" + (f" {err['ref']:.3f} | {err['new']:.3f} |" if err else ""))
        print(lines[-1], flush=True)
    if args.operators and native:
        side = args.sides[0]
        lines += ["", f"The native operators of one layer's step ({side}x{side} grid, one tile), microseconds per "
                      "call, median over alternating rounds of 20 calls; results of both checked to agree.", "",
                  "| operator | ref | working tree | working tree / ref |", "|---|---:|---:|---:|"]
        ref_ext = sys.modules["vilseg_rev_" + ref_commit + "_native"]
        for name, t_ref, t_new in measure_operators(ref_ext, side, args.rounds):
            lines.append(f"| {name} | {t_ref * 1e6:.0f} | {t_new * 1e6:.0f} | {t_new / t_ref:.3f} |")
            print(lines[-1], flush=True)
    elif args.operators:
        lines += ["", f"(--operators: `{NATIVE_SOURCES}` is the same in both, nothing to compare.)"]
    write_markdown(args.out_dir, f"{args.name}.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
