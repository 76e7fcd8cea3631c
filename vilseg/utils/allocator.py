"""glibc's malloc for CPU training processes: keep the mid-sized memory a step frees for the next step.

PyTorch's CPU tensors come straight from ``malloc``. With glibc's defaults a training step's activations grow the
heap in forward and free it in backward, glibc returns the freed top of the heap to the system, and the next step
takes the same memory back page by page (a page fault per 4 KiB, each zero-filled by the kernel). On a virtual
machine that refilling is a measurable part of a step (``benchmarks/page_faults.py``). PyTorch's CUDA caching
allocator keeps freed blocks for that reason; on the CPU this module asks glibc to do the same, with two ``mallopt``
settings, and a third that keeps the process's threads in one arena:

- ``M_TRIM_THRESHOLD`` (:data:`TRIM_THRESHOLD_BYTES`): the heap is trimmed only when that much is free at its top,
  so a step's freed activations stay mapped for the next step;
- ``M_MMAP_THRESHOLD`` (:data:`MMAP_THRESHOLD_BYTES`): tensors from 16 MiB up keep mappings of their own, returned
  when freed. Below it lie the many mid-sized temporaries of a layer at the training crop (a ViL-T layer's, and a
  DeiT-T block's attention matrices, at 512²), kept in the heap for reuse; the larger activations (decode-head maps,
  tensors of large inputs) would fragment a heap that is never trimmed (as measured with glibc's own 32 MiB
  ceiling; a 4 MiB threshold left the attention matrices of the baselines to fault in every step: README).
  (Setting either value fixes glibc's otherwise adaptive thresholds, so both are set.)
- ``M_ARENA_MAX`` (:data:`ARENA_MAX`): one arena for all threads. Each further thread that allocates (PyTorch's
  intra-op workers, the BLAS's) otherwise gets an arena of its own, and with one per thread the process held more
  above its live tensors over a large ViL-T training step, and was no faster (README). Only arenas not yet created
  are affected, so the tools set it before the first parallel operator runs.

Between steps the process keeps that memory instead of handing it back. Measured in the README's speed section
(``benchmarks/vil_speed.py --malloc``, ``benchmarks/page_faults.py``). Nothing here runs on import: the training
tools call :func:`configure_malloc` with their ``--malloc`` option (default 'keep'; 'system' leaves the process
untouched), the speed benchmark's workers likewise. Other C libraries, and processes whose environment already
chooses (``MALLOC_*`` variables, ``GLIBC_TUNABLES``, a preloaded allocator such as jemalloc), are left alone.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
from typing import Optional

__all__ = ["MALLOC_MODES", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "ARENA_MAX", "add_malloc_argument",
           "configure_malloc"]

MALLOC_MODES = ("keep", "system")
MMAP_THRESHOLD_BYTES = 16 * 2**20
TRIM_THRESHOLD_BYTES = 2**30  # (mallopt takes an int)
ARENA_MAX = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
_ENVIRONMENT_CHOICES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                        "MALLOC_ARENA_MAX")


def _environment_choice() -> Optional[str]:
    """The variable through which this process's environment already configures its allocator, or None."""
    for name in _ENVIRONMENT_CHOICES:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return "LD_PRELOAD"
    return None


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """The training tools' ``--malloc`` option (default 'keep'), for :func:`configure_malloc`."""
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="keep",
                        help="glibc malloc of this process: 'keep' (default) keeps the mid-sized memory a step frees "
                             "for the next one instead of returning it to the system and faulting it in again; "
                             "'system' leaves the C library's defaults (vilseg/utils/allocator.py; README, speed "
                             "section)")


def configure_malloc(mode: str) -> str:
    """Set this process's glibc malloc for training (``mode`` 'keep', see the module docstring) or leave it as it
    is ('system'). Returns one line saying what the process's allocator now does (for logs and benchmark headers).

    Raises:
        ValueError: ``mode`` is not one of :data:`MALLOC_MODES`.
        OSError: glibc refused a setting (one line naming it).
    """
    if mode not in MALLOC_MODES:
        raise ValueError(f"--malloc must be one of {', '.join(MALLOC_MODES)}, got {mode!r}")
    choice = _environment_choice()
    if choice is not None:
        return f"malloc as the environment sets it ({choice})" + ("; vilseg's setting not applied" if mode == "keep"
                                                                   else "")
    if mode == "system":
        return "the C library's default malloc settings"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: malloc left as it is"
    libc = ctypes.CDLL(None)
    for option, value, name in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "M_MMAP_THRESHOLD"),
                                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "M_TRIM_THRESHOLD"),
                                (_M_ARENA_MAX, ARENA_MAX, "M_ARENA_MAX")):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc's mallopt refused {name}={value}")
    return (f"glibc malloc keeps freed memory (mallopt M_TRIM_THRESHOLD={TRIM_THRESHOLD_BYTES}, "
            f"M_MMAP_THRESHOLD={MMAP_THRESHOLD_BYTES}, M_ARENA_MAX={ARENA_MAX})")
