#!/usr/bin/env python
"""Segment NIfTI volumes (a file or a folder) with a trained 3D network; outputs lie in each input's own grid.

    python tools/medical_infer.py work_dirs/vil_unetr_mni152/latest.pth data/mni152/imagesTs -o outputs/seg \\
        --label data/mni152/labelsTs
    python tools/medical_infer.py CKPT scan.nii.gz -o scan_seg.nii.gz --roi-size 96 96 96 --overlap 0.5 \\
        --sw-batch-size 4 --device cpu --sw-device cuda     # volume on the CPU, windows on the GPU

The network and pipeline (spacing, orientation, intensity) come from the config stored in the checkpoint, or from
--config. Each output has exactly the input's shape and affine (header copied). A bad input (missing, empty, not
NIfTI, 2-D, 4-D, NaN/Inf voxels) gives one error line naming the file; the other files still run, and the exit
code is 1 if any file failed.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint written by tools/train_medical.py (or a state dict)")
    parser.add_argument("input", help="a NIfTI file or a folder of them")
    parser.add_argument("-o", "--output", default="outputs/medical_infer",
                        help="output folder, or an output .nii/.nii.gz path for a single input")
    parser.add_argument("--config", help="config file (default: the config stored in the checkpoint)")
    parser.add_argument("--label", help="ground truth: a label file (single input) or a folder with the inputs' "
                                        "file names; prints per-class Dice")
    parser.add_argument("--pattern", default="*", help="glob for files of an input folder (default: all files)")
    parser.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window size")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: config, else 0.25)")
    parser.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    parser.add_argument("--mode", choices=("gaussian", "constant"), help="window blending (default gaussian)")
    parser.add_argument("--device", default="cpu", help="device of the whole volume and the blended output")
    parser.add_argument("--sw-device", help="device the windows run on (default: --device), e.g. cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    args = parser.parse_args(argv)

    from vilseg.medical.inference import NiftiSegmenter, segment_files
    from vilseg.medical.train import print_summary
    from vilseg.utils.checkpoint import UnsafeCheckpointError

    from vilseg.utils.env import resolve_device

    try:
        resolve_device(args.device, "--device")
        if args.sw_device:
            resolve_device(args.sw_device, "--sw-device")
        seg = NiftiSegmenter.from_checkpoint(
            args.checkpoint, args.config, roi_size=args.roi_size, overlap=args.overlap,
            sw_batch_size=args.sw_batch_size, mode=args.mode, device=args.device, sw_device=args.sw_device,
            progress=not args.no_progress)
        results = segment_files(seg, args.input, args.output, label=args.label, pattern=args.pattern,
                                progress=not args.no_progress)
    except (UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = seg.class_names[1:]
    rows = []
    for r in results:
        for note in r.notes:
            print(f"warning: {r.input}: {note}", file=sys.stderr)
        if r.ok:
            dice = " ".join(f"{n}={d:.4f}" for n, d in zip(names, r.dice)) if r.dice is not None else "-"
            rows.append([os.path.basename(r.input), "ok, warning" if r.notes else "ok", r.shape, dice, f"{r.seconds:.1f}", r.output])
        else:
            print(f"error: {r.error}", file=sys.stderr)
            rows.append([os.path.basename(r.input), "FAILED", "-", "-", f"{r.seconds:.1f}", r.error])
    print_summary("medical_infer", rows, ["input", "status", "shape", "Dice", "s", "output / error"])
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} segmented, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
