"""Shared test isolation."""
from __future__ import annotations

import copy

import pytest


@pytest.fixture(autouse=True)
def _restore_mmengine_default_scope():
    """A Runner leaves its ``DefaultScope`` behind as the process-wide current scope (e.g. 'mmengine'), which
    changes where later ``MODELS.build`` calls look. Each test starts from and leaves the scope state it found."""
    from mmengine.registry import DefaultScope

    saved = copy.copy(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker computes with one thread: two workers with two threads each on two cores
    slow torch down many times over (its threads spin-wait for each other). Subprocesses inherit the setting."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow end-to-end tests first: pytest-xdist hands tests out in this order, so the long ones start while the
    short ones can still fill the other worker, instead of one worker running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the files' order otherwise
