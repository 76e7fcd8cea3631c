"""The profiling sweep: every (model, size) in worker processes of its own (:mod:`vilseg.profiling.worker`), one
after the other, then the out-of-memory search. The estimates of a (model, size) run in one worker, each real step
in a fresh one, so that what the process holds is measured without an earlier step's allocator state.

The parent enforces ``timeout_s`` per configuration (the worker's process group is killed and its unfinished
phases recorded as ``timeout``), records a worker killed by a signal as ``killed`` and goes on to the next
configuration; after each one it rewrites the CSV / JSON, so an interrupted sweep keeps its rows. Results go to
``<out_dir>/<prefix>.{csv,json,png}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .settings import GIB, STATUSES, ProfileConfig, validate_config

__all__ = ["run_profile", "run_worker", "rows_for"]


def _task_for(cfg: ProfileConfig, model: str, side: int, *, estimate: bool, real: bool,
              steps: Sequence[str], real_steps: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from vilseg.profiling.models import get_spec

    spec = get_spec(model)
    three = spec.dims == 3
    classes = cfg.num_classes_3d if three else cfg.num_classes
    return dict(
        model=model, size=[side] * spec.dims,
        batch=cfg.batch_3d if three else cfg.batch,
        infer_batch=cfg.infer_batch_3d if three else cfg.infer_batch,
        num_classes=spec.num_classes if classes is None else classes,
        device=cfg.device, dtype=cfg.dtype, steps=list(steps), real_steps=list(steps if real_steps is None
                                                                              else real_steps),
        estimate=estimate, real=real,
        max_mem_bytes=None if cfg.max_mem_gb is None else int(cfg.max_mem_gb * GIB),
        cap_slack_bytes=int(cfg.cap_slack_mb * 2**20),
        repeats=cfg.repeats, max_repeat_seconds=cfg.max_repeat_seconds, optimizer_step=cfg.optimizer_step,
        head_loss=cfg.head_loss, backend=cfg.backend, threads=cfg.threads, count_flops=cfg.count_flops,
    )


def run_worker(task: Dict[str, Any], timeout_s: float, log_path: Optional[Path]) -> Tuple[Dict[str, Any], str]:
    """Run ``task`` in a fresh interpreter (this one's executable and environment). Returns (partial or full
    result, outcome) where outcome is 'done', 'timeout', 'killed: <signal>' or 'crashed: exit code <n>'."""
    with tempfile.TemporaryDirectory(prefix="vilseg-prof-") as tmp:
        task_path, out_path = os.path.join(tmp, "task.json"), os.path.join(tmp, "out.json")
        with open(task_path, "w") as fh:
            json.dump(task, fh)
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([sys.executable, "-m", "vilseg.profiling.worker", task_path, out_path],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
                outcome = ("done" if rc == 0 else f"killed: {signal.Signals(-rc).name}" if rc < 0
                           else f"crashed: exit code {rc}")
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                outcome = "timeout"
        finally:
            if log_path:
                log.close()
        result: Dict[str, Any] = {"params": None, "estimate": {}, "real": {}}
        if os.path.exists(out_path):
            with open(out_path) as fh:
                result = json.load(fh)
    return result, outcome


def _fill_unfinished(result: Dict[str, Any], task: Dict[str, Any], outcome: str, log_path: Optional[Path]) -> None:
    """Mark the phases a dead or timed-out worker did not finish."""
    if outcome == "done":
        return
    if outcome == "timeout":
        status, note = "timeout", "worker exceeded --timeout"
    elif outcome.startswith("killed"):
        status, note = "killed", f"worker {outcome} (likely out of memory)"
    else:
        status, note = "error", f"worker {outcome}"
        if log_path and log_path.exists():
            note += ": " + log_path.read_text()[-300:].strip().replace("\n", " | ")
    for phase, steps in (("estimate", task["steps"]), ("real", task["real_steps"])):
        if not task[phase]:
            continue
        for step in steps:
            entry = result[phase].get(step)
            if entry is None:
                result[phase][step] = {"status": status, "error": note}
            elif entry.get("status") == "ok" and phase == "real" and "time_median_s" not in entry:
                entry["note"] = f"timing not finished ({note})"


def _run_configuration(cfg: ProfileConfig, task: Dict[str, Any], log_stem: Path) -> Dict[str, Any]:
    """The estimates of ``task`` in one worker, then each real step in a fresh worker of its own (given the
    estimates, for the memory cap); the results merged."""
    result: Dict[str, Any] = {"params": None, "estimate": {}, "real": {}}
    if task["estimate"]:
        est_task = dict(task, real=False, real_steps=[])
        log_path = Path(f"{log_stem}.log")
        part, outcome = run_worker(est_task, cfg.timeout_s, log_path)
        _fill_unfinished(part, est_task, outcome, log_path)
        result.update(params=part.get("params"), threads=part.get("threads"), estimate=part["estimate"])
    for step in task["real_steps"] if task["real"] else []:
        real_task = dict(task, estimate=False, steps=[step], real_steps=[step],
                         known_estimates={step: result["estimate"].get(step, {})})
        log_path = Path(f"{log_stem}_{step}.log")
        part, outcome = run_worker(real_task, cfg.timeout_s, log_path)
        _fill_unfinished(part, real_task, outcome, log_path)
        result["real"].update(part["real"])
        for key in ("params", "threads"):
            if result.get(key) is None:
                result[key] = part.get(key)
    return result


def _size_label(side: int, dims: int) -> str:
    return "x".join([str(side)] * dims)


def rows_for(model: str, side: int, result: Dict[str, Any], task: Dict[str, Any],
             real_reason: Optional[str]) -> List[Dict[str, Any]]:
    """One row per step of a worker's result: peak (measured, else estimated), time, FLOPs, status, notes."""
    from vilseg.profiling.models import REF_PATCH, get_spec

    spec = get_spec(model)
    rows = []
    for step in task["steps"]:
        est, real = result["estimate"].get(step, {}), result["real"].get(step, {})
        est_peak = est.get("peak_bytes") if est.get("status") == "ok" else None
        real_peak = real.get("peak_bytes") if real.get("status") == "ok" else None
        status = real.get("status", "error") if real else ("estimated" if est_peak is not None
                                                           else est.get("status", "error"))
        reason = real_reason or "real run not requested for this step at this size"
        note = real.get("note") or (reason if not real and est_peak is not None else None)
        errors = [e.get("error") for e in (real, est) if e.get("error")]
        peak = real_peak or est_peak
        rows.append(dict(
            model=model, description=spec.description, dims=spec.dims, kind=spec.kind, step=step,
            size=_size_label(side, spec.dims), side=side, pixels=side ** spec.dims,
            tokens=side ** spec.dims // REF_PATCH ** spec.dims,
            batch=task["batch"] if step == "train" else task["infer_batch"],
            params_m=None if result.get("params") is None else round(result["params"] / 1e6, 3),
            status=status, peak_gib=None if peak is None else round(peak / GIB, 4),
            peak_source="measured" if real_peak else ("estimated" if est_peak else None),
            measured_peak_gib=None if real_peak is None else round(real_peak / GIB, 4),
            estimated_peak_gib=None if est_peak is None else round(est_peak / GIB, 4),
            estimate_error_pct=(None if not (real_peak and est_peak)
                                else round(100.0 * (est_peak - real_peak) / real_peak, 3)),
            live_growth_gib=None if real_peak is None else round((real_peak - real.get("start_bytes", 0)) / GIB, 4),
            held_gib=None if real_peak is None or real.get("held_bytes") is None else round(real["held_bytes"] / GIB, 4),
            held_method=real.get("held_method") if real_peak else None,
            time_median_s=None if real.get("time_median_s") is None else round(real["time_median_s"], 4),
            n_repeats=len(real.get("times", [])) or None,
            gflops=None if est.get("flops") is None else round(est["flops"] / 1e9, 2),
            note=note, error="; ".join(errors) or None, threads=result.get("threads"),
        ))
    return rows


def _log_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", model)


def _oom_search(cfg: ProfileConfig, model: str, start_side: int, start_gib: Optional[float],
                progress: Optional[Callable[[str], None]], log_dir: Path,
                swept: Optional[Dict[int, float]] = None) -> Dict[str, Any]:
    """Estimate the training peak at sizes a factor sqrt(2) in tokens apart, starting next to the largest swept
    size (``start_side``, whose peak is ``start_gib``): upwards while it fits in ``cfg.oom_search_gb``, downwards
    while it does not, until the boundary is bracketed (or a limit / time-out stops it). A size the sweep already
    has a training peak for (``swept``: side -> GiB, taken as the start's is) is not run again."""
    from vilseg.profiling.models import get_spec

    limit_gib = float(cfg.oom_search_gb)
    spec = get_spec(model)
    mult = max(spec.multiple, 32 if spec.dims == 2 else 16)
    max_side = cfg.oom_search_max_2d if spec.dims == 2 else cfg.oom_search_max_3d
    factor = 2 ** (1.0 / (2 * spec.dims))  # sqrt(2) x the tokens per step
    fits_side = fits_gib = over_side = over_gib = None
    if start_gib is not None:
        if start_gib > limit_gib:
            over_side, over_gib = start_side, start_gib
        else:
            fits_side, fits_gib = start_side, start_gib
    up = start_gib is None or start_gib <= limit_gib
    side, status = start_side, "ok"
    for _ in range(64):
        if fits_side is not None and over_side is not None:
            break
        side = (int(math.ceil(side * factor / mult)) if up else int(math.floor(side / factor / mult))) * mult
        if side > max_side:
            status = f"fits up to the search limit {max_side}"
            break
        if side < spec.patch or side < mult:
            status = "exceeds the limit at every size tried"
            break
        if swept and swept.get(side) is not None:
            gib = swept[side]
        else:
            task = _task_for(cfg, model, side, estimate=True, real=False, steps=["train"])
            task["count_flops"] = False
            if progress:
                progress(f"{model} {_size_label(side, spec.dims)} ({limit_gib:g} GiB search, estimate)")
            log_path = log_dir / f"{_log_name(model)}_{side}_oomsearch.log"
            result, outcome = run_worker(task, cfg.oom_search_timeout_s or cfg.timeout_s, log_path)
            est = result["estimate"].get("train", {})
            if est.get("status") != "ok":
                status = f"stopped at {side}: {outcome if outcome != 'done' else est.get('error', 'error')}"
                break
            gib = est["peak_bytes"] / GIB
        if gib > limit_gib:
            over_side, over_gib = side, gib
        else:
            fits_side, fits_gib = side, gib
    return dict(model=model, limit_gib=limit_gib, largest_fitting_side=fits_side,
                largest_fitting_gib=None if fits_gib is None else round(fits_gib, 3),
                first_exceeding_side=over_side, first_exceeding_gib=None if over_gib is None else round(over_gib, 3),
                status=status)


def _row_line(rows: List[Dict[str, Any]], seconds: float) -> str:
    parts = []
    for r in rows:
        mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.3f} GiB ({r['peak_source'][:4]})"
        t = "" if r["time_median_s"] is None else f", {r['time_median_s']:.3f} s"
        if r.get("held_gib") is not None:
            mem += f", held {r['held_gib']:.3f} GiB"
        parts.append(f"{r['step']}: {r['status']} {mem}{t}")
    return f"  {rows[0]['model']:<22} {rows[0]['size']:>14}  " + " | ".join(parts) + f"  [{seconds:.0f} s]"


def _report(cfg: ProfileConfig, rows: List[Dict[str, Any]], oom: List[Dict[str, Any]], partial: bool
            ) -> Dict[str, Any]:
    from vilseg.profiling.fits import compute_fits, summarize
    from vilseg.profiling.report import machine_info

    if partial:
        fits, checks = compute_fits(rows), []
    else:
        fits, checks = summarize(rows, oom, cfg.oom_search_gb)
    config = dict(dataclasses.asdict(cfg), steps=list(cfg.steps))
    report = dict(machine=machine_info(cfg), config=config, rows=rows, fits=fits, oom=oom, checks=checks,
                  statuses=STATUSES)
    if partial:
        report["partial"] = True
    return report


def run_profile(cfg: ProfileConfig) -> Dict[str, Any]:
    """Run every configuration, write CSV / JSON / PNG into ``cfg.out_dir`` and return the report (keys: machine,
    config, rows, fits, oom, checks, statuses, files)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vilseg.profiling.models import get_spec
    from vilseg.profiling.report import write_outputs

    validate_config(cfg)
    out_dir = Path(cfg.out_dir)
    log_dir = out_dir / f"{cfg.prefix}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    configs = [(m, int(s)) for m in cfg.models for s in (cfg.sizes_2d if get_spec(m).dims == 2 else cfg.sizes_3d)]
    rows: List[Dict[str, Any]] = []
    oom: List[Dict[str, Any]] = []
    console = Console(stderr=True, quiet=cfg.quiet)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False, disable=cfg.quiet) as progress:
        bar = progress.add_task("profiling", total=len(configs))
        for model, side in configs:
            spec = get_spec(model)
            progress.update(bar, description=f"{model} {_size_label(side, spec.dims)}")
            real_sizes = cfg.real_sizes_2d if spec.dims == 2 else cfg.real_sizes_3d
            train_sizes = cfg.real_train_sizes_2d if spec.dims == 2 else cfg.real_train_sizes_3d
            real = not cfg.estimate_only and (real_sizes is None or side in real_sizes)
            real_steps = [s for s in cfg.steps if real and (s != "train" or train_sizes is None or side in train_sizes)]
            task = _task_for(cfg, model, side, estimate=not cfg.real_only, real=bool(real_steps), steps=cfg.steps,
                             real_steps=real_steps)
            reason = spec.unavailable_reason()
            t0 = time.perf_counter()
            if reason is not None:
                new = rows_for(model, side, {"params": None, "estimate": {}, "real": {}}, task, None)
                for r in new:
                    r.update(status="unavailable", error=reason)
            else:
                result = _run_configuration(cfg, task, log_dir / f"{_log_name(model)}_{side}")
                new = rows_for(model, side, result, task, "--estimate" if cfg.estimate_only else
                               None if real else f"size not in the real-run sizes {real_sizes}")
            rows += new
            progress.advance(bar)
            with contextlib.suppress(Exception):  # a failed partial save must not stop the sweep
                write_outputs(_report(cfg, rows, [], partial=True), out_dir, cfg.prefix, plot=False)
            progress.console.print(_row_line(new, time.perf_counter() - t0), soft_wrap=True)
        for model in cfg.models if cfg.oom_search_gb and "train" in cfg.steps else []:
            spec = get_spec(model)
            if spec.unavailable_reason() is not None:
                continue
            top_side = max(cfg.sizes_2d if spec.dims == 2 else cfg.sizes_3d)
            swept = {r["side"]: r["peak_gib"] for r in rows if r["model"] == model and r["step"] == "train"}
            search = progress.add_task(f"{model}: {cfg.oom_search_gb:g} GiB search", total=None)
            oom.append(_oom_search(cfg, model, top_side, swept.get(top_side),
                                   lambda d, s=search: progress.update(s, description=d), log_dir, swept))
            progress.remove_task(search)
    report = _report(cfg, rows, oom, partial=False)
    report["files"] = write_outputs(report, out_dir, cfg.prefix, plot=cfg.plot)
    return report
