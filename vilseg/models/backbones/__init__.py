"""Backbones registered in mmseg's MODELS registry."""
from .vil import VIL_ARCHS, ViL, vil_b, vil_s, vil_t

__all__ = ["ViL", "VIL_ARCHS", "vil_t", "vil_s", "vil_b"]
