"""The compiled ViL-T config's activation memory budget: training time and memory at each budget, side by side.

``configs/vil_upernet_ade20k_compiled.py`` runs its sub-blocks through ``torch.compile`` and lets AOTAutograd's
partitioner keep at most ``compile_memory_budget`` of the activations the compiled blocks would keep without any
recompute (1.0: the partitioner's default, no recompute). For each value of ``--budgets`` (``none``: no budget, the
layer recompute as a checkpoint inside the compiled graph instead, the config's earlier form):

* time: in each of ``--processes`` fresh processes the compiled ViL-T backbone's training step (batch 1, forward +
  backward of the mean of the outputs) alternates with the reference backbone's (``--reference``, a shipped config)
  over ``--rounds`` rounds; the ratio of the medians, per process (the VM's state moves between processes);
* memory: in one more fresh process, the growth of resident memory (CUDA: reserved memory) over the first segmentor
  training step (``model.loss`` on 150-class labels, batch 2, UperNet), as ``benchmarks/vil_speed.py`` measures it;
  the reference segmentor's in a process of its own.

The question it answers: which budget buys the most time for the memory a user can give, on this machine (a GPU
has other trade-offs: run it there). Writes ``--out-dir``/``--name``.md with machine, versions and command line.

    python benchmarks/compile_budget.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_alternating import training_steps  # noqa: E402  (backbone training steps built from configs)
from vil_speed import MODELS, worker_command  # noqa: E402  (the speed benchmarks' models and cells)

from vilseg.profiling.cells import add_cell_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / MODELS["vil_t_compiled"]


def budget_config(budget: str, folder: str) -> str:
    """A config file in ``folder``: the compiled ViL-T config with ``compile_memory_budget`` set to ``budget`` (a
    number, or 'none' for None)."""
    value = "None" if budget == "none" else repr(float(budget))
    path = Path(folder) / f"vil_t_compiled_budget_{budget.replace('.', '_')}.py"
    path.write_text(f"_base_ = {str(COMPILED)!r}\nmodel = dict(backbone=dict(compile_memory_budget={value}))\n")
    return str(path)


def time_worker(config: str, reference: str, size: int, rounds: int) -> Dict:
    """In this process: the two backbones' training steps alternating; their medians."""
    from vilseg.profiling.timing import alternating_medians
    from vilseg.utils.env import resolve_device

    steps = training_steps(["vil", "reference"], size, resolve_device(),
                           configs={"vil": config, "reference": reference})
    start = time.perf_counter()
    steps["vil"]()  # the compile
    first = time.perf_counter() - start
    medians = alternating_medians(steps, rounds)
    return dict(vil_s=medians["vil"], reference_s=medians["reference"], first_s=first)


def memory_cell(config: str, size: int, args) -> Dict:
    from vilseg.profiling.cells import run_json_worker

    return run_json_worker(worker_command(config, size, "segmentor", "train", repeats=1, threads=args.threads,
                                          no_live=True), args.cell_timeout_s)


def time_cell(config: str, args) -> Dict:
    from vilseg.profiling.cells import run_json_worker

    cmd = [sys.executable, __file__, "--worker", config, "--reference", args.reference, "--size", str(args.size),
           "--rounds", str(args.rounds), "--threads", str(args.threads)]
    return run_json_worker(cmd, args.cell_timeout_s)


def _reference_held(ref: Dict) -> str:
    if "held_mib" in ref:
        return f"{ref['held_mib']:.0f} MiB"
    return f"not measured: {ref['error']}" if "error" in ref else "not measured yet"


def markdown(report: Dict) -> List[str]:
    args = report["args"]
    ref = report["reference_memory"]
    ref_held = ref.get("held_mib")
    name = Path(args["reference"]).stem
    lines = ["# The compiled ViL-T config's memory budget: time and memory", "", *report["provenance"],
             f"- started: {report['started']}", "",
             f"`compile_memory_budget` of `{MODELS['vil_t_compiled']}` (`none`: the layer recompute inside the "
             f"compiled graph instead), {args['size']}². Time: the compiled ViL-T backbone's training step (batch 1) "
             f"alternating with that of the reference (`{args['reference']}`) in one process over {args['rounds']} "
             f"rounds, the ratio of the medians (below 1: ViL-T faster), one entry per fresh process, its ViL-T "
             f"median in brackets. Memory: "
             f"growth of the process's resident memory (CUDA: reserved) over the first segmentor training step "
             f"(batch 2, UperNet), MiB, and its ratio to the reference segmentor's ({_reference_held(ref)}).", "",
             f"| budget | time / {name} | segmentor held | held / {name} | first step |",
             "|---|---|---:|---:|---:|"]
    for budget, cell in report["budgets"].items():
        times = []
        for t in cell["time"]:
            times.append(f"- ({t['error']})" if "error" in t else
                         f"{t['vil_s'] / t['reference_s']:.2f} ({t['vil_s']:.3f} s)")
        mem = cell.get("memory", {})
        held = mem.get("held_mib")
        held_text = f"- ({mem['error']})" if held is None and "error" in mem else (
            "-" if held is None else f"{held:.0f}")
        ratio = "-" if held is None or ref_held is None else f"{held / ref_held:.2f}"
        firsts = [t["first_s"] for t in cell["time"] if "first_s" in t]
        first = f"{max(firsts):.1f} s" if firsts else "-"
        lines.append(f"| {budget} | {' / '.join(times) or '-'} | {held_text} | {ratio} | {first} |")
    lines += ["", "`first step`: the longest first ViL-T step of the time processes (the compile; with torch.compile's "
              "cache filled by earlier runs it is mostly loading)."]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--budgets", nargs="+", default=["0.3", "0.4", "0.5", "1.0", "none"],
                        help="values of compile_memory_budget in (0, 1], or 'none'")
    parser.add_argument("--reference", default="configs/baselines/deit_t_upernet_ade20k.py",
                        help="the config the time and memory ratios divide by")
    parser.add_argument("--size", type=int, default=512, help="square image side (512: the ADE20K training crop)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--processes", type=int, default=2, help="fresh processes timed per budget (0: memory only)")
    add_cell_options(parser, "compile_budget")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(time_worker(args.worker, args.reference, args.size, args.rounds)))
        return 0
    for budget in args.budgets:
        if budget != "none":
            try:
                ok = 0.0 < float(budget) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                parser.error(f"--budgets: each must be a number in (0, 1] or 'none', got {budget!r}")
    reference = next((str(p) for p in (ROOT / args.reference, Path(args.reference).resolve()) if p.is_file()), None)
    if reference is None:
        parser.error(f"--reference: no config file {args.reference!r}")
    shown, args.reference = args.reference, reference
    from tqdm import tqdm

    from vilseg.utils.env import provenance_lines, write_markdown

    report = dict(args=dict(vars(args), reference=shown), started=time.strftime("%Y-%m-%d %H:%M"), budgets={},
                  provenance=provenance_lines("benchmarks/compile_budget.py",
                                              sys.argv[1:] if argv is None else list(argv)))
    with tempfile.TemporaryDirectory() as folder:
        configs = {b: budget_config(b, folder) for b in args.budgets}
        jobs = [("time", b) for _ in range(args.processes) for b in args.budgets]  # interleaved across budgets
        jobs += [("memory", b) for b in args.budgets] + [("reference", None)]
        report["reference_memory"] = {}
        for kind, budget in tqdm(jobs, desc="processes", unit="process"):
            if kind == "time":
                report["budgets"].setdefault(budget, {"time": []})["time"].append(time_cell(configs[budget], args))
            elif kind == "memory":
                report["budgets"].setdefault(budget, {"time": []})["memory"] = memory_cell(configs[budget], args.size,
                                                                                           args)
            else:
                report["reference_memory"] = memory_cell(reference, args.size, args)
            write_markdown(args.out_dir, f"{args.name}.md", markdown(report))
    write_markdown(args.out_dir, f"{args.name}.md", markdown(report), echo_last=len(args.budgets) + 6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
