"""mmengine glue: safe checkpoint loading, atomic saves, a resume-safe message hub and saved random states.

Importing this package installs the safe loader and the atomic local backend (see :mod:`vilseg.utils.checkpoint`)
and registers :class:`PlainMessageHubHook`, :class:`RandomStateHook` and the ``AmpOnCudaOptimWrapper`` factory.
``configs/_base_/vilseg_runtime.py`` imports it and adds the hooks.
"""
from vilseg.utils.checkpoint import install as _install_checkpoint_safety

from .hooks import PlainMessageHubHook, RandomStateHook, history_buffers_from_plain, history_buffers_to_plain
from .optim_wrapper import AmpOnCudaOptimWrapper, amp_dtype
from .runner import ConsoleRunner

_install_checkpoint_safety()

__all__ = ["AmpOnCudaOptimWrapper", "amp_dtype", "ConsoleRunner", "PlainMessageHubHook", "RandomStateHook",
           "history_buffers_to_plain", "history_buffers_from_plain"]
