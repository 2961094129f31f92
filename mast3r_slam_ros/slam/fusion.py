"""Pointmap fusion rules (``tracking.filtering_mode``) for a frame's canonical pointmap.

Source: MASt3R-SLAM ``frame.py:Frame.update_pointmap`` (spec ``upstream_algorithm.md`` §5.6). Every rule takes the
current canonical state ``(X_old [HW,3], C_old [HW,1], N_old, N_updates)`` and a new observation ``(X [HW,3], C [HW,1])``
in the same camera frame and returns the new ``(X_canon, C, N)``. All tensors are float32 on one device; ``C`` is the
MASt3R confidence (>= 1), weights are per pixel and broadcast over xyz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: the fusion modes of spec §5.6, in the order of the table there
FILTERING_MODES = ("weighted_pointmap", "weighted_spherical", "recent", "first", "best_score", "indep_conf")
#: scores usable by ``best_score``
FILTERING_SCORES = ("median", "mean")


@dataclass
class FusedPointmap:
    """Result of one fusion step: ``X_canon [HW,3] f32``, ``C [HW,1] f32`` (accumulated confidence), ``N`` (number of
    fused observations, so the average confidence is ``C/N``) and ``score`` (the confidence score kept by
    ``best_score``; ``-inf`` when unused)."""

    X_canon: Tensor
    C: Tensor
    N: int
    score: float


def confidence_score(C: Tensor, score: str = "median") -> float:
    """Scalar score of a confidence map for the ``best_score`` rule.

    Args:
        C: ``[HW,1]`` f32 confidences.
        score: ``"median"`` or ``"mean"`` (``tracking.filtering_score``).
    Returns: the median (``torch.median``, lower median) or mean of ``C`` as a Python float.
    Raises: ValueError for an unknown score name.
    """
    if score == "median":
        return float(torch.median(C))
    if score == "mean":
        return float(torch.mean(C))
    raise ValueError(f"unknown filtering_score {score!r}; expected one of {FILTERING_SCORES}")


def _cart_to_spherical(X: Tensor) -> Tensor:
    """``X [...,3]`` -> ``[r, phi=atan2(y,x), theta=acos(z/r)]`` (spec §5.6 ``weighted_spherical``)."""
    r = torch.linalg.norm(X, dim=-1, keepdim=True)
    phi = torch.atan2(X[..., 1:2], X[..., 0:1])
    theta = torch.acos(torch.clamp(X[..., 2:3] / r.clamp_min(1e-12), -1.0, 1.0))
    return torch.cat([r, phi, theta], dim=-1)


def _spherical_to_cart(S: Tensor) -> Tensor:
    r, phi, theta = S[..., 0:1], S[..., 1:2], S[..., 2:3]
    return torch.cat([r * torch.sin(theta) * torch.cos(phi), r * torch.sin(theta) * torch.sin(phi),
                      r * torch.cos(theta)], dim=-1)


def fuse(X_old: Tensor | None, C_old: Tensor | None, N_old: int, N_updates: int, score_old: float,
         X: Tensor, C: Tensor, mode: str = "weighted_pointmap", score: str = "median") -> FusedPointmap:
    """Fuse a new observation into a canonical pointmap (spec §5.6).

    Args:
        X_old, C_old: current canonical pointmap ``[HW,3]`` and accumulated confidence ``[HW,1]`` (None when N_old == 0).
        N_old: number of observations already fused (0 = fresh frame: the observation is taken as is).
        N_updates: number of previous ``update_pointmap`` calls (the ``first`` rule replaces only when it is 1).
        score_old: score stored by ``best_score`` (``-inf`` if none).
        X, C: the new observation, ``[HW,3]`` / ``[HW,1]`` f32, same camera frame and device.
        mode: one of :data:`FILTERING_MODES`.
        score: ``median``/``mean`` for ``best_score``.
    Returns: :class:`FusedPointmap` (new tensors; inputs are not modified).
    Raises: ValueError for an unknown mode, mismatched shapes or non-finite input.
    """
    if mode not in FILTERING_MODES:
        raise ValueError(f"unknown filtering_mode {mode!r}; expected one of {FILTERING_MODES}")
    if X.ndim != 2 or X.shape[-1] != 3 or C.shape != (X.shape[0], 1):
        raise ValueError(f"expected X [HW,3] and C [HW,1], got {tuple(X.shape)} and {tuple(C.shape)}")
    if N_old == 0 or X_old is None or C_old is None:
        s = confidence_score(C, score) if mode == "best_score" else -math.inf
        return FusedPointmap(X.clone(), C.clone(), 1, s)
    if X_old.shape != X.shape or C_old.shape != C.shape:
        raise ValueError(f"pointmap shape changed: {tuple(X_old.shape)} -> {tuple(X.shape)}")

    if mode == "weighted_pointmap":
        Xn = (C_old * X_old + C * X) / (C_old + C)
        return FusedPointmap(Xn, C_old + C, N_old + 1, score_old)
    if mode == "weighted_spherical":
        So, Sn = _cart_to_spherical(X_old), _cart_to_spherical(X)
        Sf = (C_old * So + C * Sn) / (C_old + C)
        return FusedPointmap(_spherical_to_cart(Sf), C_old + C, N_old + 1, score_old)
    if mode == "recent":
        return FusedPointmap(X.clone(), C.clone(), 1, score_old)
    if mode == "first":
        if N_updates == 1:
            return FusedPointmap(X.clone(), C.clone(), 1, score_old)
        return FusedPointmap(X_old, C_old, 1, score_old)
    if mode == "best_score":
        s = confidence_score(C, score)
        if s > score_old:
            return FusedPointmap(X.clone(), C.clone(), 1, s)
        return FusedPointmap(X_old, C_old, 1, score_old)
    # indep_conf: per-pixel keep the more confident observation
    better = C > C_old
    return FusedPointmap(torch.where(better, X, X_old), torch.where(better, C, C_old), 1, score_old)
