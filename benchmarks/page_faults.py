"""Page faults of a training step: what a fresh page costs on this machine, how many pages a training step of the
shipped backbones faults in, and where in ViL-T's layer, with glibc's malloc as the training tools' ``--malloc``
sets it.

First, in this process, the machine's price of a fresh page: the first write of a new 64 MiB tensor against a
second write of the same memory (its pages faulted in by then). Then each (model, ``--malloc`` setting) in a fresh
process: the backbone of the shipped config (``benchmarks/vil_speed.py``'s models), batch 1, ``--side``², two
warm-up training steps (forward + backward of the mean of the outputs), then ``--steps`` steps, each with its minor
page faults (``getrusage``) and its time; for ViL-T also the pages each of vilseg's native operators faults in (its
calls of the extension's functions, counted around each call). Writes ``--out-dir``/``--name``.{md,json} with
machine, versions and command line.

    python benchmarks/page_faults.py --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vil_speed import MODELS  # noqa: E402  (one model -> config mapping for the speed benchmarks)

from vilseg.profiling.cells import add_cell_options  # noqa: E402
from vilseg.utils.allocator import MALLOC_MODES  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_price(mib: int = 64) -> Dict[str, float]:
    """Seconds of the first and the second write of a new ``mib`` MiB tensor, the pages the first faulted in, and
    from them the price of one fresh page and the write bandwidth of mapped memory."""
    import torch

    x = torch.empty(mib * 2**18)  # float32
    before, t0 = _faults(), time.perf_counter()
    x.fill_(1.0)
    first, pages = time.perf_counter() - t0, _faults() - before
    t0 = time.perf_counter()
    x.fill_(2.0)
    again = time.perf_counter() - t0
    return dict(mib=mib, first_s=first, again_s=again, pages=pages,
                us_per_page=(first - again) / max(pages, 1) * 1e6, gb_per_s=mib * 2**20 / again / 1e9)


class _CountingExtension:
    """Stands in for ``vilseg.ops.vil_layer``'s handle of the native extension: every call of one of its functions
    adds the pages it faulted in to ``counts`` (this benchmark's worker process only)."""

    def __init__(self, ext, counts: collections.Counter) -> None:
        self._ext, self._counts = ext, counts

    def __getattr__(self, name: str):
        fn = getattr(self._ext, name)

        def counted(*args, **kwargs):
            before = _faults()
            try:
                return fn(*args, **kwargs)
            finally:
                self._counts[name] += _faults() - before

        return counted


def worker(model_name: str, malloc: str, side: int, steps: int) -> Dict:
    """One model under one malloc setting, in this process: the faults and seconds of each training step, and for
    ViL-T the faults of its native operators over those steps."""
    from vilseg.utils.allocator import configure_malloc

    setting = configure_malloc(malloc)
    import torch

    import vilseg.ops.vil_layer as vil_layer
    from vilseg.apis import build_backbone
    from vilseg.profiling.timing import backbone_training_step

    counts: collections.Counter = collections.Counter()
    if vil_layer._ext is not None:
        vil_layer._ext = _CountingExtension(vil_layer._ext, counts)
    model = build_backbone(MODELS[model_name], side)
    model.train()  # (separately: some mmseg backbones' train() returns None)
    x = torch.randn(1, 3, side, side)
    step = backbone_training_step(model, x)
    for _ in range(2):
        step()
    counts.clear()
    faults, seconds = [], []
    for _ in range(steps):
        before, t0 = _faults(), time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        faults.append(_faults() - before)
    return dict(malloc=setting, faults=faults, seconds=seconds,
                operators={name: n / steps for name, n in counts.most_common()})


def markdown(report: Dict) -> List[str]:
    price = report["page_price"]
    lines = ["# Page faults of a training step", "", *report["provenance"], f"- started: {report['date']}", "",
             "## A fresh page on this machine", "",
             f"The first write of a new {price['mib']} MiB tensor took {price['first_s'] * 1e3:.1f} ms and faulted in "
             f"{price['pages']:,} pages; writing it again took {price['again_s'] * 1e3:.1f} ms: "
             f"**{price['us_per_page']:.2f} µs per fresh page**, {price['gb_per_s']:.1f} GB/s to write mapped "
             "memory (one thread).", "",
             f"## Training steps, backbone at {report['side']}², batch 1 (after two warm-up steps)", "",
             "| model | malloc | step (median) | pages faulted per step: median (range) |", "|---|---|---:|---:|"]
    for key, r in report["cells"].items():
        model, malloc = key.split("/")
        if "error" in r:
            lines.append(f"| {model} | {malloc} | - ({r['error']}) | - |")
            continue
        lines.append(f"| {model} | {malloc} | {statistics.median(r['seconds']):.3f} s | "
                     f"{statistics.median(r['faults']):,.0f} ({min(r['faults']):,}-{max(r['faults']):,}) |")
    vil = {key.split("/")[1]: r for key, r in report["cells"].items() if key.startswith("vil_t/") and "error" not in r}
    if vil:
        names = sorted({n for r in vil.values() for n in r["operators"]},
                       key=lambda n: -max(r["operators"].get(n, 0) for r in vil.values()))
        lines += ["", "## ViL-T: pages faulted per step in vilseg's native operators", "",
                  "| operator | " + " | ".join(f"malloc {m}" for m in vil) + " |", "|---|" + "---:|" * len(vil)]
        for name in names:
            lines.append(f"| `{name}` | " + " | ".join(f"{r['operators'].get(name, 0):,.0f}" for r in vil.values())
                         + " |")
    lines += ["", "Settings: " + "; ".join(sorted({f"{k.split('/')[1]}: {r['malloc']}"
                                                  for k, r in report["cells"].items() if "malloc" in r})) + "."]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MALLOC"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["vil_t", "deit_t"], choices=list(MODELS))
    parser.add_argument("--malloc", nargs="+", default=["system", "keep"], choices=MALLOC_MODES)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=7)
    add_cell_options(parser, "page_faults")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.side, args.steps)))
        return 0
    from vilseg.profiling.cells import run_json_worker
    from vilseg.utils.env import provenance_lines, write_markdown

    report = dict(provenance=provenance_lines(os.path.relpath(__file__), argv if argv is not None else sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M"), side=args.side, cells={})
    torch.set_num_threads(1)  # the page price: one thread writing
    report["page_price"] = page_price()
    for model in args.models:
        for malloc in args.malloc:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, malloc, "--side", str(args.side),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            report["cells"][f"{model}/{malloc}"] = run_json_worker(cmd, args.cell_timeout_s)
            print(f"{model} / malloc {malloc}: done", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    write_markdown(str(out), f"{args.name}.md", markdown(report), echo_last=12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
