"""Backbones registered in mmseg's MODELS registry."""
from .vil import VIL_ARCHS, ViL, vil_b, vil_s, vil_t
from .vit_sdpa import SDPAMultiheadAttention, VisionTransformerSDPA

__all__ = ["VisionTransformerSDPA", "SDPAMultiheadAttention", "ViL", "VIL_ARCHS", "vil_t", "vil_s", "vil_b"]
