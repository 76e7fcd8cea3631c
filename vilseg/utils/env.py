"""What machine and library versions a measurement ran on (written next to every benchmark table)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = ["cpu_name", "describe_machine", "library_versions", "resolve_device", "provenance_lines",
           "write_markdown"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line: CPU, logical CPUs, torch threads, and the GPU (or 'no GPU')."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"CPU {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {gpu}"


def library_versions(names: Iterable[str] = ("torch", "mmengine", "mmcv", "mmseg", "monai", "nibabel")
                     ) -> Dict[str, str]:
    """``{'python': ..., name: version}`` for the given importable packages that are installed."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is there
            pass
    return out


def resolve_device(device: Optional[Any] = "auto", option: str = "--device") -> Any:
    """A validated ``torch.device``: 'auto' (or None) is CUDA when present, else the CPU.

    Raises:
        ValueError: one line naming ``option``: not a device, a type other than cpu/cuda, CUDA asked for on a
            machine without it, or a CUDA index beyond the GPUs present.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{option} {device!r} is not a device: expected 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{option} {device!r}: only 'cpu' and 'cuda[:N]' are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"{option} {device!r}: this machine has no CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda is not None}); use {option} cpu")
    n = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise ValueError(f"{option} {device!r}: only {n} CUDA device(s) present (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def provenance_lines(script: str, argv: Sequence[str]) -> List[str]:
    """The markdown list items a benchmark table starts with: machine, library versions and the command line
    (``python <script> <argv>``)."""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return [f"- machine: {describe_machine()}", f"- versions: {versions}",
            f"- command: `{' '.join(['python', script, *argv])}`"]


def write_markdown(out_dir: str, name: str, lines: Sequence[str], echo_last: int = 0) -> Path:
    """Write ``lines`` to ``out_dir``/``name`` (folders made as needed; atomically, so that a run killed while it
    rewrites its table leaves the previous one), print the last ``echo_last`` of them and the path written; returns
    the path."""
    from vilseg.utils.checkpoint import atomic_write

    path = Path(out_dir) / name
    atomic_write(("\n".join(lines) + "\n").encode(), path)
    if echo_last:
        print("\n".join(lines[-echo_last:]))
    print(f"wrote {path}")
    return path
