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
