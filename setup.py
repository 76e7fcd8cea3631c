"""Builds vilseg's one native extension, ``vilseg.ops._native`` (CPU operators in C++: the ViL layer's fused operators,
``vilseg/ops/vil_layer.py``, and the chunkwise mLSTM kernel, ``vilseg/ops/mlstm.py``); everything else is declared in
pyproject.toml. The extension is optional: where it
cannot be built (no C++ compiler, ``VILSEG_BUILD_EXT=0``) vilseg installs without it and runs those parts with
PyTorch operators."""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("VILSEG_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -march=native: built on the machine that runs it (as `make install` does); VILSEG_EXT_ARCH overrides it
    # (e.g. x86-64-v3) for an environment that moves to other CPUs
    arch = os.environ.get("VILSEG_EXT_ARCH", "native")
    flags = ["-O3", f"-march={arch}", "-fopenmp"]
    sources = [f"vilseg/ops/csrc/{name}.cpp" for name in ("bindings", "vil_layer", "mlstm_chunkwise")]
    ext_modules = [CppExtension("vilseg.ops._native", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
