#!/usr/bin/env python
"""Segment an image, a folder of images or a folder of video frames; write colour-coded masks and overlays.

    python tools/infer.py CONFIG CHECKPOINT INPUT [--out-dir outputs/infer] [--opacity 0.5] [--save-labels]
    python tools/infer.py configs/demo/vil_upernet_ade20k_mini.py work_dirs/demo_ade/iter_300.pth \\
        data/mini_ade/ADEChallengeData2016/images/validation --out-dir outputs/mini

Writes OUT/masks/<name>.png (class colours) and OUT/overlays/<name>.png (mask over the image), each with a
colour key of the classes present (--no-legend: without it), and, with --save-labels, OUT/labels/<name>.png (class
indices). Images larger than the crop are segmented with overlapping sliding windows (the config's 'slide' test
mode) whose logits are blended with Gaussian weights, so no seam shows where a window ends (--blend mean: mmseg's
equal weights, as tools/test.py evaluates); --native-resolution skips the config's test resize. Images under
64 px a side or thinner than 1:8 are zero-padded for inference and the masks cropped back. A file that cannot be
read is named and skipped; the others are processed, and the exit code is 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import sys

from vilseg.utils.console import filter_known_warnings

filter_known_warnings()  # before mmengine's import, which already warns

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment images with a trained model",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="config file path")
    parser.add_argument("checkpoint", help="checkpoint file ('none' for random weights, e.g. to test a config)")
    parser.add_argument("input", help="an image, a folder of images, or a folder of video frames")
    parser.add_argument("--out-dir", default="outputs/infer", help="output folder (default outputs/infer)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--opacity", type=float, default=0.5, help="mask opacity in the overlays (0..1)")
    parser.add_argument("--save-labels", action="store_true", help="also write the class-index label maps")
    parser.add_argument("--native-resolution", action="store_true",
                        help="do not resize with the config's test pipeline; slide over the full image")
    parser.add_argument("--blend", choices=("gaussian", "mean"), default="gaussian",
                        help="how overlapping windows are combined: Gaussian weights falling off towards each "
                             "window's border (default; no seams) or mmseg's equal weights")
    parser.add_argument("--no-legend", action="store_true",
                        help="write masks and overlays without the colour key (as large as the input)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override settings of the config")
    parser.add_argument("--allow-partial", action="store_true",
                        help="load a checkpoint that does not fit the model exactly (only the tensors that fit; "
                             "what was left out is printed); without it such a checkpoint is an error")
    parser.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from vilseg.apis import USER_ERRORS, infer_images, init_segmentor
    from vilseg.utils.env import resolve_device

    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    try:
        device = str(resolve_device(args.device, "--device"))
        model = init_segmentor(args.config, checkpoint, device=device, cfg_options=args.cfg_options,
                               native_resolution=args.native_resolution, allow_partial=args.allow_partial,
                               blend=args.blend)
        records = infer_images(model, args.input, args.out_dir, opacity=args.opacity, save_labels=args.save_labels,
                               legend=not args.no_legend)
    except (*USER_ERRORS, ValueError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = model.dataset_meta["classes"]
    done = [r for r in records if "error" not in r]
    failed = [r for r in records if "error" in r]
    for rec in done:
        for note in rec["notes"]:
            print(f"warning: {rec['input']}: {note}", file=sys.stderr)
    totals = {}
    for rec in done:
        for c, n in rec["classes"].items():
            totals[int(c)] = totals.get(int(c), 0) + int(n)
    if done:
        pixels = sum(totals.values())
        seconds = np.array([r["seconds"] for r in done])
        print(f"\n{len(done)} image(s), {seconds.mean():.3f} s/image on {device} (median {np.median(seconds):.3f} s)")
        print(f"{'class':<24}{'pixels':>10}")
        for c, n in sorted(totals.items(), key=lambda kv: -kv[1])[:10]:
            print(f"{classes[c].strip():<24}{100.0 * n / pixels:9.2f}%")
        print(f"masks:    {os.path.abspath(os.path.join(args.out_dir, 'masks'))}")
        print(f"overlays: {os.path.abspath(os.path.join(args.out_dir, 'overlays'))}")
    if failed:
        print(f"\n{len(failed)} of {len(records)} file(s) failed:", file=sys.stderr)
        for rec in failed:
            print(f"  {rec['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
