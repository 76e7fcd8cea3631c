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
from torch import nn

from vilseg.utils.checkpoint import atomic_write, safe_load

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_weights"]


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


def load_model_weights(model: nn.Module, path: Union[str, Path], strict: bool = True) -> Dict[str, Any]:
    """Load the network weights of a vilseg medical checkpoint (or a bare state dict) into ``model``.

    Returns the checkpoint's ``meta`` dict ({} for a bare state dict). Raises ValueError naming the file when the
    weights do not fit the model.
    """
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} has no tensor state dict under 'state_dict'")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: {err}") from None
    return dict(ckpt.get("meta", {}))
