"""Training-step and inference time of the shipped configs, side by side: ViL-T vs DeiT-T vs SDPA DeiT-T vs Swin-T.

Every cell (model x size x part x mode) runs in a fresh process with the same torch thread count, one after the
other in one run, so the ratios compare like with like on the same (possibly noisy) machine:

* part ``backbone``: ``model.backbone`` of the config, batch 1, forward (+ backward of the mean of all outputs);
* part ``segmentor``: the whole segmentor; training = ``model.loss`` on random 150-class labels at batch 2
  (UperNet's pyramid pooling needs batch >= 2) + backward, inference = ``model.predict`` at batch 1 (one window);
* every cell's process first sets glibc's malloc as the training tools' ``--malloc`` does (``keep``, the default:
  mid-sized freed memory kept for reuse, :mod:`vilseg.utils.allocator`; ``system``: the C library's defaults);
* after a warm-up step at 64², the first step at the cell's size and the timed steps after it give ``held``: the
  growth of the process's peak resident memory (CPU) or ``max_memory_reserved`` (CUDA), i.e. what the machine
  must have; the time is the median of ``--repeats`` steps after the first (one step for a cell whose first is
  slower than ``--long-s``); ``live`` is
  the peak of what PyTorch's allocator handed out above the model and input during one more step (CPU: vilseg's
  allocator-level tracker, which watches the step as it runs unwatched, native operators included; CUDA:
  ``max_memory_allocated``).

A fresh process's step time moves with the (shared, virtual) machine's state of the moment; ``--rounds N`` runs
every cell in N fresh processes, the models of a size taking turns round after round (every other round in reverse
order), and reports the median with the range, so that a ratio compares models that met the same states.

Writes ``--out-dir``/vil_speed.{md,json} (default ``work_dirs/vil_speed``) with machine, versions and command line;
``--out-dir benchmarks/results`` refreshes the tracked table. The JSON is saved after every cell: of a run cut
short, ``--render`` that JSON writes the table of the finished cells and names the ones that did not run.

    python benchmarks/vil_speed.py --out-dir benchmarks/results       # the full table (about 25 min on 2 cores)
    python benchmarks/vil_speed.py --sizes 256 512 --parts backbone  # a quick look
    python benchmarks/vil_speed.py --models vil_t deit_t --sizes 512 --parts backbone --modes train --rounds 5
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

from vilseg.profiling.cells import add_cell_options
from vilseg.utils.allocator import MALLOC_MODES

MODELS = {
    "vil_t": "configs/vil_upernet_ade20k.py",
    "vil_t_compiled": "configs/vil_upernet_ade20k_compiled.py",
    "vil_t_compiled_recompute": "configs/vil_upernet_ade20k_compiled_recompute.py",
    "vil_t_keep_activations": "configs/vil_upernet_ade20k_keep_activations.py",
    "vil_t_pytorch_ops": "configs/vil_upernet_ade20k_pytorch_ops.py",
    "vil_t_small_tiles": "configs/vil_upernet_ade20k_small_tiles.py",
    "deit_t": "configs/baselines/deit_t_upernet_ade20k.py",
    "deit_t_sdpa": "configs/baselines/deit_t_sdpa_upernet_ade20k.py",
    "swin_t": "configs/baselines/swin_t_upernet_ade20k.py",
}

# a cell whose first step takes longer than this many seconds is timed on one further step only
LONG_S = 20.0

# what a report's `live` column is, by how it was measured (reports before the allocator-level tracker: "tracker")
LIVE_TEXT = {
    "tracker": "peak of live tensors above model and input (not for compiled models: under the tracker's dispatch "
               "mode torch.compile runs them eagerly; ViL-T's layers run their autograd form there)",
    "allocator": "peak of what PyTorch's allocator handed out above model and input, in one more step run as "
                 "unwatched (CPU: torch.profiler's memory events; CUDA: max_memory_allocated)",
}
# over which steps a report's `held` column was measured (reports before the timed steps counted: "first step")
HELD_TEXT = {"first step": "in the first step at the size",
             "all steps": "over the first step at the size and the timed steps"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(config: str, size: int, part: str, mode: str, repeats: int, long_s: float, with_live: bool,
           malloc: str = "keep") -> Dict:
    """One cell, in this process: set malloc as the training tools do (``malloc``, :mod:`vilseg.utils.allocator`),
    build from the config, warm up, measure, report."""
    from vilseg.utils.allocator import configure_malloc

    malloc_setting = configure_malloc(malloc)
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from vilseg.apis import build_backbone, load_config
    from vilseg.engine.registry import build_model
    from vilseg.profiling.memory import resident_peak_bytes
    from vilseg.profiling.timing import backbone_training_step
    from vilseg.utils.env import resolve_device

    device = resolve_device()
    if part == "backbone":
        model = build_backbone(config, size)
    else:
        cfg = load_config(config, adapt=True)
        cfg.model.test_cfg = dict(mode="whole")
        model = build_model(cfg.model, init_weights=True)
    model = model.to(device)
    model.train(mode == "train")
    batch = 2 if (part == "segmentor" and mode == "train") else 1

    def inputs(side: int):
        x = torch.randn(batch, 3, side, side, device=device)
        samples = []
        for _ in range(batch if part == "segmentor" else 0):
            sample = SegDataSample(metainfo=dict(img_shape=(side, side), ori_shape=(side, side),
                                                 pad_shape=(side, side)))
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, side, side), device=device))
            samples.append(sample)
        return x, samples

    def step(x, samples) -> None:
        if part == "segmentor":
            model.data_preprocessor.size = tuple(x.shape[-2:])
        if mode == "train" and part == "backbone":
            backbone_training_step(model, x)()
        elif mode == "train":
            loss = sum(v for k, v in model.loss(x, samples).items() if "loss" in k)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x) if part == "backbone" else model.predict(x, samples)
        _sync(device)

    # warm-up at 64^2 (first-call costs); the first step at the cell's size and the timed steps after it (one step
    # only for long cells) give the growth of resident memory, the timed steps the time
    step(*inputs(64))
    x, samples = inputs(size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    held0 = resident_peak_bytes()
    t0 = time.perf_counter()
    step(x, samples)
    first = time.perf_counter() - t0
    times = []
    for _ in range(1 if first > long_s else repeats):  # never the first step: it may include a compile
        t0 = time.perf_counter()
        step(x, samples)
        times.append(time.perf_counter() - t0)
    # over all steps, not the first alone: an allocator that keeps freed memory must not grow from step to step
    if device.type == "cuda":
        held = torch.cuda.max_memory_reserved() / 2**20
    else:
        held = (resident_peak_bytes() - held0) / 2**20
    live = None
    if with_live:
        from vilseg.profiling.memory import measure_peak

        # the allocator's figures, not a dispatch-mode tracker's: under a dispatch mode the ViL layers (and
        # torch.compile) would run another form than the one timed
        _, peak = measure_peak(lambda: step(x, samples), device=device, track=[model, x], backend="allocator")
        live = (peak.peak_bytes - peak.start_bytes) / 2**20
    return dict(seconds=statistics.median(times), repeats=len(times),
                first_s=first, held_mib=held, live_mib=live, malloc=malloc_setting,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)


def worker_command(config: str, size: int, part: str, mode: str, repeats: int, threads: int, no_live: bool,
                   long_s: float = LONG_S, malloc: str = "keep") -> List[str]:
    """The command that measures one cell (:func:`worker`) in a fresh process; other benchmarks use it too."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, str(size), part, mode,
           "--repeats", str(repeats), "--long-s", str(long_s), "--threads", str(threads), "--malloc", malloc]
    return cmd + (["--no-live"] if no_live else [])


def run_cell(model: str, size: int, part: str, mode: str, args) -> Dict:
    from vilseg.profiling.cells import run_json_worker

    return run_json_worker(worker_command(MODELS[model], size, part, mode, args.repeats, args.threads, args.no_live,
                                          args.long_s, args.malloc), args.cell_timeout_s)


def combine_rounds(results: List[Dict]) -> Dict:
    """One cell measured in several fresh processes (rounds): the medians, and every round's time."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[-1]
    out = dict(good[-1])
    for key in ("seconds", "first_s", "held_mib"):
        out[key] = statistics.median(r[key] for r in good)
    lives = [r["live_mib"] for r in good if r.get("live_mib") is not None]
    out["live_mib"] = statistics.median(lives) if lives else None
    out["round_seconds"] = [r["seconds"] for r in good]
    out["failed_rounds"] = len(results) - len(good)
    return out


def round_cell(model: str, size: int, part: str, mode: str, args, report: Dict) -> Dict:
    """One more round of a cell (a fresh process): its result joins the cell's earlier rounds."""
    rounds = report.setdefault("rounds", {}).setdefault(f"{model}/{size}/{part}/{mode}", [])
    rounds.append(run_cell(model, size, part, mode, args))
    return combine_rounds(rounds)


def markdown(report: Dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = ["# ViL speed, shipped configs side by side", "",
             f"- machine: {report['machine']}", f"- versions: {versions}",
             f"- command: `{report['command']}`", f"- started: {report['date']}",
             "- environment: " + (", ".join(f"`{k}={v}`" for k, v in report.get("environment", {}).items())
                                  or "no allocator or threading variables set"),
             "- malloc in every cell: " + _malloc_text(report), "",
             ("Seconds per step (each cell a fresh process)" if report.get("rounds_per_cell", 1) == 1 else
              f"Seconds per step: each cell ran in {report['rounds_per_cell']} fresh processes, the models' processes "
              "taking turns (round by round, every other round in reverse order, so that every model meets the "
              "machine's changing states alike); the median of them, in parentheses their range") +
             "; in brackets the ViL-T time divided by this model's "
             "(below 1: ViL-T is faster); `live` = " + LIVE_TEXT[report.get("live_method", "tracker")] +
             ", `held` = growth of resident memory (CPU) or reserved memory (CUDA) "
             + HELD_TEXT[report.get("held_over", "first step")] + ", both MiB.", ""]
    for part in report["parts"]:
        for mode in report["modes"]:
            sizes = [s for s in report["sizes"]
                     if any(f"{m}/{s}/{part}/{mode}" in report["cells"] for m in report["models"])]
            if not sizes:
                continue
            batch = 2 if (part == "segmentor" and mode == "train") else 1
            what = "training step (forward + backward)" if mode == "train" else "inference"
            lines += [f"## {part}, {what}, batch {batch}", "",
                      "| model | " + " | ".join(f"{s}²" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
            for model in report["models"]:
                cells = []
                for size in sizes:
                    r = report["cells"].get(f"{model}/{size}/{part}/{mode}")
                    vil = report["cells"].get(f"vil_t/{size}/{part}/{mode}")
                    if r is None:  # a run cut short (its JSON is saved after every cell; --render)
                        cells.append("- (not run)")
                    elif "error" in r:
                        cells.append(f"- ({r['error']})")
                    else:
                        ratio = ""
                        if model != "vil_t" and vil and "seconds" in vil:
                            ratio = f" [ViL-T / this: {vil['seconds'] / r['seconds']:.2f}]"
                        live = "" if r.get("live_mib") is None else f", live {r['live_mib']:.0f}"
                        spread = ""
                        if len(r.get("round_seconds", [])) > 1:
                            spread = f" ({min(r['round_seconds']):.3f}-{max(r['round_seconds']):.3f})"
                        cells.append(f"{r['seconds']:.3f} s{spread}{ratio}{live}, held {r['held_mib']:.0f}")
                lines.append(f"| {model} (`{MODELS[model]}`) | " + " | ".join(cells) + " |")
            lines.append("")
    missing = [key for key in report.get("planned", []) if key not in report["cells"]]
    if missing:  # the run ended first (a time limit): say which cells the table lacks
        lines += ["Not run (the run ended before them): " + ", ".join(f"`{key}`" for key in missing) + ".", ""]
    return "\n".join(lines)


def _malloc_text(report: Dict) -> str:
    """What the cells' processes did with malloc: their own words (one per distinct setting), or, for a report from
    before the option, glibc's defaults."""
    said = sorted({r["malloc"] for r in report.get("cells", {}).values() if r.get("malloc")})
    return "; ".join(said) if said else "the C library's default malloc settings (vilseg did not set it)"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "SIZE", "PART", "MODE"), help=argparse.SUPPRESS)
    variants = ("vil_t_compiled", "vil_t_compiled_recompute", "vil_t_keep_activations", "vil_t_pytorch_ops",
                "vil_t_small_tiles")  # ViL-T variants, when asked for
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m not in variants],
                        choices=list(MODELS), help="vil_t_compiled: the layers through torch.compile (each cell "
                                                   "compiles again; its first step includes the compile); "
                                                   "vil_t_compiled_recompute: the same with the layer recompute "
                                                   "inside the compiled graph instead of a memory budget; "
                                                   "vil_t_keep_activations: the layer recompute off; "
                                                   "vil_t_pytorch_ops: the layers without the fused native "
                                                   "operators; "
                                                   "vil_t_small_tiles: training tiles of 512 tokens")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--parts", nargs="+", default=["backbone", "segmentor"], choices=["backbone", "segmentor"])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--segmentor-max-size", type=int, default=512,
                        help="largest size for the segmentor part (UperNet at 2048² dominates the run time)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per cell, the models taking turns; the table gives their median")
    parser.add_argument("--long-s", type=float, default=LONG_S, help="a first step slower than this: one timed step")
    add_cell_options(parser, "vil_speed")
    parser.add_argument("--no-live", action="store_true", help="skip the extra step that tracks live tensors")
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="keep",
                        help="glibc malloc in every cell, as the training tools' --malloc: 'keep' (default) keeps "
                             "mid-sized freed memory for reuse; 'system' the C library's defaults")
    parser.add_argument("--render", metavar="JSON", help="only write the Markdown table of an earlier run's JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        config, size, part, mode = args.worker
        print(json.dumps(worker(config, int(size), part, mode, args.repeats, args.long_s, not args.no_live,
                                args.malloc)))
        return 0

    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())) + "\n")
        print(f"written: {path.with_suffix('.md')}")
        return 0
    from vilseg.profiling.cells import run_cells
    from vilseg.utils.env import describe_machine, library_versions

    # size by size (training and inference of a size together): a run cut short by a time limit loses its largest
    # sizes, not a whole mode
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    groups = [(s, p, md) for p in args.parts for s in args.sizes for md in args.modes
              if not (p == "segmentor" and s > args.segmentor_max_size)]
    cells = [(m, s, p, md) for s, p, md in groups for m in args.models]
    # with rounds: a group's models in turn, round after round, before the next group; every other round in reverse
    # order (A B, B A, ...), so that no model always follows the same one
    runs = [(m, s, p, md) for s, p, md in groups for r in range(args.rounds)
            for m in (args.models if r % 2 == 0 else args.models[::-1])]
    report = dict(machine=describe_machine(), versions=library_versions(), date=time.strftime("%Y-%m-%d %H:%M"),
                  command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                  # allocator and threading settings inherited by every cell change the figures: recorded
                  environment={k: v for k, v in sorted(os.environ.items())
                               if k.startswith(("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD", "THP_", "GLIBC_TUNABLES"))},
                  models=args.models, sizes=args.sizes, parts=args.parts, modes=args.modes,
                  planned=[f"{m}/{s}/{p}/{md}" for m, s, p, md in cells], cells={}, rounds_per_cell=args.rounds,
                  live_method="allocator", held_over="all steps")
    run_cells(report, [(f"{m}/{s}/{p}/{md}", functools.partial(round_cell, m, s, p, md, args, report))
                       for m, s, p, md in runs],
              args.out_dir, args.name, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
