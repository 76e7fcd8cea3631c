#!/usr/bin/env python
"""Build the labelled MNI152 gray/white-matter case from the template bundled with nilearn (no download).

    python tools/make_mni152_case.py                 # -> data/mni152 at 2 mm
    python tools/make_mni152_case.py --spacing 3 --out /tmp/mni152_3mm

Labels: 1 gray matter, 2 white matter (the more likely tissue where its probability > --threshold), 0 else.
Split: coronal plane, posterior part = training, anterior part = held out. See vilseg/medical/mni152.py.
"""
from __future__ import annotations

import argparse
import sys

from vilseg.medical.mni152 import build_mni152_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/mni152", help="output folder (default: data/mni152)")
    parser.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm (default 2)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a tissue is labelled where its probability exceeds this and the other's (default 0.5)")
    parser.add_argument("--margin", type=int, default=2, help="voxels kept around the brain bounding box")
    args = parser.parse_args(argv)
    summary = build_mni152_cases(args.out, spacing=args.spacing, threshold=args.threshold, margin_vox=args.margin)
    print(f"template left-right asymmetry (mean |v - mirror(v)|): {summary['asymmetry']:.3g} "
          "-> split by a coronal plane, not by hemisphere")
    print(f"split plane: world y = {summary['split_plane_y_mm']:.1f} mm")
    for part in ("posterior", "anterior"):
        info = summary[part]
        role = "training" if part == "posterior" else "held out"
        print(f"{part:9s} ({role}): shape {info['shape']}, voxels {info['voxels']}\n    {info['image']}\n"
              f"    {info['label']}")
    print(f"wrote {summary['dataset_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
