"""vilseg models. Importing this package registers every vilseg model in mmseg's (and mmengine's) registries."""
from . import backbones  # noqa: F401  (ViL)
from .backbones import ViL, vil_b, vil_s, vil_t

__all__ = ["ViL", "vil_t", "vil_s", "vil_b"]
