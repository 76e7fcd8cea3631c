"""Decode heads registered in mmseg's MODELS registry."""
from .chunked_loss import (ChunkedLossFCNHead, ChunkedLossFPNHead, ChunkedLossMixin, ChunkedLossUPerHead,
                           bilinear_rows)

__all__ = ["ChunkedLossMixin", "ChunkedLossUPerHead", "ChunkedLossFCNHead", "ChunkedLossFPNHead", "bilinear_rows"]
