"""Step-time states: every training step of ViL-T and DeiT-T, in several fresh processes, under thread settings.

On the 2-core VM of this work ViL-T's step time falls into two groups, and the ratios of the speed tables carry that
spread. This script shows it step by step: for each setting it starts ``--processes`` fresh processes; each builds
the backbones of the shipped configs, lets their training steps (batch 1, forward + backward of the mean of the
outputs) alternate over ``--rounds`` rounds and reports the time of every step. Settings:

* ``default``: torch with ``--threads`` threads, OpenMP as torch leaves it;
* ``omp_proc_bind``: the same with ``OMP_PROC_BIND=true`` (each OpenMP thread pinned to one CPU);
* ``one_thread``: one torch thread (no thread synchronisation at all).

Writes ``--out-dir``/``--name``.{md,json,png}: per process the median, fastest and slowest step of each model and
the ratio of the medians; the picture plots every step.

    python benchmarks/step_time_states.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_alternating import training_steps  # noqa: E402  (the shipped backbones' training steps)
from vil_speed import MODELS  # noqa: E402  (one model -> config mapping for the speed benchmarks)

SETTINGS = {"default": ({}, None), "omp_proc_bind": ({"OMP_PROC_BIND": "true"}, None), "one_thread": ({}, 1)}


def worker(models: List[str], side: int, rounds: int) -> Dict[str, List[float]]:
    """In this process: every model's training step, alternating over ``rounds`` rounds after one untimed step
    each; the seconds of every timed step, per model."""
    from vilseg.profiling.timing import alternating_times
    from vilseg.utils.env import resolve_device

    return alternating_times(training_steps(models, side, resolve_device()), rounds)


def markdown(report: Dict, reference: str) -> List[str]:
    from vilseg.utils.env import provenance_lines

    models = report["models"]
    lines = ["# Step-time states: every step, fresh processes, thread settings", "",
             *provenance_lines("benchmarks/step_time_states.py", report["argv"]), f"- started: {report['started']}",
             "",
             f"Backbones of the shipped configs at {report['size']}², batch 1, forward + backward; in each process the "
             f"models' steps alternate over {report['rounds']} rounds. Per process and model: median, fastest and "
             f"slowest step (s); the last column is the ratio of the medians to {reference}'s. Settings: `default` "
             f"{report['threads']} torch threads; `omp_proc_bind` the same with `OMP_PROC_BIND=true`; `one_thread` one "
             f"torch thread.", "",
             "| setting | process | " + " | ".join(models) + f" | ratio to {reference} |",
             "|---|---:|" + "---|" * len(models) + "---|"]
    for setting, runs in report["runs"].items():
        for i, run in enumerate(runs):
            if "error" in run:
                lines.append(f"| {setting} | {i + 1} | " + " | ".join("-" for _ in models) + f" | {run['error']} |")
                continue
            cells = [f"{statistics.median(run[m]):.3f} ({min(run[m]):.3f}-{max(run[m]):.3f})" for m in models]
            ref = statistics.median(run[reference])
            ratios = ", ".join(f"{m} {statistics.median(run[m]) / ref:.2f}" for m in models if m != reference)
            lines.append(f"| {setting} | {i + 1} | " + " | ".join(cells) + f" | {ratios} |")
    return lines


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["runs"])
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for i, run in enumerate(report["runs"][setting]):
            if "error" in run:
                continue
            for j, model in enumerate(report["models"]):
                ax.plot(run[model], marker="o", markersize=3, linestyle="-" if j == 0 else "--", color=f"C{i}",
                        label=f"{model}, process {i + 1}" if i == 0 or j == 0 else None)
        ax.set_title(setting)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"seconds per step ({report['size']}²)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=["vil_t", "deit_t"], choices=list(MODELS),
                        help="the last one is the reference of the ratios")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per setting")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (except in one_thread)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per process")
    parser.add_argument("--out-dir", default="work_dirs/step_time_states")
    parser.add_argument("--name", default="step_time_states")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1 or args.rounds < 1:
        parser.error("--processes and --rounds must be >= 1")
    import torch

    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.models, args.size, args.rounds)))
        return 0
    from tqdm import tqdm

    from vilseg.profiling.cells import run_json_worker

    report = dict(models=args.models, size=args.size, rounds=args.rounds, threads=args.threads,
                  started=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv[1:] if argv is None else list(argv),
                  runs={})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(s, i) for s in args.settings for i in range(args.processes)]
    for setting, _ in tqdm(jobs, desc="processes", unit="process"):
        env, threads = SETTINGS[setting]
        cmd = [sys.executable, __file__, "--worker", "--models", *args.models, "--size", str(args.size),
               "--rounds", str(args.rounds), "--threads", str(threads or args.threads)]
        report["runs"].setdefault(setting, []).append(run_json_worker(cmd, args.timeout_s, env=env))
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"{args.name}.png")
    from vilseg.utils.env import write_markdown

    lines = markdown(report, args.models[-1])
    write_markdown(args.out_dir, f"{args.name}.md", lines, echo_last=len(jobs) + 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
