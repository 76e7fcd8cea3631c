"""vilseg models. Importing this package registers vilseg's 2D models in mmseg's (and mmengine's) registries.

The 3D networks live in :mod:`vilseg.models.medical` (imported by the medical configs and tools): keeping them out
of this package keeps MONAI out of 2D work.
"""
from . import optim  # noqa: F401  (ViLLayerDecayOptimizerConstructor)
from .backbones import ViL, vil_b, vil_s, vil_t
from .backbones.lambda_resnet import LambdaLayer, LambdaResNet
from .backbones.sequencer import Sequencer2D
from .decode_heads import ChunkedLossFCNHead, ChunkedLossFPNHead, ChunkedLossUPerHead

__all__ = ["ViL", "vil_t", "vil_s", "vil_b", "Sequencer2D", "LambdaLayer", "LambdaResNet",
           "ChunkedLossUPerHead", "ChunkedLossFCNHead", "ChunkedLossFPNHead"]
