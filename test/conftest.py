"""Shared pytest configuration: `cuda`-marked tests skip without an NVIDIA GPU; the ``ext`` fixture."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def ext():
    """The compiled CUDA extension (CUDA tests; fails with the reason when it cannot be loaded)."""
    from mast3r_slam_ros.kernels import _ext

    mod = _ext.load()
    assert mod is not None, f"CUDA extension mast3r_slam_ros._cuda not available: {_ext.load_error()}"
    return mod
