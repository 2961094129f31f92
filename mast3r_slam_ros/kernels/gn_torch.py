"""PyTorch Gauss–Newton (in progress)."""

from __future__ import annotations


def _todo(*a, **k):
    raise NotImplementedError("gauss_newton_* PyTorch implementation is being written (issue 4)")


gn_solve = gn_blocks_rays_torch = gn_blocks_calib_torch = gn_blocks_points_torch = _todo
