"""Result type of the global Gauss–Newton solves (docs/interfaces.md)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class GNResult:
    """Outcome of ``gauss_newton_{rays,calib,points}``.

    Attributes:
        dx: ``[n-1,7]`` float32 — the last step applied (tangent ``[tau, omega, sigma]`` per free keyframe, left
            perturbation of ``T_WC``; rows follow ``Twc[1:]``). Zeros if no step was applied.
        iterations: number of GN iterations performed (steps applied, plus a final failed one if ``ok`` is False).
        converged: True if the last step had ``‖dx‖ < delta_thresh``.
        ok: False if a linear solve failed even with damping (the poses then keep the last good state and ``message``
            says why); True otherwise.
        message: human-readable status.
        cost: robust (Huber) cost ``Σ ρ(√w·r)`` at the linearization point of the last iteration, i.e. before the
            last step (upstream does not compute a cost; this one is cheap because the residuals exist anyway).
        cost_initial: the same cost at the initial poses (first iteration).
    """

    dx: Tensor
    iterations: int
    converged: bool
    ok: bool
    message: str
    cost: float
    cost_initial: float = float("nan")
