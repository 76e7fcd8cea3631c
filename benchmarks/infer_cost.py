"""What native-resolution inference and the window blending cost: ``tools/infer.py``'s path
(:func:`vilseg.apis.init_segmentor` + :func:`vilseg.apis.inference.predict_labels`) on the shipped config, for
photos of several sizes, with the config's test resize (ADE20K: short side 512) and at native resolution, windows
blended with Gaussian weights (the default) or mmseg's equal weights.

Writes ``--out-dir``/infer_cost.md (with the machine, versions and command line). Weights are random: the time of a
forward pass does not depend on them. One process, the model built once per setting, one warm-up image.

    python benchmarks/infer_cost.py --out-dir work_dirs/bench            # about 4 min on 2 CPU cores
    python benchmarks/infer_cost.py --out-dir benchmarks/results         # refresh the tracked table
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZES = ("640x427", "1280x853", "2560x1707")  # width x height: a 3:2 photo at three resolutions


def photo(width: int, height: int) -> np.ndarray:
    """A smooth random BGR image (upsampled noise), deterministic."""
    import cv2

    rng = np.random.default_rng(0)
    small = (rng.random((max(2, height // 16), max(2, width // 16), 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vil_upernet_ade20k.py")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help="WIDTHxHEIGHT (default %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed images per cell (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="work_dirs/bench", help="where infer_cost.md goes (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vilseg.utils.console import filter_known_warnings

    filter_known_warnings()

    from tqdm import tqdm

    from vilseg.apis import init_segmentor
    from vilseg.apis.inference import predict_labels
    from vilseg.utils.env import describe_machine, library_versions

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    settings = [(native, blend) for native in (False, True) for blend in ("gaussian", "mean")]
    rows = []
    bar = tqdm(total=len(settings) * len(sizes), desc="infer cost", unit="cell")
    for native, blend in settings:
        torch.manual_seed(0)
        model = init_segmentor(args.config, None, native_resolution=native, blend=blend)
        windows = []
        encode = model.encode_decode
        model.encode_decode = lambda x, metas, _e=encode: (windows.append(tuple(x.shape[-2:])), _e(x, metas))[1]
        predict_labels(model, photo(320, 240))  # warm-up
        for w, h in sizes:
            image = photo(w, h)
            times = []
            for _ in range(args.repeats):
                windows.clear()
                start = time.perf_counter()
                with torch.no_grad():
                    predict_labels(model, image)
                times.append(time.perf_counter() - start)
            rows.append(dict(size=f"{w}x{h}", native=native, blend=blend, windows=len(windows),
                             window=f"{windows[0][1]}x{windows[0][0]}", seconds=float(np.median(times))))
            bar.update()
    bar.close()

    base = {r["size"]: r["seconds"] for r in rows if not r["native"] and r["blend"] == "gaussian"}
    versions = ", ".join(f"{k} {v}" for k, v in library_versions(("torch", "mmseg")).items())
    lines = [
        "# Inference cost: test resize vs native resolution, Gaussian vs equal-weight window blending", "",
        f"Machine: {describe_machine()}; {versions}; {args.threads} threads.  ",
        f"Command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}`  ",
        f"Config: `{args.config}` (random weights), `tools/infer.py`'s path, one image at a time, median of "
        f"{args.repeats}.", "",
        "| photo | resolution | blend | windows (size) | s / image | vs resized, Gaussian |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {'native' if r['native'] else 'test resize'} | {r['blend']} | "
                     f"{r['windows']} ({r['window']}) | {r['seconds']:.2f} | {r['seconds'] / base[r['size']]:.2f}x |")
    lines += ["", "The cost of native resolution is the number of windows: each is one forward pass of the crop; "
              "the blending itself adds a weighted sum per window."]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out / 'infer_cost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
