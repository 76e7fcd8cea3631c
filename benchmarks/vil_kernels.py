"""Parallel vs chunkwise mLSTM: peak memory and time, kernel alone and inside ViL-T (forward + backward, batch 1).

The backbone rows build ``--config``'s ``model.backbone`` (default: the shipped ``configs/vil_upernet_ade20k.py``)
with its kernel, chunk size and recompute switched per row and its last block as the only output.

Writes benchmarks/results/vil_kernels.{md,csv} with the machine, versions and command line. Peak memory on CPU is
the exact live-tensor peak (vilseg.profiling.memory); sizes whose real run would exceed --max-real-gib are
estimated with the same tracker on fake tensors (marked 'est.'). Times are medians after a warm-up.

    python benchmarks/vil_kernels.py                     # full table (about 15 min on 2 CPU cores)
    python benchmarks/vil_kernels.py --sizes 224 512 --quick
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from vilseg.ops import chunkwise_mlstm, mlstm, parallel_mlstm
from vilseg.profiling.memory import fake_mode, measure_peak, to_fake_module
from vilseg.utils.env import describe_machine, library_versions



def machine() -> str:
    versions = ", ".join(f"{k} {v}" for k, v in library_versions(("torch",)).items())
    return f"{describe_machine()}; {versions}"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_rows(lengths, chunk_sizes, repeats, device, max_real_gib):
    """The kernel alone at ViL-T's head shape (4 heads of 96 dims), forward + backward."""
    rows = []
    for S in lengths:
        def make():
            g = torch.Generator(device="cpu").manual_seed(0)
            ts = [torch.randn(1, 4, S, 96, generator=g) for _ in range(3)]
            ts += [torch.randn(1, 4, S, generator=g), torch.randn(1, 4, S, generator=g) + 3]
            return [t.to(device).requires_grad_() for t in ts]

        variants = [("parallel", parallel_mlstm)] + [
            (f"chunkwise L={L}", lambda *a, L=L: chunkwise_mlstm(*a, chunk_size=L)) for L in chunk_sizes] + [
            # the optional kernel recompute: the chunkwise forward runs again in backward
            (f"chunkwise L={chunk_sizes[0]} + recompute",
             lambda *a: mlstm(*a, kernel="chunkwise", chunk_size=chunk_sizes[0], recompute=True))]
        for name, fn in variants:
            # estimate first (fake tensors): the parallel form at 16k tokens would not fit in memory
            mode = fake_mode()
            with mode:
                fake = [torch.empty(t.shape).requires_grad_() for t in make()]
                _, est = measure_peak(lambda: fn(*fake).sum().backward(), track=fake, fake=True)
            row = dict(part="kernel", variant=name, tokens=S, peak_mib=est.peak_bytes / 2**20, estimated=True,
                       time_s=float("nan"))
            if est.peak_bytes / 2**30 <= max_real_gib:
                inputs = make()

                def step():
                    fn(*inputs).sum().backward()

                _, peak = measure_peak(step, device=device, track=inputs)
                row.update(peak_mib=peak.peak_bytes / 2**20, estimated=False, time_s=timed(step, repeats))
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


# (label, kernel, kernel recompute, layer recompute): the quadratic reference, chunkwise keeping what its own
# backward needs, and ViL's default for long sequences (the layer between its projections recomputed)
BACKBONE_VARIANTS = [("parallel", "parallel", False, False), ("chunkwise", "chunkwise", False, False),
                     ("chunkwise + layer recompute (default)", "chunkwise", None, None)]


def backbone_rows(config, sizes, chunk_size, repeats, device, max_real_gib):
    from vilseg.apis import load_config
    from vilseg.engine.registry import build_model
    from vilseg.models.layers.vil_block import MatrixLSTMCell

    backbone = load_config(config).model.backbone.to_dict()
    if backbone.get("type") != "ViL":
        raise SystemExit(f"error: --config {config}: model.backbone is {backbone.get('type')!r}, expected 'ViL'")
    rows = []
    for size in sizes:
        for label, kernel, kernel_recompute, layer_recompute in BACKBONE_VARIANTS:
            def build():
                cfg = dict(backbone, kernel=kernel, chunk_size=chunk_size, out_indices=(-1,),
                           layer_recompute=layer_recompute)
                m = build_model(cfg, init_weights=True)
                for cell in m.modules():
                    if isinstance(cell, MatrixLSTMCell):
                        cell.recompute = kernel_recompute
                return m

            model = build().to(device)

            def step(m=model, x=None):
                x = torch.randn(1, 3, size, size, device=device) if x is None else x
                m(x)[0].sum().backward()

            # estimate first (fake tensors, no allocation) to decide whether the real run fits
            fresh = build()
            mode = fake_mode()
            fmodel = to_fake_module(fresh, mode)
            with mode:
                fx = torch.randn(1, 3, size, size)
                _, est = measure_peak(lambda: step(fmodel, fx), track=[fmodel, fx], fake=True)
            row = dict(part="ViL-T fwd+bwd", variant=label, tokens=(size // 16) ** 2, size=size,
                       peak_mib=est.peak_bytes / 2**20, estimated=True, time_s=float("nan"))
            if est.peak_bytes / 2**30 <= max_real_gib:
                x = torch.randn(1, 3, size, size, device=device)
                _, peak = measure_peak(lambda: step(model, x), device=device, track=[model, x])
                row.update(peak_mib=peak.peak_bytes / 2**20, estimated=False, est_mib=est.peak_bytes / 2**20,
                           time_s=timed(lambda: step(model, x), repeats if size < 2048 else 1))
                model.zero_grad(set_to_none=True)
            rows.append(row)
            print(row, flush=True)
    return rows


def fmt_mem(r):
    return f"{r['peak_mib']:,.0f}" + (" (est.)" if r["estimated"] else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vil_upernet_ade20k.py", help="config whose ViL backbone the "
                   "backbone rows build (default %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024, 2048])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--chunk-size", type=int, default=64, help="chunk size for the backbone rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-real-gib", type=float, default=12.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="kernel rows only up to 4096 tokens, one chunk size")
    p.add_argument("--out", default="work_dirs/vil_kernels/vil_kernels",
                   help="path without suffix of the .md/.csv tables; the tracked ones: --out benchmarks/results/vil_kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = [n for n in args.lengths if n <= 4096]
        args.chunk_sizes = args.chunk_sizes[:1]
    torch.manual_seed(0)
    rows = kernel_rows(args.lengths, args.chunk_sizes, args.repeats, args.device, args.max_real_gib)
    rows += backbone_rows(args.config, args.sizes, args.chunk_size, args.repeats, args.device, args.max_real_gib)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)

    lines = ["# mLSTM kernels: parallel vs chunkwise", "",
             f"- machine: {machine()}", f"- backbone: `{args.config}`'s model.backbone", f"- command: `python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}`",
             f"- peak = exact live-tensor peak (parameters, grads, inputs included); '(est.)' = fake-tensor estimate "
             f"with the same tracker (real run would exceed {args.max_real_gib} GiB); time = median of "
             f"{args.repeats} after a warm-up (1 at 2048 px)", "",
             "## Kernel alone (B=1, 4 heads x 96 dims, forward + backward)", "",
             "| tokens | variant | peak MiB | time s | time / parallel |", "|---:|---|---:|---:|---:|"]
    for S in args.lengths:
        sel = [r for r in rows if r["part"] == "kernel" and r["tokens"] == S]
        par = next(r for r in sel if r["variant"] == "parallel")
        for r in sel:
            ratio = r["time_s"] / par["time_s"] if par["time_s"] == par["time_s"] else float("nan")
            lines.append(f"| {S} | {r['variant']} | {fmt_mem(r)} | {r['time_s']:.3f} | {ratio:.2f} |".replace("nan", "-"))
    labels = [v[0] for v in BACKBONE_VARIANTS]
    lines += ["", f"## ViL-T backbone, batch 1, forward + backward (chunk size {args.chunk_size})", "",
              "| image | tokens | " + " | ".join(f"{lb} peak MiB" for lb in labels) + " | "
              + " | ".join(f"{lb} s" for lb in labels) + " |",
              "|---:|---:|" + "---:|" * (2 * len(labels))]
    bb = [r for r in rows if r["part"] != "kernel"]
    for size in args.sizes:
        sel = [next(r for r in bb if r["size"] == size and r["variant"] == lb) for lb in labels]
        lines.append(f"| {size}² | {sel[0]['tokens']} | " + " | ".join(fmt_mem(r) for r in sel) + " | "
                     + " | ".join(f"{r['time_s']:.2f}".replace("nan", "-") for r in sel) + " |")
    if 512 in args.sizes and 2048 in args.sizes:
        lines.append("")
        for lb in labels:
            a = next(r for r in bb if r["size"] == 512 and r["variant"] == lb)
            b = next(r for r in bb if r["size"] == 2048 and r["variant"] == lb)
            lines.append(f"- {lb}: peak memory 512² -> 2048² (16x tokens) grows {b['peak_mib'] / a['peak_mib']:.1f}x")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
