"""Where a backbone training step spends its time: matmuls against everything else, side by side.

For each model (a shipped config's backbone, as in ``benchmarks/vil_speed.py``) and precision (fp32, or CPU/CUDA
autocast to bf16), in a fresh process: warm-up steps, the median time of ``--repeats`` training steps (forward +
backward of the mean of the outputs, batch 1) without the profiler, then one step under ``torch.profiler`` whose
operator time is split into

* matmuls: ``mm``, ``bmm``, ``addmm``, ``baddbmm`` (and their in-place forms) and fused attention kernels;
* convolutions (forward and backward);
* copies and casts (``copy_``, ``_to_copy``, ``clone``, ``cat``, ``stack``);
* every other ATen operator (elementwise, reductions, norms, allocation, layout);
* vilseg's native operators (``vilseg::*``: the ViL layer's fused CPU operators, ``vilseg/ops/vil_layer.py``, and
  the chunkwise mLSTM kernel's C++ form, ``vilseg/ops/mlstm.py``, whose matmuls count as matmuls);
* the rest of the profiled step's wall time: Python, the autograd engine and custom autograd functions' own code,
  and the profiler's per-operator overhead (the profiled step minus the operators' own time).

On CUDA the operators' own times are their kernels' device times, and the rest is the time the GPU sat idle in the
step (waiting on Python, launches and the autograd engine).

On CPU, ViL's step is also split by where in the model its time goes, from the profiler's events of vilseg's own
autograd functions: the chunkwise mLSTM kernel (its forward, replayed forward and backward), the rest of the layers'
inner part (everything between the up- and the down-projection, in its tiled recomputing form: grid convolution,
q/k/v, gates, output norm, gating, the recompute's autograd) and everything outside it (projections, pre-norms,
residuals, patch embedding), each with the matmul time inside it: what a faster kernel, or a fused inner part,
could save at most.

The question it answers: how much of the step is the matmul work that FLOPs count, and how much the many small
operators around it. Writes ``--out-dir``/``--name``.{md,json} with machine, versions and command line, and a
bar chart of the split (.png).

    python benchmarks/step_profile.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vil_speed import MODELS  # noqa: E402  (one model -> config mapping for the speed benchmarks)

from vilseg.profiling.cells import add_cell_options  # noqa: E402

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_", "aten::addbmm",
          "aten::matmul", "aten::linear", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_efficient_attention",
          "aten::_scaled_dot_product_flash_attention", "aten::_efficient_attention_backward",
          "aten::_scaled_dot_product_flash_attention_backward", "aten::_flash_attention_backward"}
CONVOLUTION = {"aten::convolution", "aten::_convolution", "aten::conv2d", "aten::conv3d", "aten::conv1d",
               "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution",
               "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
COPIES = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack"}
CATEGORIES = ("matmul", "convolution", "copies", "other_aten", "fused", "framework")
HEADERS = {"matmul": "matmuls", "convolution": "convolutions", "copies": "copies and casts",
           "other_aten": "other ATen operators", "fused": "vilseg's native operators",
           "framework": "Python, autograd, profiler"}
# ViL's regions, each the forward and backward calls of one of vilseg's autograd functions (module, class name) and
# of the native functions that do the same work outside it (the kernel's C++ form called by the layer's native tiles);
# the layer's inner part contains the kernel
REGIONS = {"mlstm_kernel": ("vilseg.ops.mlstm", "_ChunkwiseMLSTM",
                            ("vilseg::chunkwise_forward", "vilseg::chunkwise_backward")),
           "layer_inner": ("vilseg.models.layers.vil_block", "_TiledInnerRecompute", ())}


def region_times(events, function_name: str, native_names=()) -> Dict[str, float]:
    """Seconds of CPU time inside the forward and backward calls of the autograd function named ``function_name``
    and inside the events ``native_names`` (nested calls counted once) and the matmuls' own time inside them, from a
    profile's ``events()``: ``{"seconds": ..., "matmul": ...}``."""
    names = {function_name, f"{function_name}Backward", *native_names}
    seconds = matmul = 0.0

    def matmuls_in(event) -> float:
        return sum((child.self_cpu_time_total if child.name in MATMUL else 0.0) + matmuls_in(child)
                   for child in event.cpu_children)

    for event in events:
        if event.name not in names:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in names:
            parent = parent.cpu_parent
        if parent is None:  # outermost event of the region
            seconds += event.cpu_time_total
            matmul += matmuls_in(event)
    return dict(seconds=seconds / 1e6, matmul=matmul / 1e6)


def worker(config: str, size: int, precision: str, repeats: int) -> Dict:
    """One cell in this process: build, warm up, time without the profiler, profile one step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vilseg.apis import build_backbone
    from vilseg.profiling.timing import backbone_training_step, compiles_blocks, executed_flops
    from vilseg.utils.env import resolve_device

    device = resolve_device()
    model = build_backbone(config, size).to(device)
    model.train()
    autocast = torch.bfloat16 if precision == "bf16" else None
    warm_up, step = (backbone_training_step(model, torch.randn(1, 3, side, side, device=device), autocast)
                     for side in (64, size))
    warm_up()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        profiled = time.perf_counter() - t0
    split = dict.fromkeys(CATEGORIES, 0.0)
    calls = 0
    for event in prof.key_averages():
        if not event.key.startswith(("aten::", "vilseg::")):
            continue
        calls += event.count
        seconds = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6
        key = ("fused" if event.key.startswith("vilseg::") else "matmul" if event.key in MATMUL
               else "convolution" if event.key in CONVOLUTION else "copies" if event.key in COPIES else "other_aten")
        split[key] += seconds
    split["framework"] = max(profiled - sum(split.values()), 0.0)
    regions = None
    if device.type == "cpu":  # host times; on CUDA the work of a region runs asynchronously on the device
        import importlib

        for module, name, _ in REGIONS.values():  # a renamed function fails here rather than as an empty region
            getattr(importlib.import_module(module), name)
        events = prof.events()
        regions = {key: region_times(events, name, native) for key, (_, name, native) in REGIONS.items()}
    # one more step under torch's FLOP counter: the matmul work the step executes (none for compiled models, which
    # the counter's dispatch mode runs eagerly: their eager form's count would be shown as theirs)
    flops = None if compiles_blocks(model) else executed_flops(step)
    return dict(seconds=statistics.median(times), repeats=len(times), profiled_s=profiled, split=split,
                aten_calls=calls, device=device.type, flops=flops, regions=regions)


def run_cell(model: str, size: int, precision: str, args) -> Dict:
    from vilseg.profiling.cells import run_json_worker

    return run_json_worker([sys.executable, __file__, "--worker", MODELS[model], str(size), precision, "--repeats",
                            str(args.repeats), "--threads", str(args.threads)], args.cell_timeout_s)


def markdown(report: Dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = ["# Where a backbone training step spends its time", "",
             f"- machine: {report['machine']}", f"- versions: {versions}", f"- command: `{report['command']}`",
             f"- started: {report['date']}", "",
             f"Backbones of the shipped configs, batch 1, {report['size']}², forward + backward; each cell a fresh "
             "process. `step` = median of the unprofiled steps; the split is of one step under `torch.profiler` "
             "(its wall time in the `profiled` column): the operators' own time by kind, and the rest of that step "
             "(Python, the autograd engine, custom autograd functions' own code, the profiler's per-operator "
             "overhead). Seconds, share of the profiled step in brackets. `matmul GFLOP`: the matmul work one step "
             "executes (torch's FLOP counter, 2 per multiply-add, a recompute included; not counted for compiled "
             "models); `GFLOP/s`: that over the matmuls' profiled time.", "",
             "| model | precision | step | profiled | " + " | ".join(HEADERS[c] for c in CATEGORIES)
             + " | operator calls | matmul GFLOP | GFLOP/s |", "|---|---|---:|---:|" + "---:|" * len(CATEGORIES)
             + "---:|---:|---:|"]
    for key, r in report["cells"].items():
        model, precision = key.split("/")
        label = f"{model} (`{MODELS[model]}`)"
        if "error" in r:
            lines.append(f"| {label} | {precision} | - ({r['error']}) |" + " |" * (len(CATEGORIES) + 4))
            continue
        split = " | ".join(f"{r['split'].get(c, 0.0):.3f} ({r['split'].get(c, 0.0) / r['profiled_s']:.0%})"
                           for c in CATEGORIES)
        gflop = _matmul_gflop(r)
        rate = "-" if gflop is None else f"{gflop / r['split']['matmul']:.0f}"
        lines.append(f"| {label} | {precision} | {r['seconds']:.3f} s | {r['profiled_s']:.3f} s | {split} | "
                     f"{r['aten_calls']:,} | {'-' if gflop is None else f'{gflop:.1f}'} | {rate} |")
    lines.append("")
    ok = {k: r for k, r in report["cells"].items() if "error" not in r}
    lines += _region_lines(ok)
    for precision in report["precisions"]:
        vil, deit = ok.get(f"vil_t/{precision}"), ok.get(f"deit_t/{precision}")
        if vil and deit:
            lines.append(f"- {precision}: ViL-T's matmuls alone take {vil['split']['matmul']:.3f} s, "
                         f"{vil['split']['matmul'] / deit['split']['matmul']:.2f}x DeiT-T's matmuls and "
                         f"{vil['split']['matmul'] / deit['profiled_s']:.2f}x DeiT-T's whole profiled step; "
                         f"everything but the matmuls takes {vil['profiled_s'] - vil['split']['matmul']:.3f} s in "
                         f"ViL-T, {deit['profiled_s'] - deit['split']['matmul']:.3f} s in DeiT-T.")
            vil_gflop, deit_gflop = _matmul_gflop(vil), _matmul_gflop(deit)
            if vil_gflop and deit_gflop:
                at_deit_rate = vil_gflop / (deit_gflop / deit["split"]["matmul"])
                lines.append(f"- {precision}: ViL-T's step executes {vil_gflop:.1f} GFLOP of matmuls, "
                             f"{vil_gflop / deit_gflop:.2f}x DeiT-T's {deit_gflop:.1f}; at DeiT-T's matmul rate "
                             f"they would take {at_deit_rate:.3f} s, leaving "
                             f"{deit['profiled_s'] - at_deit_rate:.3f} s of DeiT-T's profiled step for everything "
                             f"else in a ViL-T step that is to match it.")
    return "\n".join(lines)


def _region_lines(cells: Dict[str, Dict]) -> List[str]:
    """The table of the cells whose profile holds ViL's regions (``REGIONS``): each region's seconds, the matmuls'
    time in it and the rest, as shares of the profiled step."""
    rows = []
    for key, r in cells.items():
        regions = r.get("regions")
        if not regions or not regions["mlstm_kernel"]["seconds"]:
            continue
        kernel, inner = regions["mlstm_kernel"], regions["layer_inner"]
        matmul_all = r["split"]["matmul"]
        parts = [("the mLSTM kernel (all its forward and backward calls)", kernel["seconds"], kernel["matmul"])]
        if inner["seconds"]:
            parts += [("the rest of the layers' inner part (grid conv, q/k/v, gates, norm, gating, tiles, the "
                       "recompute's autograd)", inner["seconds"] - kernel["seconds"],
                       inner["matmul"] - kernel["matmul"]),
                      ("outside the inner part (projections, pre-norms, residuals, patch embedding)",
                       r["profiled_s"] - inner["seconds"], matmul_all - inner["matmul"])]
        else:  # layers too short to tile in training: no inner-part region
            parts.append(("everything outside the kernel", r["profiled_s"] - kernel["seconds"],
                          matmul_all - kernel["matmul"]))
        model, precision = key.split("/")
        for label, seconds, matmul in parts:
            rows.append(f"| {model} | {precision} | {label} | {seconds:.3f} ({seconds / r['profiled_s']:.0%}) | "
                        f"{matmul:.3f} | {seconds - matmul:.3f} ({(seconds - matmul) / r['profiled_s']:.0%}) |")
    if not rows:
        return []
    return ["Where in the model (CPU; from the profiler's events of vilseg's own autograd functions, so the inner "
            "part is that of the tiled recomputing layer): seconds of the profiled step, the matmuls' own time in "
            "them, and everything else (share of the profiled step in brackets). The last column bounds what a "
            "faster form of that part, with its matmuls as they are, can save.", "",
            "| model | precision | part of the step | seconds | matmuls | everything else |",
            "|---|---|---|---:|---:|---:|", *rows, ""]


def _matmul_gflop(cell: Dict) -> Optional[float]:
    flops = cell.get("flops")
    return None if not flops else flops["matmul"] / 1e9


def plot(report: Dict, path: Path) -> None:
    """Stacked horizontal bars, one per cell: the profiled step's seconds by kind (matmuls first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(key, r) for key, r in report["cells"].items() if "error" not in r]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(cells) + 1.6))
    colors = plt.get_cmap("tab10")
    for row, (key, r) in enumerate(cells):
        left = 0.0
        for i, category in enumerate(CATEGORIES):
            width = r["split"].get(category, 0.0)  # (runs before the fused operators have no such part)
            ax.barh(row, width, left=left, color=colors(i), label=HEADERS[category] if row == 0 else None)
            left += width
        ax.text(left, row, f" {r['profiled_s']:.2f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(cells)), [key.replace("/", ", ") for key, _ in cells])
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds of one profiled backbone training step, batch 1, {report['size']}²")
    ax.set_xlim(0, 1.12 * max(r["profiled_s"] for _, r in cells))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Where the step's time goes ({report['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "SIZE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["vil_t", "deit_t", "deit_t_sdpa"], choices=list(MODELS))
    parser.add_argument("--size", type=int, default=512, help="square image side (512: the ADE20K training crop)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="bf16: the step under autocast to bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    add_cell_options(parser, "step_profile")
    parser.add_argument("--render", metavar="JSON", help="only write the table and plot of an earlier run's JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        config, size, precision = args.worker
        print(json.dumps(worker(config, int(size), precision, args.repeats)))
        return 0
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(report) + "\n")
        plot(report, path.with_suffix(".png"))
        print(f"written: {path.with_suffix('.md')}, .png")
        return 0
    from vilseg.profiling.cells import run_cells
    from vilseg.utils.env import describe_machine, library_versions

    report = dict(machine=describe_machine(), versions=library_versions(), date=time.strftime("%Y-%m-%d %H:%M"),
                  command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                  size=args.size, precisions=args.precisions, cells={})
    run_cells(report, [(f"{m}/{p}", functools.partial(run_cell, m, args.size, p, args))
                       for p in args.precisions for m in args.models], args.out_dir, args.name, markdown)
    plot(report, Path(args.out_dir) / f"{args.name}.png")
    print(f"written: {Path(args.out_dir) / args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
