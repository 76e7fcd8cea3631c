"""What a report derives from its rows: growth exponents (power-law fits of memory and time against tokens), the
size at which a fit reaches a memory limit, and the ViL-vs-attention memory checks."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .models import REF_PATCH

__all__ = ["fit_exponent", "compute_fits", "extrapolate_oom_side", "summarize", "memory_checks",
           "MIN_TOKENS_FOR_GROWTH_CHECK"]

# below a 1024^2 grid fixed costs (weights, the stem, the heads) dominate the peak and the exponent says nothing
# about the sequence part: no growth check rather than a false alarm
MIN_TOKENS_FOR_GROWTH_CHECK = 4096


def _log_points(tokens: Sequence[float], values: Sequence[float]) -> List[Tuple[float, float]]:
    return [(math.log(t), math.log(v)) for t, v in zip(tokens, values) if t and v and t > 0 and v > 0]


def _fit_line(tokens: Sequence[float], values: Sequence[float]) -> Optional[Tuple[float, float]]:
    """(slope, intercept) of the least-squares line through (log tokens, log values); None with fewer than two
    distinct points."""
    pts = _log_points(tokens, values)
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return slope, my - slope * mx


def fit_exponent(tokens: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(values) against log(tokens) (the growth exponent); None with fewer than two
    distinct points."""
    line = _fit_line(tokens, values)
    return None if line is None else line[0]


def _round(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(x, nd)


def compute_fits(rows: List[Dict[str, Any]], largest: int = 3) -> List[Dict[str, Any]]:
    """Growth exponents per model: peak training / inference memory and time against tokens, over all sizes and
    over the ``largest`` largest sizes. Memory uses the measured peak where the real run happened and the estimate
    elsewhere (they agree to within the tested tolerance)."""
    fits = []
    for model in dict.fromkeys(r["model"] for r in rows):
        entry: Dict[str, Any] = {"model": model}
        for step in ("train", "infer"):
            sel = sorted((r for r in rows if r["model"] == model and r["step"] == step), key=lambda r: r["tokens"])
            mem = [(r["tokens"], r["peak_gib"]) for r in sel if r["peak_gib"]]
            tim = [(r["tokens"], r["time_median_s"]) for r in sel if r["time_median_s"]]
            big = mem[-largest:]
            entry[f"{step}_mem_exp_all"] = _round(fit_exponent(*zip(*mem)) if len(mem) >= 2 else None)
            entry[f"{step}_mem_exp_largest"] = _round(fit_exponent(*zip(*big)) if len(big) >= 2 else None)
            entry[f"{step}_mem_largest_n"] = len(big)
            entry[f"{step}_time_exp_all"] = _round(fit_exponent(*zip(*tim)) if len(tim) >= 2 else None)
            line = _fit_line(*zip(*big)) if len(big) >= 2 else None
            entry[f"{step}_mem_fit"] = None if line is None else [round(line[0], 5), round(line[1], 5)]
        fits.append(entry)
    return fits


def extrapolate_oom_side(fit: Optional[Sequence[float]], limit_gib: float, dims: int) -> Optional[int]:
    """Input edge at which the power-law fit ``log(gib) = a log(tokens) + b`` reaches ``limit_gib``."""
    if not fit or fit[0] <= 0:
        return None
    a, b = fit
    tokens = math.exp((math.log(limit_gib) - b) / a)
    return int(round((tokens * REF_PATCH ** dims) ** (1.0 / dims)))


def summarize(rows: List[Dict[str, Any]], oom: List[Dict[str, Any]], limit_gib: Optional[float]
              ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """The growth fits (with the out-of-memory side extrapolated to ``limit_gib``, also written into ``oom``'s
    entries) and the memory checks."""
    fits = compute_fits(rows)
    if limit_gib:
        dims = {r["model"]: r["dims"] for r in rows}
        by_model = {o["model"]: o for o in oom}
        for f in fits:
            side = extrapolate_oom_side(f.get("train_mem_fit"), float(limit_gib), dims[f["model"]])
            f["train_oom_side_extrapolated"] = side
            if f["model"] in by_model:
                by_model[f["model"]]["extrapolated_side"] = side
    return fits, memory_checks(rows, fits)


def memory_checks(rows: List[Dict[str, Any]], fits: List[Dict[str, Any]], side: int = 2048) -> List[Dict[str, Any]]:
    """The ViL-vs-attention comparisons, from whatever rows are present (a check whose models or size is missing
    is left out): growth exponents of ViL-T and DeiT-T, and at ``side`` the peak training memory ratio
    DeiT-T+UperNet / ViL-T+UperNet (>= 5) and ViL vs DeiT inference time. The growth checks need a largest size of
    at least ``MIN_TOKENS_FOR_GROWTH_CHECK`` tokens."""
    checks: List[Dict[str, Any]] = []
    fit = {f["model"]: f for f in fits}

    def row(model: str, step: str) -> Optional[Dict[str, Any]]:
        return next((r for r in rows if r["model"] == model and r["step"] == step and r["side"] == side), None)

    for model, target, op in (("vil-t", 1.1, "<="), ("vil-t+upernet", 1.1, "<="),
                              ("deit-t", 2.0, "~"), ("deit-t+upernet", 2.0, "~")):
        largest = max((r["tokens"] for r in rows if r["model"] == model and r["step"] == "train"), default=0)
        if largest < MIN_TOKENS_FOR_GROWTH_CHECK:
            continue
        e = fit.get(model, {}).get("train_mem_exp_largest")
        if e is not None:
            ok = e <= target if op == "<=" else abs(e - target) <= 0.3
            checks.append(dict(check=f"{model}: growth exponent of peak training memory (largest sizes)",
                               value=e, target=f"{op} {target}", passed=ok))
    vil, deit = row("vil-t+upernet", "train"), row("deit-t+upernet", "train")
    if vil and deit and vil["peak_gib"] and deit["peak_gib"]:
        ratio = deit["peak_gib"] / vil["peak_gib"]
        checks.append(dict(check=f"{side}^2 peak training memory DeiT-T+UperNet / ViL-T+UperNet "
                                 f"({deit['peak_gib']:.2f} / {vil['peak_gib']:.2f} GiB, "
                                 f"{deit['peak_source']} / {vil['peak_source']})",
                           value=round(ratio, 2), target=">= 5", passed=ratio >= 5))
    for a, b in (("vil-t+upernet", "deit-t+upernet"), ("vil-t", "deit-t")):
        ra, rb = row(a, "infer"), row(b, "infer")
        if ra and rb and ra["time_median_s"] and rb["time_median_s"]:
            ratio = rb["time_median_s"] / ra["time_median_s"]
            checks.append(dict(check=f"{side}^2 inference time {b} / {a} "
                                     f"({rb['time_median_s']:.2f} s / {ra['time_median_s']:.2f} s)",
                               value=round(ratio, 2), target="> 1 (ViL faster)", passed=ratio > 1))
    return checks
