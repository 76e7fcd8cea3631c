"""Convert a public ViL v2 (VisionLSTM2) checkpoint into a vilseg ViL backbone checkpoint.

    python tools/convert_official_vil.py vil2_tiny16_e800_in1k.th pretrained/vil_t_in1k.pth --img-size 512

The input may be in the hub layout or the raw training layout of NX-AI/vision-lstm; the classifier is dropped and
the position embedding resized to --img-size / 16. The input is read weights-only (no code runs from it); the output
is written atomically. `init_cfg=dict(type='Pretrained', checkpoint=...)` also accepts the public file directly.
"""
import argparse
import io
import sys

import torch

from vilseg.models.backbones.vil_convert import convert_official_vil, is_official_vil
from vilseg.utils.checkpoint import UnsafeCheckpointError, atomic_write, safe_load, state_dict_from


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="public ViL checkpoint (.th/.pth)")
    p.add_argument("dst", help="output path for the vilseg checkpoint")
    p.add_argument("--img-size", type=int, default=None, help="resize the position embedding to this input size")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--no-final-norm", action="store_true", help="drop the final norm (ViL(final_norm=False))")
    p.add_argument("--debug", action="store_true", help="show the full traceback instead of the one-line error")
    args = p.parse_args(argv)
    try:
        sd = state_dict_from(safe_load(args.src))
    except (UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not is_official_vil(sd):
        p.error(f"{args.src} does not look like a public ViL checkpoint (no 'pos_embed.embed', "
                f"'post_blocks_norm.weight' or '.xlstm.' keys)")
    grid = None if args.img_size is None else (-(-args.img_size // args.patch_size),) * 2
    out = convert_official_vil(sd, grid_size=grid, keep_final_norm=not args.no_final_norm)
    buf = io.BytesIO()
    torch.save({"state_dict": out, "meta": {"converted_from": str(args.src)}}, buf)
    atomic_write(buf.getvalue(), args.dst)
    n_pairs = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
    print(f"wrote {args.dst}: {len(out)} tensors, {n_pairs} block pairs, pos_embed {tuple(out['pos_embed'].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
