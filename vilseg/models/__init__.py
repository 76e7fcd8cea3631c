"""vilseg models. Importing this package registers vilseg's 2D models in mmseg's (and mmengine's) registries.

The 3D networks live in :mod:`vilseg.models.vil_unetr` (imported by the medical configs and tools): keeping them out
of this package keeps MONAI out of 2D work.
"""
from .backbones import ViL
from .backbones.lambda_resnet import LambdaLayer, LambdaResNet
from .backbones.sequencer import Sequencer2D
from .decode_heads import ChunkedLossFCNHead, ChunkedLossFPNHead, ChunkedLossUPerHead

__all__ = ["ViL", "Sequencer2D", "LambdaLayer", "LambdaResNet",
           "ChunkedLossUPerHead", "ChunkedLossFCNHead", "ChunkedLossFPNHead"]
