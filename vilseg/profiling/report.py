"""What a profiling run writes: the CSV (one row per model, size and step), the JSON (machine, config, rows,
fits, out-of-memory search, checks), the log-log plot, the terminal tables, and a Markdown summary of one or more
JSON reports:

    python -m vilseg.profiling.report benchmarks/results/profile_memory_2d.json \\
        benchmarks/results/profile_memory_3d.json --out benchmarks/results/profile_memory.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .settings import GIB, ProfileConfig

__all__ = ["machine_info", "write_outputs", "plot_report", "summary_tables", "markdown_report", "main"]


def machine_info(cfg: ProfileConfig) -> Dict[str, Any]:
    """CPU / GPU name, core count, library versions, dtype, batch, command line, date."""
    import torch

    from vilseg.utils.env import cpu_name, library_versions

    info: Dict[str, Any] = dict(
        cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=cfg.threads or torch.get_num_threads(),
        platform=platform.platform(), torch=torch.__version__,
        device=cfg.device, dtype=cfg.dtype, batch_train_2d=cfg.batch, batch_infer_2d=cfg.infer_batch,
        batch_train_3d=cfg.batch_3d, batch_infer_3d=cfg.infer_batch_3d,
        num_classes_2d="as in the config" if cfg.num_classes is None else cfg.num_classes,
        num_classes_3d="as in the config" if cfg.num_classes_3d is None else cfg.num_classes_3d,
        optimizer_step=cfg.optimizer_step, head_loss=cfg.head_loss, memory_backend=cfg.backend,
        max_mem_gb=cfg.max_mem_gb, command=cfg.command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as fh:
            m = re.search(r"MemTotal:\s+(\d+) kB", fh.read())
            if m:
                info["memory_gib"] = round(int(m.group(1)) / 2**20, 1)
    if cfg.device.startswith("cuda"):
        dev = torch.device(cfg.device)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1)
    info.update(library_versions(("mmseg", "mmengine", "mmcv", "monai")))
    return info


CSV_COLUMNS = ["model", "description", "dims", "kind", "step", "size", "side", "pixels", "tokens", "batch",
               "status", "peak_gib", "peak_source", "measured_peak_gib", "estimated_peak_gib",
               "estimate_error_pct", "live_growth_gib", "held_gib", "held_method", "time_median_s", "n_repeats", "gflops", "params_m", "threads", "note", "error"]


def write_outputs(report: Dict[str, Any], out_dir: Path, prefix: str, plot: bool = True) -> Dict[str, str]:
    """Write ``<prefix>.csv`` (one row per model, size and step), ``<prefix>.json`` (machine, config,
    rows, fits, 80 GB search, checks) and ``<prefix>.png`` (log-log plots). Returns the paths."""
    import csv

    from vilseg.utils.checkpoint import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(out_dir / f"{prefix}.csv"), "json": str(out_dir / f"{prefix}.json")}
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            w.writerow(r)
    if plot:
        files["png"] = str(out_dir / f"{prefix}.png")
        plot_report(report, files["png"])
    atomic_write(json.dumps(dict(report, files=files), indent=1).encode(), files["json"])
    return files


def plot_report(report: Dict[str, Any], path: str) -> None:
    """Log-log plots against tokens, one line per model: peak training / inference memory (filled
    markers measured, hollow markers estimated) and training / inference time; 2D and 3D in separate
    rows, one legend for all panels. Dotted lines mark the real-run cap and 80 GiB where they are within a
    decade of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    dims_present = sorted({r["dims"] for r in rows})
    panels = [("train", "peak_gib", "peak training memory (GiB)"), ("infer", "peak_gib", "peak inference memory (GiB)"),
              ("train", "time_median_s", "training step time (s)"), ("infer", "time_median_s", "inference time (s)")]
    fig, axes = plt.subplots(len(dims_present), 4, figsize=(22, 5.2 * len(dims_present)), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    cmap = plt.get_cmap("tab10")
    bases = list(dict.fromkeys(m.split("+")[0] for m in models))  # a backbone and its +UperNet share a colour
    colors = {m: cmap(bases.index(m.split("+")[0]) % 10) for m in models}
    cap = report.get("machine", {}).get("max_mem_gb")
    for ri, dims in enumerate(dims_present):
        for ci, (step, key, title) in enumerate(panels):
            ax = axes[ri][ci]
            for m in models:
                sel = sorted((r for r in rows if r["model"] == m and r["step"] == step and r["dims"] == dims
                              and r.get(key)), key=lambda r: r["tokens"])
                if not sel:
                    continue
                xs = [r["tokens"] for r in sel]
                ys = [r[key] for r in sel]
                style = "--" if "+upernet" in m else "-"
                ax.plot(xs, ys, style, color=colors[m], label=m, linewidth=1.5)
                if key == "peak_gib":
                    meas = [(x, y) for x, y, r in zip(xs, ys, sel) if r["peak_source"] == "measured"]
                    est = [(x, y) for x, y, r in zip(xs, ys, sel) if r["peak_source"] != "measured"]
                    if meas:
                        ax.plot(*zip(*meas), "o", color=colors[m], markersize=5)
                    if est:
                        ax.plot(*zip(*est), "o", mfc="none", color=colors[m], markersize=6)
                else:
                    ax.plot(xs, ys, "o", color=colors[m], markersize=5)
            if key == "peak_gib":
                top = max((line.get_ydata().max() for line in ax.lines if len(line.get_ydata())), default=0.0)
                # reference lines only where they are within a decade of the data: drawn far above it they would
                # squeeze the measured curves to the bottom of the panel
                for level, label, colour in ((cap, f"real-run cap {cap:g} GiB" if cap else "", "grey"),
                                             (80, "80 GiB (one 80 GB GPU)", "red")):
                    if level and top and level <= 10 * top:
                        ax.axhline(level, color=colour, linestyle=":", linewidth=1)
                        ax.annotate(label, xy=(0.01, level), xycoords=("axes fraction", "data"), va="bottom",
                                    fontsize=8, color=colour)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"tokens ({'pixels / 16^2' if dims == 2 else 'voxels / 16^3'})")
            ax.set_title(f"{dims}D: {title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    # one legend for every panel: each model once, in the colour and line style of its curves
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], linestyle="--" if "+upernet" in m else "-", marker="o",
                      markersize=5, label=m) for m in models]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=10, frameon=False)
    machine = report.get("machine", {})
    styles = "filled: measured, hollow: estimated (fake tensors)"
    if any("+upernet" in m for m in models):
        styles += "; solid: backbone, dashed: + UperNet"
    fig.suptitle(f"{machine.get('device', '')} ({machine.get('gpu') or machine.get('cpu', '')}), "
                 f"torch {machine.get('torch', '')}, {machine.get('dtype', '')}; {styles}", fontsize=10)
    legend_rows = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * legend_rows / len(dims_present), 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_tables(report: Dict[str, Any]) -> List[Any]:
    """rich tables: per model the growth exponents, the peak and time at the largest size, the
    80 GB estimate; then the memory checks."""
    from rich.table import Table

    rows, fits = report["rows"], report["fits"]
    oom = {o["model"]: o for o in report.get("oom", [])}
    t = Table(title="Growth of peak memory with tokens (slope of log(peak) vs log(tokens))")
    for col in ("model", "train exp. (all)", "train exp. (largest)", "infer exp. (all)", "infer exp. (largest)",
                "largest size", "train peak GiB", "infer peak GiB", "train s", "infer s", "80 GB OOM side"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def fmt(x: Any, nd: int = 2) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    for f in fits:
        m = f["model"]
        sel = [r for r in rows if r["model"] == m]
        if not sel:
            continue
        side = max(r["side"] for r in sel)
        at = {r["step"]: r for r in sel if r["side"] == side}

        def cell(step: str, key: str) -> str:
            r = at.get(step)
            if r is None:
                return "-"
            if r.get(key) is None:
                return r["status"] if key == "peak_gib" or r["status"] not in ("ok", "estimated") else "-"
            suffix = "*" if key == "peak_gib" and r["peak_source"] == "estimated" else ""
            return fmt(r[key], 3) + suffix

        o = oom.get(m)
        oom_txt = "-"
        if o:
            if o.get("first_exceeding_side"):
                oom_txt = f"{o['first_exceeding_side']} (fits {o.get('largest_fitting_side') or '<'})"
            else:
                oom_txt = o.get("status", "-")
            if o.get("extrapolated_side"):
                oom_txt += f"; fit {o['extrapolated_side']}"
        n = f.get("train_mem_largest_n", 0)
        t.add_row(m, fmt(f["train_mem_exp_all"]), fmt(f["train_mem_exp_largest"]) + (f" ({n})" if n else ""),
                  fmt(f["infer_mem_exp_all"]), fmt(f["infer_mem_exp_largest"]),
                  next(iter(at.values()))["size"], cell("train", "peak_gib"), cell("infer", "peak_gib"),
                  cell("train", "time_median_s"), cell("infer", "time_median_s"), oom_txt)
    tables = [t]
    if report.get("checks"):
        c = Table(title="Memory checks (ViL vs attention)")
        for col in ("check", "value", "target", "passed"):
            c.add_column(col)
        for ch in report["checks"]:
            c.add_row(ch["check"], str(ch["value"]), ch["target"], "yes" if ch["passed"] else "NO")
        tables.append(c)
    return tables


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _peak_cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    if r.get("peak_gib") is None:
        return r["status"]
    mark = "" if r["peak_source"] == "measured" else " (est.)"
    extra = "" if r["status"] in ("ok", "estimated") else f" [{r['status']}]"
    return f"{r['peak_gib']:.3f}{mark}{extra}"


def _time_cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    if r.get("time_median_s") is not None:
        return f"{r['time_median_s']:.3f}"
    return "-" if r["status"] in ("ok", "estimated") else r["status"]


def markdown_report(report: Dict[str, Any]) -> str:
    """One report as Markdown: command, machine, growth exponents, per-size peaks and times, the
    80 GiB search and the memory checks."""
    m, rows, fits = report["machine"], report["rows"], report["fits"]
    lines = [f"Command: `{m.get('command', '')}`", ""]
    lines.append(
        f"Machine: {m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} logical CPUs, {m.get('memory_gib')} GiB), "
        f"device `{m.get('device')}`, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"mmseg {m.get('mmseg', '-')}, mmcv {m.get('mmcv', '-')}, MONAI {m.get('monai', '-')}; dtype {m.get('dtype')}; "
        f"batch: train {m.get('batch_train_2d')} / infer {m.get('batch_infer_2d')} (2D), "
        f"train {m.get('batch_train_3d')} / infer {m.get('batch_infer_3d')} (3D); classes {m.get('num_classes_2d')} (2D), "
        f"{m.get('num_classes_3d')} (3D); optimizer step: {m.get('optimizer_step')}; "
        f"2D decode-head loss: {m.get('head_loss', 'mmseg')}; memory tracker: "
        f"{m.get('memory_backend')}; real-run cap {m.get('max_mem_gb')} GiB; {m.get('date')}.")
    lines.append("")
    oom = {o["model"]: o for o in report.get("oom", [])}
    lines.append("Growth exponent = least-squares slope of log(peak memory) against log(tokens); "
                 "'all' uses every size, 'largest' the 3 largest. Peaks are measured where the real run "
                 "happened and estimated (fake tensors) elsewhere.")
    lines.append("")
    hdr = ["model", "train exp. (all)", "train exp. (largest 3)", "infer exp. (all)", "infer exp. (largest 3)",
           "80 GiB boundary (search)", "80 GiB (fit extrapolation)"]
    body = []
    for f in fits:
        o = oom.get(f["model"])
        if o and (o.get("largest_fitting_side") or o.get("first_exceeding_side")):
            search = f"fits {_fmt(o.get('largest_fitting_side'))}, exceeds {_fmt(o.get('first_exceeding_side'))}"
            if o.get("status") not in (None, "ok"):
                search += f" ({o['status']})"
        else:
            search = o.get("status", "-") if o else "-"
        body.append([f["model"], _fmt(f.get("train_mem_exp_all")), _fmt(f.get("train_mem_exp_largest")),
                     _fmt(f.get("infer_mem_exp_all")), _fmt(f.get("infer_mem_exp_largest")), search,
                     _fmt(f.get("train_oom_side_extrapolated"))])
    lines += [_table(hdr, body), ""]

    sides = sorted({r["side"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    index = {(r["model"], r["side"], r["step"]): r for r in rows}
    for step, title in (("train", "Peak training memory (GiB)"), ("infer", "Peak inference memory (GiB)")):
        lines.append(f"**{title}**; '(est.)': estimated only")
        lines.append("")
        lines.append(_table(["model"] + [str(s) for s in sides],
                            [[mo] + [_peak_cell(index.get((mo, s, step))) for s in sides] for mo in models]))
        lines.append("")
    for step, title in (("train", "Training step time (s, median)"), ("infer", "Inference time (s, median)")):
        lines.append(f"**{title}**")
        lines.append("")
        lines.append(_table(["model"] + [str(s) for s in sides],
                            [[mo] + [_time_cell(index.get((mo, s, step))) for s in sides] for mo in models]))
        lines.append("")
    held = [r for r in rows if r.get("held_gib") is not None]
    if held:
        lines.append("**Live tensors vs what the process held** (real runs, each step in a fresh process): live "
                     "growth = peak of live tensors minus those alive before the step (parameters, inputs); held = "
                     "growth of the resident high-water mark (CPU) or of the CUDA allocator's reserved memory, GiB")
        lines.append("")
        lines.append(_table(["model", "size", "step", "live peak", "live growth", "held", "held / live growth"],
                            [[r["model"], r["size"], r["step"], _fmt(r["measured_peak_gib"], 3),
                              _fmt(r["live_growth_gib"], 3), _fmt(r["held_gib"], 3),
                              _fmt(r["held_gib"] / r["live_growth_gib"] if r["live_growth_gib"] else None)]
                             for r in held]))
        lines.append("")
    errs = [r for r in rows if r.get("estimate_error_pct") is not None]
    if errs:
        worst = max(errs, key=lambda r: abs(r["estimate_error_pct"]))
        lines.append(f"Estimate vs measurement: {len(errs)} (model, size, step) pairs measured both ways; largest "
                     f"difference {worst['estimate_error_pct']:+.2f} % ({worst['model']} {worst['size']} "
                     f"{worst['step']}).")
        lines.append("")
    if report.get("checks"):
        lines.append(_table(["memory check", "value", "target", "passed"],
                            [[c["check"], c["value"], c["target"], "yes" if c["passed"] else "**NO**"]
                             for c in report["checks"]]))
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="JSON files written by tools/profile_memory.py")
    p.add_argument("--out", default=None, help="Markdown file to write (default: print)")
    p.add_argument("--plot", action="store_true",
                   help="also write <report>.png for reports that have none (or are partial)")
    args = p.parse_args(argv)
    parts = []
    for path in args.reports:
        if not Path(path).is_file():
            print(f"error: report {path!r} does not exist", file=sys.stderr)
            return 2
        with open(path) as fh:
            report = json.load(fh)
        if report.get("partial"):  # an interrupted sweep: derive what the end of the run would have added
            from vilseg.profiling.fits import summarize

            limit = report.get("config", {}).get("oom_search_gb")
            report["fits"], report["checks"] = summarize(report["rows"], report.get("oom", []), limit)
        png = Path(path).with_suffix(".png")
        if args.plot and (report.get("partial") or not png.exists()):
            plot_report(report, str(png))
        title = f"## {Path(path).stem}" + (" (interrupted sweep: the rows it finished)" if report.get("partial") else "")
        parts.append(title + "\n\n" + markdown_report(report))
    text = "# Peak memory and time against resolution\n\n" + "\n\n".join(parts) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
