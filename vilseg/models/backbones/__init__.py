"""Backbones registered in mmseg's MODELS registry."""
from .vil import VIL_ARCHS, ViL
from .vit_sdpa import SDPAMultiheadAttention, VisionTransformerSDPA

__all__ = ["VisionTransformerSDPA", "SDPAMultiheadAttention", "ViL", "VIL_ARCHS"]
