"""Markdown summary of one or more profiler reports (the JSON files ``tools/profile_memory.py`` writes).

    python -m vilseg.profiling.report benchmarks/results/profile_memory_2d.json \\
        benchmarks/results/profile_memory_3d.json --out benchmarks/results/profile_memory.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["markdown_report", "main"]


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
            from vilseg.profiling.runner import summarize

            limit = report.get("config", {}).get("oom_search_gb")
            report["fits"], report["checks"] = summarize(report["rows"], report.get("oom", []), limit)
        png = Path(path).with_suffix(".png")
        if args.plot and (report.get("partial") or not png.exists()):
            from vilseg.profiling.runner import plot_report

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
