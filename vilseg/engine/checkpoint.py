"""Make mmengine load checkpoints with vilseg's safe loader and save them atomically.

mmengine 0.10.7 calls ``torch.load`` without arguments, which torch >= 2.6 turns into weights-only loading without
the numpy globals that mmengine checkpoints hold. :func:`install` registers :func:`vilseg.utils.checkpoint.safe_load`
(weights-only with an allowlist) as mmengine's loader for local paths, and a local file backend whose ``put`` is
:func:`vilseg.utils.checkpoint.atomic_write`. Nothing changes at import: the runtime config switches it on through
:class:`vilseg.engine.SafeCheckpointHook` (before the runner loads or saves anything), and
:func:`vilseg.apis.build_runner` calls :func:`install` itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from vilseg.utils.checkpoint import atomic_write, safe_load

__all__ = ["install", "installed", "atomic_local_backend"]

_BACKEND = None


def _load_from_local_safe(filename: str, map_location=None):
    return safe_load(os.path.expanduser(filename), map_location=map_location)


def atomic_local_backend() -> type:
    """mmengine's ``LocalBackend`` with an atomic ``put`` (temporary file, fsync, ``os.replace``); one class per
    process, built on first use so that importing this module does not import mmengine's file I/O."""
    global _BACKEND
    if _BACKEND is None:
        from mmengine.fileio.backends import LocalBackend

        class AtomicLocalBackend(LocalBackend):
            """mmengine's local file backend whose ``put`` is atomic."""

            def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
                atomic_write(obj, filepath)

        _BACKEND = AtomicLocalBackend
    return _BACKEND


def installed() -> bool:
    """True once mmengine loads local checkpoints through vilseg's safe loader."""
    from mmengine.runner.checkpoint import CheckpointLoader

    return CheckpointLoader._schemes.get("") is _load_from_local_safe


def install() -> None:
    """Register the safe loader for local paths and the atomic local backend in mmengine (idempotent)."""
    if installed():
        return
    from mmengine.fileio import register_backend
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local_safe, force=True)
    register_backend("local", atomic_local_backend(), force=True, prefixes="")
