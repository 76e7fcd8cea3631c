"""Safe checkpoint loading, atomic writing and checks that a checkpoint fits a model (torch only).

torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls ``torch.load`` without arguments,
so mmengine checkpoints no longer load. vilseg does NOT fall back to full unpickling (an untrusted checkpoint could
run code). Instead:

* checkpoints are loaded with ``weights_only=True`` plus a small explicit allowlist (``SAFE_GLOBALS``): the numpy
  array/dtype reconstruction globals that mmengine checkpoints contain, nothing that can call arbitrary code;
* anything else is refused with :class:`UnsafeCheckpointError`, naming the file and the global;
* the message hub, which mmengine pickles as ``HistoryBuffer`` objects with bound methods (loading those needs
  ``builtins.getattr``, a known weights-only escape), is written as plain data by
  :class:`vilseg.engine.PlainMessageHubHook` and rebuilt on load;
* local checkpoint files are written atomically (temporary file, fsync, ``os.replace``), so a kill during a save
  never leaves a truncated checkpoint behind.

:func:`vilseg.engine.checkpoint.install` makes mmengine use the loader and the atomic write.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "CheckpointMismatchError", "safe_load", "state_dict_from",
           "compare_state_dicts", "check_fits", "describe_model", "atomic_write"]


def _numpy_safe_globals() -> List[Any]:
    """numpy globals found in mmengine checkpoints (arrays and scalars in meta/optimizer/message-hub data)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core -> _core
    safe: List[Any] = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    # dtype classes of plain data only (no ObjectDType: object arrays unpickle arbitrary contents)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        safe += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return safe


def _codecs_encode():
    import _codecs

    return _codecs.encode  # used by numpy scalars' pickles; encodes a str to bytes, nothing more


SAFE_GLOBALS: List[Any] = _numpy_safe_globals() + [_codecs_encode()]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a global that is not on vilseg's allowlist; it was not loaded."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the model it is loaded into (missing, unexpected or reshaped tensors)."""


_GLOBAL_RE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class) ([\w.]+)")
# torch's wording when an allowed reconstructor meets a class outside the list (e.g. numpy's object dtype)
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")
_OPCODE_RE = re.compile(r"Unsupported operand (\d+)")


def safe_load(filename: Union[str, Path, Any], map_location: Optional[Union[str, Callable, torch.device]] = "cpu",
              extra_safe_globals: Optional[List[Any]] = None, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and vilseg's allowlist.

    ``mmap``: map the file's tensors instead of reading them (a path to a zip-format checkpoint; others are read
    as usual): what only looks at names and shapes then reads a few pages, not the whole file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or not a torch checkpoint (e.g. truncated).
        UnsafeCheckpointError: the checkpoint needs a global outside the allowlist (named in the message).
    """
    name = str(filename) if isinstance(filename, (str, Path)) else repr(filename)
    if isinstance(filename, (str, Path)):
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"checkpoint not found: {name}")
        if os.path.getsize(filename) == 0:
            raise ValueError(f"checkpoint {name} is empty (0 bytes); expected a file written by torch.save")
    allow = SAFE_GLOBALS + list(extra_safe_globals or [])
    try:
        with torch.serialization.safe_globals(allow):
            mapped = mmap and isinstance(filename, (str, Path)) and zipfile.is_zipfile(filename)
            return torch.load(filename, map_location=map_location, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        text = str(err)
        match = _GLOBAL_RE.search(text) or _BUILD_RE.search(text)
        opcode = _OPCODE_RE.search(text)
        if opcode and not match:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {name}: it is a plain pickle (pickle opcode {opcode.group(1)} is not "
                f"allowed in weights-only loading), not a file written by torch.save. Only load checkpoints you "
                f"trust.") from None
        what = match.group(1) if match else "an object outside the allowlist"
        if "getattr" in what or "HistoryBuffer" in what:
            hint = (" (mmengine pickles its message hub as HistoryBuffer objects with bound methods; checkpoints "
                    "written by vilseg's training tools store it as plain data instead)")
        else:
            hint = ""
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {name}: it needs the global '{what}', which is not on vilseg's "
            f"weights-only allowlist{hint}. Only load checkpoints you trust; to allow a specific harmless global, "
            f"pass it in extra_safe_globals.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err) and "zip" not in str(err):
            raise
        raise ValueError(f"checkpoint {name} is not a readable torch checkpoint (truncated or another format): "
                         f"{err}") from None


def state_dict_from(checkpoint: Any) -> Dict[str, Any]:
    """The weights in a loaded checkpoint: its ``state_dict`` (mmengine, vilseg), ``model`` (public ViL) or
    ``module`` entry, else the dict itself; a DataParallel ``module.`` prefix is dropped, as mmengine does."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a checkpoint dict of tensors, got {type(checkpoint).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def compare_state_dicts(expected: Dict[str, Any], given: Dict[str, Any]
                        ) -> Tuple[List[str], List[str], List[Tuple[str, tuple, tuple]]]:
    """(missing, unexpected, reshaped): keys of ``expected`` absent from ``given``, keys of ``given`` absent from
    ``expected``, and (key, given shape, expected shape) where both have a tensor of a different shape."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
                if k in given and hasattr(given[k], "shape") and hasattr(v, "shape")
                and tuple(given[k].shape) != tuple(v.shape)]
    return missing, unexpected, reshaped


def describe_model(model: torch.nn.Module) -> str:
    """'EncoderDecoder: ViL + UPerHead' for a segmentor (its backbone and decode head), else the class name; DDP
    and test-time-augmentation wrappers are looked through."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    parts = [type(getattr(model, k)).__name__ for k in ("backbone", "decode_head") if hasattr(model, k)]
    return f"{type(model).__name__}: {' + '.join(parts)}" if parts else type(model).__name__


def _some(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_fits(model: torch.nn.Module, checkpoint: Any, source: str, model_name: str,
               allow_partial: bool = False, allow_flag: str = "--allow-partial"
               ) -> Tuple[Dict[str, Any], Optional[str]]:
    """Check that a loaded checkpoint's weights fit ``model`` exactly.

    Every model tensor must be in the checkpoint with the model's shape and the checkpoint must hold nothing else.
    With ``allow_partial`` a mismatch is accepted.

    Returns:
        (state dict to load, None) when it fits; with ``allow_partial`` and a mismatch, (the tensors that fit, a
        one-line summary of what was left out) for the caller to show.

    Raises:
        CheckpointMismatchError: naming ``source`` (the file), ``model_name`` and the tensors that do not fit.
    """
    given = state_dict_from(checkpoint)
    expected = model.state_dict()
    missing, unexpected, reshaped = compare_state_dicts(expected, given)
    if not (missing or unexpected or reshaped):
        return given, None
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(expected)} tensors are missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors in it are not in the model ({_some(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape (" + ", ".join(
            f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in reshaped[:3])
            + (", ..." if len(reshaped) > 3 else "") + ")")
    summary = "; ".join(parts)
    if not allow_partial:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit {model_name}: {summary}. Is it a checkpoint "
                                      f"of another model? To load only the tensors that fit, pass {allow_flag}.")
    skip = {k for k, _, _ in reshaped}
    fitting = {k: v for k, v in given.items() if k in expected and k not in skip}
    return fitting, f"partial load of {source} into {model_name}: {summary}"


def atomic_write(data: bytes, filepath: Union[str, Path]) -> None:
    """Write ``data`` to ``filepath`` via a temporary file in the same folder and ``os.replace``.

    The file gets the permissions a plain ``open(filepath, 'wb')`` would give it (0666 less the umask), not the
    0600 of the temporary file."""
    filepath = os.fspath(filepath)
    folder = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(filepath) + "-", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
