"""vilseg models. Importing this package registers every vilseg model in mmseg's (and mmengine's) registries."""
from . import optim  # noqa: F401  (ViLLayerDecayOptimizerConstructor)
from .backbones import ViL, vil_b, vil_s, vil_t
from .backbones.lambda_resnet import LambdaLayer, LambdaResNet
from .backbones.sequencer import Sequencer2D
from .decode_heads import ChunkedLossFCNHead, ChunkedLossFPNHead, ChunkedLossUPerHead
from .medical import ViLUNETR

__all__ = ["ViL", "vil_t", "vil_s", "vil_b", "Sequencer2D", "LambdaLayer", "LambdaResNet", "ViLUNETR",
           "ChunkedLossUPerHead", "ChunkedLossFCNHead", "ChunkedLossFPNHead"]
