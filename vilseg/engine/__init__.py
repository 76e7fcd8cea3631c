"""The mmengine / mmseg glue: checkpoint safety, hooks, the layer-decay optimizer constructor, the AMP wrapper,
the console runner, the checked ADE20K dataset and ``ColorJitter``, and a scope-independent model builder.

Importing this package registers those classes in mmseg's and mmengine's registries and changes nothing else;
mmengine's checkpoint loading is switched to the safe loader by :class:`SafeCheckpointHook` (added by
``configs/_base_/vilseg_runtime.py``) or by calling :func:`vilseg.engine.checkpoint.install`.
"""
from .checkpoint import install as install_safe_checkpoints
from .datasets import (CheckedADE20KDataset, DatasetValidationError, InvalidDataError, MissingDataError,
                       check_annotation_file, check_image_file, check_sample, read_image_size)
from .hooks import (PlainMessageHubHook, RandomStateHook, SafeCheckpointHook, history_buffers_from_plain,
                    history_buffers_to_plain)
from .layer_decay import ViLLayerDecayOptimizerConstructor, get_layer_id_for_vil
from .optim_wrapper import AmpOnCudaOptimWrapper, amp_dtype
from .registry import build_model, mmseg_scope
from .runner import ConsoleRunner
from .transforms import ColorJitter

__all__ = ["install_safe_checkpoints", "SafeCheckpointHook", "PlainMessageHubHook", "RandomStateHook",
           "history_buffers_to_plain", "history_buffers_from_plain", "ViLLayerDecayOptimizerConstructor",
           "get_layer_id_for_vil", "AmpOnCudaOptimWrapper", "amp_dtype", "build_model", "mmseg_scope",
           "ConsoleRunner", "ColorJitter", "CheckedADE20KDataset", "DatasetValidationError", "InvalidDataError",
           "MissingDataError", "check_annotation_file", "check_image_file", "check_sample", "read_image_size"]
