"""Build vilseg / mmseg modules from config dicts, independent of whatever mmengine scope is current.

mmengine resolves ``MODELS.build(dict(type='ViL'))`` in the *current* ``DefaultScope``. A Runner created with
``default_scope='mmengine'`` (or any other library) leaves that scope behind in the process, after which mmseg's
registry looks in the wrong place and reports a misleading "ViL is not in the mmengine::model registry". Library
code therefore builds under an explicit ``mmseg`` scope and restores the previous one afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from torch import nn


@contextlib.contextmanager
def mmseg_scope() -> Iterator[None]:
    """Make ``mmseg`` the current mmengine default scope inside the block (restored afterwards), with mmseg's and
    vilseg's modules registered."""
    from mmengine.registry import DefaultScope
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    import vilseg.models  # noqa: F401  (registers ViL, Sequencer2D, LambdaResNet, ...)

    with DefaultScope.overwrite_default_scope("mmseg"):
        yield


@contextlib.contextmanager
def quiet_mmengine() -> Iterator[None]:
    """Raise mmengine's logger to WARNING inside the block (``init_weights`` logs one INFO record per parameter)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(cfg: Any, init_weights: bool = False) -> nn.Module:
    """``mmseg.registry.MODELS.build(cfg)`` under the ``mmseg`` scope (see the module docstring); with
    ``init_weights``, also run the model's own ``init_weights()``, both with mmengine's INFO logging quieted."""
    from mmseg.registry import MODELS

    with mmseg_scope(), (quiet_mmengine() if init_weights else contextlib.nullcontext()):
        model = MODELS.build(cfg)
        if init_weights and hasattr(model, "init_weights"):
            model.init_weights()
    return model
