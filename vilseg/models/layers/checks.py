"""Input checks shared by the backbones: one readable error instead of a shape error deep inside a layer."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

__all__ = ["check_input"]


def check_input(x: Any, spatial_dims: int, in_channels: Optional[int], name: str) -> None:
    """Refuse an input ``name`` cannot read: not a tensor, not (B, C, *spatial) with ``spatial_dims`` spatial axes,
    not ``in_channels`` channels (None: any), or an empty dimension.

    Raises:
        ValueError: naming ``name``, the layout it expects and the shape it got.
    """
    axes = {2: "H, W", 3: "D, H, W"}.get(spatial_dims) or ", ".join(f"S{i}" for i in range(spatial_dims))
    layout = f"(B, C, {axes})"
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} expects a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"{name} expects a {spatial_dims + 2}-D input {layout}, got shape {tuple(x.shape)}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channel{'s' if in_channels != 1 else ''} "
                         f"(B, {in_channels}, {axes}), got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} got an empty input of shape {tuple(x.shape)}; every dimension must be > 0")
