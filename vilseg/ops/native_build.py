"""How vilseg's native extension ``vilseg.ops._native`` is compiled: the one place that ``setup.py`` and the
benchmarks that build another revision of it (``benchmarks/layer_revisions.py``) read the flags from. Standard
library only: ``setup.py`` loads this file by its path, before vilseg is installed."""
from __future__ import annotations

import os
from typing import List, Tuple

# the extension's C++ sources under vilseg/ops/csrc, in link order
SOURCES = ("bindings", "vil_layer", "mlstm_chunkwise")


def compile_flags() -> Tuple[List[str], List[str]]:
    """(compiler flags, linker flags). -march=native: built on the machine that runs it (as `make install` does);
    the environment variable VILSEG_EXT_ARCH overrides it (e.g. x86-64-v3) for an environment that moves to other
    CPUs."""
    arch = os.environ.get("VILSEG_EXT_ARCH", "native")
    return ["-O3", f"-march={arch}", "-fopenmp"], ["-fopenmp"]
