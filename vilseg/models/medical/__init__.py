"""3D medical segmentation networks (registered in mmseg's MODELS, plain ``nn.Module`` for MONAI code)."""
from .vil_unetr import ViLUNETR, default_out_indices

__all__ = ["ViLUNETR", "default_out_indices"]
