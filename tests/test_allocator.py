"""vilseg.utils.allocator: the training tools' glibc malloc setting (each check that sets it runs in a subprocess of
its own: mallopt changes the whole process)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from vilseg.utils.allocator import configure_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Three rounds of 48 blocks of 1 MiB, each block written (its pages faulted in), then all freed: prints the page
# faults of the last round. With glibc's defaults the freed top of the heap goes back to the system after every
# round, so each round faults its 48 MiB in again; kept, the last round reuses the first round's pages.
ROUNDS = r"""
import ctypes, resource, sys
from vilseg.utils.allocator import configure_malloc
if sys.argv[1] != "system":
    print(configure_malloc(sys.argv[1]), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 2**20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(48)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in reversed(blocks):
        libc.free(b)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _run_script(script: str, mode: str, env_extra: dict = None) -> subprocess.CompletedProcess:
    """``script`` in a fresh process with ``mode`` as its argument, in an environment without malloc settings (plus
    ``env_extra``)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra or {})
    res = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _last_round_faults(mode: str, env_extra: dict = None) -> int:
    return int(_run_script(ROUNDS, mode, env_extra).stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (other C libraries are left alone)")
def test_keep_reuses_freed_memory_where_glibc_defaults_fault_it_in_again():
    pages = 48 * 2**20 // 4096
    assert _last_round_faults("system") > pages // 2  # the defaults: the round faults its memory in again
    assert _last_round_faults("keep") < pages // 20  # kept: the pages of the first round are reused
    # a process whose environment already sets malloc keeps that choice (here: glibc's trimming, unchanged)
    assert _last_round_faults("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"}) > pages // 2


# A second thread allocates (and keeps) a block, then glibc's malloc_stats prints one "Arena N:" section per arena
# to stderr.
THREAD_ARENAS = r"""
import ctypes, sys, threading
from vilseg.utils.allocator import configure_malloc
if sys.argv[1] != "system":
    print(configure_malloc(sys.argv[1]), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
blocks = []
worker = threading.Thread(target=lambda: blocks.append(libc.malloc(4096)))
worker.start()
worker.join()
libc.malloc_stats()
"""


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (other C libraries are left alone)")
def test_keep_gives_all_threads_one_arena():
    arenas = {mode: sum(line.startswith("Arena ") for line in _run_script(THREAD_ARENAS, mode).stderr.splitlines())
              for mode in ("system", "keep")}
    assert arenas == {"system": 2, "keep": 1}


def test_bad_mode_is_one_clear_error_and_system_changes_nothing(monkeypatch):
    with pytest.raises(ValueError, match=r"--malloc must be one of keep, system, got 'fast'"):
        configure_malloc("fast")
    assert configure_malloc("system") == "the C library's default malloc settings"
    # an allocator chosen by the environment is left alone (no mallopt call: this check runs in the test process)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert configure_malloc("keep") == "malloc as the environment sets it (LD_PRELOAD); vilseg's setting not applied"
    assert configure_malloc("system") == "malloc as the environment sets it (LD_PRELOAD)"  # what the table says
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert "GLIBC_TUNABLES" in configure_malloc("keep")
