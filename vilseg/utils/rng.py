"""The random-number states of a process (Python, NumPy, torch CPU and CUDA) as plain data, and back.

A resumed run continues bit-identically only if it continues from the same random states as the run that wrote
the checkpoint (dropout, drop-path and the data augmentations draw from them). The state is stored as ints, lists
and uint8 tensors, so a checkpoint holding it still loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> Dict[str, Any]:
    """This process's random states: {'python', 'numpy', 'torch', 'cuda'} (cuda: [] without CUDA)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [int(version), [int(x) for x in internal], gauss],
            "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos),
                      int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().clone(), "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only where this process has as many devices)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])
