"""Checkpoints of the medical training loop: plain data only, written atomically, loaded weights-only.

A checkpoint is ``{'state_dict', 'optimizer', 'meta'}``; ``meta`` holds the iteration, the best validation
Dice, the history and the full config as a plain dict, so a checkpoint alone can rebuild its
network (``tools/medical_infer.py`` uses that). Saving goes through :func:`vilseg.utils.checkpoint.atomic_write`
(temporary file in the same folder, fsync, ``os.replace``): an interrupted save never truncates a checkpoint.
Loading uses :func:`vilseg.utils.checkpoint.safe_load` (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from vilseg.utils.checkpoint import atomic_write, safe_load

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: Union[str, Path], state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` into memory, then an atomic write to ``path``."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write(buffer.getvalue(), path)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint weights-only. Raises FileNotFoundError / ValueError / UnsafeCheckpointError (named file)."""
    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt

