"""GPU checks that a CPU machine cannot make: the mLSTM kernels on CUDA against fp64, and an AMP training step.

1. ``kernels``: ``chunkwise_mlstm`` on CUDA in fp32 and under bf16 / fp16 autocast against the fp64 parallel form
   (outputs and all five gradients; errors relative to each tensor's largest entry, next to what rounding the inputs
   alone to that dtype causes), at ViL-T's head shape and 1,024 / 4,096 tokens.
2. ``amp-step``: three optimizer steps of the shipped ``configs/vil_upernet_ade20k.py`` segmentor at 512², batch 2,
   through the optimizer wrapper the config builds (mmengine's ``AmpOptimWrapper`` on CUDA): losses finite, the
   autocast dtype, peak allocated / reserved memory.

Writes ``--out-dir``/gpu_check.{md,json}. Run by ``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List


def kernel_rows(lengths: List[int]) -> List[Dict]:
    import torch

    from vilseg.ops import chunkwise_mlstm, parallel_mlstm

    rows = []
    for S in lengths:
        g = torch.Generator(device="cuda").manual_seed(S)
        x64 = [torch.randn(1, 4, S, 96, device="cuda", dtype=torch.float64, generator=g) for _ in range(3)]
        x64 += [torch.randn(1, 4, S, device="cuda", dtype=torch.float64, generator=g) * 3,
                torch.randn(1, 4, S, device="cuda", dtype=torch.float64, generator=g) * 3 + 2]
        x64 = [t.requires_grad_() for t in x64]
        truth = parallel_mlstm(*x64)
        g_truth = torch.autograd.grad(truth.sum(), x64)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = [t.detach().float().requires_grad_() for t in x64]
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = chunkwise_mlstm(*x, chunk_size=64)
                grads = torch.autograd.grad(out.float().sum(), x)
            x_round = [t.detach().to(dtype).double().requires_grad_() for t in x64]
            rounded = parallel_mlstm(*x_round)
            g_round = torch.autograd.grad(rounded.sum(), x_round)

            def rel(a, b):
                return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

            row = dict(tokens=S, dtype=str(dtype).replace("torch.", ""), out=rel(out, truth),
                       out_rounding=rel(rounded, truth))
            for name, a, r, b in zip("q k v igate fgate".split(), grads, g_round, g_truth):
                row[f"d{name}"], row[f"d{name}_rounding"] = rel(a, b), rel(r, b)
            row["finite"] = bool(torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads))
            rows.append(row)
    return rows


def amp_step(config: str, size: int, steps: int) -> Dict:
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from vilseg.apis import load_config
    from vilseg.engine.registry import build_model

    cfg = load_config(config)
    model = build_model(cfg.model, init_weights=True).cuda().train()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    x = torch.randn(2, 3, size, size, device="cuda")
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size), device="cuda"))
        samples.append(s)
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with wrapper.optim_context(model):
            parsed, _ = model.parse_losses(model.loss(x, samples))
        wrapper.update_params(parsed)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(parsed))
    return dict(config=config, size=size, wrapper=type(wrapper).__name__,
                dtype=str(getattr(wrapper, "cast_dtype", None)), losses=losses, step_s=times,
                finite=all(map(lambda v: v == v and abs(v) < float("inf"), losses)),
                max_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                max_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="work_dirs/gpu_check")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_check.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    from vilseg.utils.env import describe_machine, library_versions

    report = dict(machine=describe_machine(), versions=library_versions(), command="python " + " ".join(sys.argv),
                  kernels=kernel_rows(args.lengths), amp_step=amp_step(args.config, 512, 3))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = ["# GPU check", "", f"- machine: {report['machine']}", f"- versions: {report['versions']}",
             f"- command: `{report['command']}`", "", "## chunkwise_mlstm on CUDA vs fp64 (relative max error; "
             "in brackets: rounding the inputs alone)", "", "| tokens | dtype | out | dq | dk | dv | digate | dfgate |"
             " finite |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["kernels"]:
        cells = [f"{r[k]:.2e} ({r[k + '_rounding']:.2e})" for k in ("out", "dq", "dk", "dv", "digate", "dfgate")]
        lines.append(f"| {r['tokens']} | {r['dtype']} | " + " | ".join(cells) + f" | {r['finite']} |")
    a = report["amp_step"]
    lines += ["", f"## AMP training step, `{a['config']}` at {a['size']}², batch 2", "",
              f"- wrapper {a['wrapper']}, autocast {a['dtype']}; losses {', '.join(f'{v:.4f}' for v in a['losses'])}"
              f" (finite: {a['finite']}); step times {', '.join(f'{t:.3f}' for t in a['step_s'])} s",
              f"- peak allocated {a['max_allocated_mib']:.0f} MiB, reserved {a['max_reserved_mib']:.0f} MiB"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if a["finite"] and all(r["finite"] for r in report["kernels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
