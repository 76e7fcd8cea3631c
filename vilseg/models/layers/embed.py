"""Patch embedding and position-embedding resizing for 2D images and 3D volumes (one implementation for both).

mmcv's ``PatchEmbed`` is 2D only; this N-d version lets the same ViL backbone embed volumes.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchEmbed", "resize_pos_embed", "to_ntuple"]


def to_ntuple(value: Union[int, Sequence[int]], n: int, name: str = "value") -> Tuple[int, ...]:
    """``7 -> (7,)*n``; a sequence must already have n entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value}")
    return value


class PatchEmbed(nn.Module):
    """Non-overlapping patches, one shared linear projection (a conv with kernel = stride = patch).

    Inputs whose size is not a multiple of the patch are zero-padded at the end of each axis (not rejected).
    forward(x: (B, C, *spatial)) -> tokens (B, *grid, embed_dims) with grid = ceil(spatial / patch), contiguous.
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: Union[int, Sequence[int]] = 16,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.patch_size = to_ntuple(patch_size, spatial_dims, "patch_size")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, embed_dims, kernel_size=self.patch_size, stride=self.patch_size)
        # xavier on the flattened kernel, as for a linear patch projection
        nn.init.xavier_uniform_(self.proj.weight.view(embed_dims, -1))
        nn.init.zeros_(self.proj.bias)

    def grid_size(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        return tuple(-(-s // p) for s, p in zip(spatial, self.patch_size))

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        pad = []
        for s, p in reversed(list(zip(spatial, self.patch_size))):
            pad += [0, (-s) % p]
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x)
        # contiguous token rows: a channels-first layout here would carry through every residual add of the
        # stream behind it (elementwise outputs follow their inputs' layout), and each block's LayerNorm would copy
        # its input in forward and backward
        return x.movedim(1, -1).contiguous()


def resize_pos_embed(pos_embed: Tensor, grid_size: Sequence[int]) -> Tensor:
    """Resize a (1, *grid0, D) position embedding to (1, *grid_size, D): bicubic in 2D, trilinear in 3D."""
    grid_size = tuple(int(g) for g in grid_size)
    if tuple(pos_embed.shape[1:-1]) == grid_size:
        return pos_embed
    mode = {2: "bicubic", 3: "trilinear"}[len(grid_size)]
    x = pos_embed.movedim(-1, 1)
    x = F.interpolate(x.float(), size=grid_size, mode=mode, align_corners=False).to(pos_embed.dtype)
    return x.movedim(1, -1)
