"""Builds vilseg's one native extension, ``vilseg.ops._native`` (CPU operators in C++: the ViL layer's fused operators,
``vilseg/ops/vil_layer.py``, and the chunkwise mLSTM kernel, ``vilseg/ops/mlstm.py``); everything else is declared in
pyproject.toml. The extension is optional: where it
cannot be built (no C++ compiler, ``VILSEG_BUILD_EXT=0``) vilseg installs without it and runs those parts with
PyTorch operators."""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("VILSEG_BUILD_EXT", "1") != "0":
    import importlib.util

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the flags and sources (vilseg/ops/native_build.py, by its path: vilseg is not installed yet)
    spec = importlib.util.spec_from_file_location("native_build", "vilseg/ops/native_build.py")
    native_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native_build)
    cflags, ldflags = native_build.compile_flags()
    sources = [f"vilseg/ops/csrc/{name}.cpp" for name in native_build.SOURCES]
    ext_modules = [CppExtension("vilseg.ops._native", sources, extra_compile_args=cflags, extra_link_args=ldflags)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
