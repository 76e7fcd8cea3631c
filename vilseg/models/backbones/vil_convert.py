"""Conversion of the public ViL v2 (``VisionLSTM2``) checkpoints to vilseg's ``ViL`` layout, and pretrained loading.

Public layouts handled (learned from the NX-AI/vision-lstm repository; nothing copied):
* hub layout: ``blocks.{j}.rowwise_from_top_left.*`` / ``blocks.{j}.rowwise_from_bot_right.*``,
  ``pos_embed.embed`` (1, 14, 14, D), ``norm.*`` (final norm), ``legacy_norm.*`` and ``head.*`` (classifier);
* raw training layout: ``blocks.{2j}`` / ``blocks.{2j+1}``, ``.xlstm.`` for ``.layer.``, ``.xlstm_norm.`` for
  ``.norm.``, ``.conv1d.`` for ``.conv.``, ``post_blocks_norm`` for ``norm`` and ``head.0``/``head.1``.
Both store LayerNorm weights as residuals (effective weight = 1 + stored weight); vilseg uses plain LayerNorms, so
those weights get +1. The classifier (``head``, ``legacy_norm``) is dropped; the position embedding is resized to
the model's grid.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from vilseg.models.layers import resize_pos_embed

__all__ = ["is_official_vil", "convert_official_vil", "to_official_vil", "load_vil_pretrained"]

# parameters stored as residual weights in the public code (xLSTM-style LayerNorm / MultiHeadLayerNorm)
_RESIDUAL_WEIGHT = re.compile(r"(^norm\.weight$|\.norm\.weight$|\.outnorm\.weight$)")


def is_official_vil(state_dict: Dict[str, Tensor]) -> bool:
    """True for a state dict in one of the public ViL layouts (not vilseg's)."""
    return "pos_embed.embed" in state_dict or "post_blocks_norm.weight" in state_dict or any(
        ".xlstm." in k for k in state_dict)


def _raw_to_hub(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        key = key.replace(".xlstm_norm.", ".norm.").replace(".xlstm.", ".layer.").replace(".conv1d.", ".conv.")
        if key.startswith("xlstm."):
            key = key[len("xlstm."):]
        m = re.match(r"blocks\.(\d+)\.(?!rowwise_)(.*)", key)
        if m:
            i = int(m.group(1))
            direction = "rowwise_from_top_left" if i % 2 == 0 else "rowwise_from_bot_right"
            key = f"blocks.{i // 2}.{direction}.{m.group(2)}"
        key = key.replace("post_blocks_norm.", "norm.").replace("head.0.", "legacy_norm.").replace("head.1.", "head.")
        out[key] = value
    return out


def convert_official_vil(state_dict: Dict[str, Tensor], grid_size: Optional[Tuple[int, ...]] = None,
                         keep_final_norm: bool = True) -> Dict[str, Tensor]:
    """Map a public ViL v2 state dict (hub or raw layout) to vilseg ``ViL`` keys.

    Args:
        grid_size: resize the position embedding to this patch grid (None keeps its size).
        keep_final_norm: keep ``norm.*`` (for ``ViL(final_norm=True)``).
    """
    sd = _raw_to_hub(state_dict) if ("post_blocks_norm.weight" in state_dict or
                                     any(".xlstm." in k for k in state_dict)) else dict(state_dict)
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("head.", "legacy_norm.")):
            continue
        if key.startswith("norm.") and not keep_final_norm:
            continue
        if key == "pos_embed.embed":
            key = "pos_embed"
            if grid_size is not None:
                value = resize_pos_embed(value, grid_size)
        # SequenceConv2d is a Conv2d subclass (".conv.weight"); vilseg's GridConv wraps one (".conv.conv.weight")
        key = re.sub(r"\.layer\.conv\.(weight|bias)$", r".layer.conv.conv.\1", key)
        if _RESIDUAL_WEIGHT.search(key):
            value = value + 1.0
        out[key] = value
    return out


def load_vil_pretrained(model, checkpoint: str, prefix: Optional[str] = None, map_location: str = "cpu",
                        allow_partial: bool = False) -> Tuple[List[str], List[str]]:
    """Load a vilseg, mmseg-segmentor (``backbone.`` prefix) or public ViL checkpoint into ``model`` (a ``ViL``).

    The checkpoint is read weights-only with vilseg's allowlist. The layouts are known, so after conversion every
    tensor must fit: a checkpoint of another architecture raises ``CheckpointMismatchError`` naming both, unless
    ``allow_partial`` (then the tensors that fit are loaded). Returns (missing keys, unexpected keys).
    """
    from vilseg.utils.checkpoint import safe_load, state_dict_from

    if "://" in str(checkpoint):  # remote: mmengine's scheme loaders (torch loads weights-only by default)
        from mmengine.runner.checkpoint import CheckpointLoader

        loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
    else:
        loaded = safe_load(checkpoint, map_location=map_location)
    sd = state_dict_from(loaded)
    if prefix is None and any(k.startswith("backbone.") for k in sd):
        prefix = "backbone."
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    grid = tuple(model.pos_embed.shape[1:-1])
    if is_official_vil(sd):
        sd = convert_official_vil(sd, grid_size=grid, keep_final_norm=model.norm is not None)
    elif "pos_embed" in sd:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid)
    from vilseg.utils.checkpoint import check_fits

    fitting, _ = check_fits(model, sd, checkpoint, f"the ViL backbone ({model.embed_dims} dims, "
                            f"{model.num_blocks} sub-blocks)", allow_partial=allow_partial,
                            allow_flag="allow_partial=True in init_cfg")
    result = model.load_state_dict(fitting, strict=False)
    return list(result.missing_keys), [k for k in sd if k not in fitting]


def to_official_vil(state_dict: Dict[str, Tensor], raw: bool = False) -> Dict[str, Tensor]:
    """Inverse of :func:`convert_official_vil` for the backbone part: vilseg keys -> public hub (or raw) layout.

    Used to export vilseg backbones to the public code and to test the conversion round trip.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _RESIDUAL_WEIGHT.search(key):
            value = value - 1.0
        key = re.sub(r"\.layer\.conv\.conv\.(weight|bias)$", r".layer.conv.\1", key)
        if key == "pos_embed":
            key = "pos_embed.embed"
        if raw:
            m = re.match(r"blocks\.(\d+)\.(rowwise_from_top_left|rowwise_from_bot_right)\.(.*)", key)
            if m:
                i = 2 * int(m.group(1)) + (m.group(2) == "rowwise_from_bot_right")
                rest = m.group(3).replace("layer.conv.", "layer.conv1d.")
                rest = "xlstm_norm." + rest[5:] if rest.startswith("norm.") else rest.replace("layer.", "xlstm.", 1)
                key = f"blocks.{i}.{rest}"
            if key.startswith("norm."):
                key = "post_blocks_norm." + key[len("norm."):]
        out[key] = value
    return out
