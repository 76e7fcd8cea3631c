"""A ViT baseline that mmseg does not ship as such: DeiT with memory-efficient attention.

``SDPAMultiheadAttention``: mmcv's ``MultiheadAttention`` (what mmseg's ``VisionTransformer`` uses)
calls ``torch.nn.MultiheadAttention`` with ``need_weights=True`` (its default), so every layer
materialises the (heads, S, S) attention matrix and keeps it for the backward pass: O(S^2)
memory. With ``need_weights=False`` PyTorch routes the same computation through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels, on CPU
too), which is O(S) in memory. This subclass only changes that flag; weights, parameter names
and results are those of mmcv's layer.

``VisionTransformerSDPA``: mmseg's ``VisionTransformer`` whose encoder layers use the layer above
(registered in mmseg's ``MODELS``; accepts every ``VisionTransformer`` argument). It is the fair
baseline (``configs/baselines/deit_t_sdpa_upernet_ade20k.py``) for "a ViT with memory-efficient attention".
"""

from __future__ import annotations

from typing import Any, Optional

from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS
from torch import Tensor

__all__ = ["SDPAMultiheadAttention", "VisionTransformerSDPA", "use_sdpa_attention"]


@MODELS.register_module()
class SDPAMultiheadAttention(MultiheadAttention):
    """mmcv ``MultiheadAttention`` that never returns attention weights, so PyTorch computes it with
    ``scaled_dot_product_attention``. Shapes as mmcv's: query (B, N, C) when ``batch_first``."""

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                key_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self.attn(query=query, key=key, value=value, attn_mask=attn_mask,
                        key_padding_mask=key_padding_mask, need_weights=False)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


def use_sdpa_attention(module: Any) -> int:
    """Switch, in place, every mmcv ``MultiheadAttention`` inside ``module`` to
    :class:`SDPAMultiheadAttention` (same parameters). Returns how many were switched."""
    n = 0
    for m in module.modules():
        if type(m) is MultiheadAttention:
            m.__class__ = SDPAMultiheadAttention
            n += 1
    return n


@MODELS.register_module()
class VisionTransformerSDPA(VisionTransformer):
    """mmseg ``VisionTransformer`` with :class:`SDPAMultiheadAttention` in every encoder layer.
    Arguments, parameters, outputs: exactly those of ``VisionTransformer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_sdpa_attention(self)
