"""mmseg decode heads whose loss never holds the full-resolution logits: same objective, a fraction of the memory.

mmseg's ``BaseDecodeHead.loss_by_feat`` upsamples the logits to the label's size and then applies the loss. Those
full-resolution logits (batch x classes x H x W) and cross-entropy's log-softmax of them, kept for backward, grow
with the crop and the class count, per head and whatever the backbone (figures: README, memory section). Written for vilseg because neither mmseg nor mmcv computes the upsampled loss in pieces.

``ChunkedLossMixin.loss_by_feat`` computes exactly the same loss and accuracy band by band: each band of label rows
upsamples only the logits it needs (bilinear, mmseg's ``resize`` arithmetic), applies cross-entropy and returns the
band's summed loss; in training each band runs under activation checkpointing, so backward recomputes one band at
a time and only the low-resolution logits stay alive. Registered heads: ``ChunkedLossUPerHead``,
``ChunkedLossFCNHead`` and ``ChunkedLossFPNHead`` (mmseg's ``UPerHead`` / ``FCNHead`` / ``FPNHead`` with this loss).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmseg.models.decode_heads import FCNHead, FPNHead, UPerHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["bilinear_rows", "ChunkedLossMixin", "ChunkedLossUPerHead", "ChunkedLossFCNHead", "ChunkedLossFPNHead"]

_EPS = torch.finfo(torch.float32).eps  # mmseg's weight_reduce_loss / accuracy epsilon


def _source_index(out_size: int, in_size: int, align_corners: bool, dst: Tensor,
                  dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Bilinear source indices and weights for destination coordinates ``dst`` (torch's upsample arithmetic, in
    ``dtype``: float32 for float32 / half inputs, as torch's accumulation type)."""
    dst = dst.to(dtype)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    w1 = src - i0.to(dtype)
    return i0, i1, w1


def bilinear_rows(x: Tensor, size: Sequence[int], row_start: int, row_end: int,
                  align_corners: bool = False) -> Tensor:
    """Rows ``row_start:row_end`` of ``F.interpolate(x, size, mode='bilinear', align_corners=align_corners)``.

    Args:
        x: (B, C, h, w) feature map.
        size: full output size (H, W).
        row_start, row_end: the output rows to compute (0 <= row_start < row_end <= H).

    Returns:
        (B, C, row_end - row_start, W). The rows are interpolated first, at the input's width (cheap), from the at
        most row_end - row_start + 1 input rows they need; the width then goes through ``F.interpolate`` itself
        (its row axis is an identity there), so the band equals the full resize up to float rounding.
    """
    H, W = int(size[0]), int(size[1])
    h = x.shape[-2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = torch.arange(row_start, row_end, device=x.device)
    r0, r1, wr = _source_index(H, h, align_corners, rows, acc)
    x = torch.lerp(x.index_select(2, r0), x.index_select(2, r1), wr.to(x.dtype)[:, None])  # (B, C, rows, w)
    return F.interpolate(x, size=(row_end - row_start, W), mode="bilinear", align_corners=align_corners)


class ChunkedLossMixin:
    """Replaces ``BaseDecodeHead.loss_by_feat`` by a band-wise computation of the same cross-entropy and accuracy.

    Args (in addition to the head's own):
        loss_chunk_pixels: label pixels per image in one band (rows = max(1, loss_chunk_pixels // label width);
            default 2^17: 64 rows of a 2048-wide label). The loss then holds a few band-sized tensors
            (batch x classes x band pixels) at a time instead of a few full-resolution ones.

    Supported ``loss_decode``: mmseg ``CrossEntropyLoss`` (softmax, no mask; reduction 'mean' or 'sum'), alone or
    in a list; no pixel ``sampler`` (OHEM ranks all pixels' losses at once). Anything else raises a ValueError at
    construction that names the unsupported setting; use mmseg's head for those.
    """

    def __init__(self, *args, loss_chunk_pixels: int = 2**17, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if int(loss_chunk_pixels) < 1:
            raise ValueError(f"{name}: loss_chunk_pixels must be a positive int, got {loss_chunk_pixels!r}")
        self.loss_chunk_pixels = int(loss_chunk_pixels)
        if self.sampler is not None:
            raise ValueError(f"{name}: a pixel sampler ({type(self.sampler).__name__}) needs the full-resolution "
                             f"logits; use mmseg's head without 'Chunked' for sampler=...")
        for loss in self._losses():
            if type(loss) is not CrossEntropyLoss or loss.use_sigmoid or loss.use_mask:
                raise ValueError(f"{name}: loss_decode must be CrossEntropyLoss(use_sigmoid=False, use_mask=False) "
                                 f"(or a list of them), got {loss!r}")
            if loss.reduction not in ("mean", "sum"):
                raise ValueError(f"{name}: CrossEntropyLoss reduction must be 'mean' or 'sum', got "
                                 f"{loss.reduction!r}")

    def _losses(self) -> List[nn.Module]:
        return list(self.loss_decode) if isinstance(self.loss_decode, nn.ModuleList) else [self.loss_decode]

    def _band_sums(self, logits: Tensor, label: Tensor, row_start: int, row_end: int) -> Tuple[Tensor, Tensor]:
        """Per-loss summed (class-weighted) cross-entropy over one band, and its number of correct pixels."""
        band = bilinear_rows(logits, label.shape[-2:], row_start, row_end, self.align_corners)
        target = label[:, row_start:row_end]
        sums = []
        for loss in self._losses():
            weight = None if loss.class_weight is None else band.new_tensor(loss.class_weight)
            sums.append(F.cross_entropy(band, target, weight=weight, reduction="none",
                                        ignore_index=self.ignore_index).sum())
        with torch.no_grad():
            correct = ((band.argmax(dim=1) == target) & (target != self.ignore_index)).sum()
        return torch.stack(sums), correct

    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples) -> dict:
        """Same keys and values as ``BaseDecodeHead.loss_by_feat`` (cross-entropy losses and ``acc_seg``)."""
        label = self._stack_batch_gt(batch_data_samples).squeeze(1)  # (B, H, W)
        H, W = label.shape[-2:]
        rows = max(1, self.loss_chunk_pixels // W)
        use_cp = torch.is_grad_enabled() and seg_logits.requires_grad
        total, correct = None, None
        for start in range(0, H, rows):
            end = min(H, start + rows)
            if use_cp:
                sums, right = checkpoint(self._band_sums, seg_logits, label, start, end, use_reentrant=False)
            else:
                sums, right = self._band_sums(seg_logits, label, start, end)
            total = sums if total is None else total + sums
            correct = right if correct is None else correct + right

        valid = label != self.ignore_index
        losses: dict = {}
        for i, loss in enumerate(self._losses()):
            value = total[i]
            if loss.reduction == "mean":
                if loss.class_weight is not None:  # mmseg averages by the summed class weights of the labels
                    denom = seg_logits.new_tensor(loss.class_weight)[label[valid]].sum()
                elif loss.avg_non_ignore:
                    denom = valid.sum().to(seg_logits.dtype)
                else:
                    denom = label.numel()
                value = value / (denom + _EPS)
            value = loss.loss_weight * value
            losses[loss.loss_name] = losses[loss.loss_name] + value if loss.loss_name in losses else value
        n_valid = valid.sum()
        losses["acc_seg"] = ((correct.float() + _EPS) * (100.0 / (n_valid.float() + _EPS))).reshape(1)
        return losses


@MODELS.register_module()
class ChunkedLossUPerHead(ChunkedLossMixin, UPerHead):
    """mmseg ``UPerHead`` whose loss is computed in bands of label rows (see :class:`ChunkedLossMixin`)."""


@MODELS.register_module()
class ChunkedLossFCNHead(ChunkedLossMixin, FCNHead):
    """mmseg ``FCNHead`` whose loss is computed in bands of label rows (see :class:`ChunkedLossMixin`)."""


@MODELS.register_module()
class ChunkedLossFPNHead(ChunkedLossMixin, FPNHead):
    """mmseg ``FPNHead`` whose loss is computed in bands of label rows (see :class:`ChunkedLossMixin`)."""
