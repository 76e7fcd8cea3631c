"""Side-by-side benchmark runs made of cells, each measured in a fresh worker process.

Used by the benchmark scripts that compare models in one run (``benchmarks/vil_speed.py``,
``benchmarks/step_profile.py``, ``benchmarks/page_faults.py``, ``benchmarks/compile_budget.py``): a cell's worker
prints its result as one JSON line; the run saves its report after every cell (partial results survive an
interruption) and writes the Markdown table at the end. :func:`add_cell_options` declares the options they share.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["add_cell_options", "run_json_worker", "run_cells"]


def add_cell_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every run made of cells has: torch threads in each cell's process, a cell's time limit, and where
    the run's files go (``--out-dir`` default ``work_dirs/<name>``, ``--name`` default ``name``)."""
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every cell")
    parser.add_argument("--cell-timeout-s", type=float, default=600.0, help="time limit of one cell's process")
    parser.add_argument("--out-dir", default=f"work_dirs/{name}")
    parser.add_argument("--name", default=name, help="file name of the run's files: OUT_DIR/NAME.*")


def run_json_worker(cmd: Sequence[str], timeout_s: float,
                    env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Run one worker process (with ``env`` added to this process's environment); its last stdout line that starts
    with ``{`` is its result. A failure comes back as ``{"error": ...}``: over the time limit, out of memory (killed,
    or an error that says so), or the last line of its stderr. ``wall_s``: the process's wall time, start-up
    included."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        oom = "memory" in tail.lower() or proc.returncode in (-9, 137)
        return dict(error="out of memory" if oom else tail[:120])
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def run_cells(report: Dict[str, Any], cells: Sequence[Tuple[str, Callable[[], Dict[str, Any]]]], out_dir: str,
              name: str, render: Callable[[Dict[str, Any]], str]) -> str:
    """Run every (key, measure) cell in order, with a progress bar, into ``report["cells"][key]``; after each cell
    the report is saved as ``out_dir/name.json``, at the end rendered to ``out_dir/name.md``. Returns that text."""
    from tqdm import tqdm

    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    report.setdefault("cells", {})
    for key, measure in tqdm(cells, desc="cells", unit="cell"):
        report["cells"][key] = measure()
        (path / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (path / f"{name}.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {path / name}.md, .json")
    return text
