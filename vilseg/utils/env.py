"""What machine and library versions a measurement ran on (written next to every benchmark table)."""
from __future__ import annotations

import os
import platform
from typing import Dict, Iterable

__all__ = ["cpu_name", "describe_machine", "library_versions"]


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
