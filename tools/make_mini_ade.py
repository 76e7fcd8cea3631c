#!/usr/bin/env python
"""Generate the mini ADE20K-format dataset (synthetic scenes, fixed seed) used by the CPU demo and the tests.

    python tools/make_mini_ade.py                      # -> data/mini_ade/ADEChallengeData2016 (48 train / 12 val)
    python tools/make_mini_ade.py --out /tmp/ade --num-train 200 --seed 7 --overwrite

Layout: images/{training,validation}/*.jpg, annotations/{training,validation}/*.png; labels 0 = other,
1..150 = ADE20K classes (8 of them used). See vilseg/apis/mini_ade.py.
"""
from __future__ import annotations

import argparse
import sys

from vilseg.apis.demo import MINI_ROOT
from vilseg.apis.mini_ade import MINI_ADE_CLASSES, MiniADESpec, generate_mini_ade

DEFAULT_OUT = str(MINI_ROOT)


def main(argv=None) -> int:
    d = MiniADESpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output ADEChallengeData2016 folder (default: {DEFAULT_OUT} under the working directory)")
    parser.add_argument("--num-train", type=int, default=d.num_train, help=f"training images ({d.num_train})")
    parser.add_argument("--num-val", type=int, default=d.num_val, help=f"validation images ({d.num_val})")
    parser.add_argument("--height", type=int, default=d.height, help=f"image height ({d.height})")
    parser.add_argument("--width", type=int, default=d.width, help=f"image width ({d.width})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed ({d.seed})")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    out = args.out
    spec = MiniADESpec(num_train=args.num_train, num_val=args.num_val, height=args.height, width=args.width,
                       seed=args.seed)
    stats = generate_mini_ade(out, spec, overwrite=args.overwrite)
    total = sum(v for k, v in stats.items() if k.startswith("pixels_"))
    print(f"mini ADE20K in {out}: {stats['written']} scenes written, {stats['kept']} kept")
    print(f"{'label':>5}  {'class':<16} {'pixels':>8}")
    for key in sorted((k for k in stats if k.startswith("pixels_")), key=lambda k: int(k.split('_')[1])):
        value = int(key.split("_")[1])
        name = MINI_ADE_CLASSES.get(value, "other (ignored)")
        print(f"{value:>5}  {name:<16} {100.0 * stats[key] / total:6.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
