"""Optimizer-wrapper constructors registered in mmseg's ``OPTIM_WRAPPER_CONSTRUCTORS``."""
from .layer_decay import ViLLayerDecayOptimizerConstructor, get_layer_id_for_vil

__all__ = ["ViLLayerDecayOptimizerConstructor", "get_layer_id_for_vil"]
