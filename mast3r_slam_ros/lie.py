"""Sim(3) Lie group in pure PyTorch, in lietorch's data layout (no lietorch dependency).

Layout (spec/upstream_algorithm.md §9.1, lietorch ``Sim3``):

- group element ``data [..., 8] = [tx, ty, tz, qx, qy, qz, qw, s]`` (unit quaternion in (x, y, z, w) order, scale s > 0),
  acting on points as ``T·p = s R(q) p + t``; identity ``[0, 0, 0, 0, 0, 0, 1, 1]``;
- tangent ``xi [..., 7] = [tau(3), omega(3), sigma(1)]`` with ``hat(xi) = [[ [omega]x + sigma I, tau ], [0, 0]]``;
- retraction on the **left**: ``T.retr(xi) = Exp(xi) · T`` (lietorch ``retr``), matching the left-perturbation
  Jacobians ``d(Exp(xi) T p)/dxi |_0 = [I, -[P]x, P]`` (``act_jacobian``) used by tracking and the factor graph.

Every tensor op is batched over arbitrary leading dimensions, works in float32 and float64 on CPU and CUDA, and does no
host synchronisation (no ``.item()``, no data-dependent Python branches): special cases (small angle, small
``|sigma + i theta|``, rotation angle near pi) are selected element-wise with ``torch.where`` and safe denominators.

Numerics. ``W(omega, sigma)`` (the Sim(3) "V matrix", lietorch ``RxSO3::calcW``) is ``W = A Omega + B Omega^2 + C I`` with
``A = Im(phi(z))/theta``, ``B = (C - Re(phi(z)))/theta^2``, ``C = phi(sigma)``, ``phi(x) = (e^x - 1)/x``, ``z = sigma + i theta``.
Where ``|z| < 0.25`` it is evaluated by its exact power series (``phi(z) = sum z^n/(n+1)!``, truncation < 1e-17
relative) instead of the closed forms of §9.1, which cancel catastrophically there (in float32 already at
``theta ~ 1e-3``); elsewhere the closed forms of §9.1 are used verbatim (with the ``theta -> 0`` limits of §9.1 where
``theta`` is tiny). Quaternions are renormalised after composition, ``exp`` and ``retr``, and every operation reads the
stored quaternion normalised (as lietorch's ``RxSO3`` constructor does).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Sim3", "skew", "act_jacobian", "quat_multiply", "quat_rotate", "quat_to_matrix", "retr_host", "host_inv",
           "host_mul", "host_adjoint"]

# |z| = |sigma + i theta| below which W's coefficients come from their power series (see module docstring).
_SERIES_RADIUS = 0.25
_SERIES_TERMS = 12
# angle / scalar magnitudes treated as exactly zero (limits of §9.1 used below these)
_TINY = 1e-6


def _check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64), got {x.dtype}")


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product over the last dim with full broadcasting of the leading dims. a, b: [..., 3]."""
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot product over the last dim, keepdim. a, b: [..., 3] -> [..., 1]."""
    return (a * b).sum(dim=-1, keepdim=True)


def skew(v: Tensor) -> Tensor:
    """Skew-symmetric (cross-product) matrix ``[v]x`` with ``[v]x w = v x w``.

    Args:
        v: ``[..., 3]`` float tensor.
    Returns:
        ``[..., 3, 3]`` tensor ``[[0, -z, y], [z, 0, -x], [-y, x, 0]]`` (same dtype/device).
    Raises:
        ValueError: if the last dimension is not 3.
    """
    if v.shape[-1] != 3:
        raise ValueError(f"skew: expected a [..., 3] tensor, got shape {tuple(v.shape)}")
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack((o, -z, y, z, o, -x, -y, x, o), dim=-1).reshape(*v.shape[:-1], 3, 3)


def act_jacobian(P: Tensor) -> Tensor:
    """Jacobian of a left perturbation of a transformed point: ``d(Exp(xi)·T·p)/dxi`` at ``xi = 0``.

    Args:
        P: ``[..., 3]`` the transformed point ``T·p``.
    Returns:
        ``[..., 3, 7] = [I, -[P]x, P]`` (tangent order tau, omega, sigma; spec §9.1 / §5.2).
    """
    if P.shape[-1] != 3:
        raise ValueError(f"act_jacobian: expected points [..., 3], got shape {tuple(P.shape)}")
    eye = torch.eye(3, dtype=P.dtype, device=P.device).expand(*P.shape[:-1], 3, 3)
    return torch.cat((eye, -skew(P), P.unsqueeze(-1)), dim=-1)


# ----------------------------------------------------------------------------------------------------- quaternions
def quat_multiply(q1: Tensor, q2: Tensor) -> Tensor:
    """Hamilton product ``q1 ⊗ q2`` of quaternions in (x, y, z, w) order. q1, q2: ``[..., 4]`` (broadcast)."""
    v1, w1 = q1[..., :3], q1[..., 3:]
    v2, w2 = q2[..., :3], q2[..., 3:]
    v = w1 * v2 + w2 * v1 + _cross(v1, v2)
    w = w1 * w2 - _dot(v1, v2)
    return torch.cat((v, w), dim=-1)


def quat_rotate(q: Tensor, p: Tensor) -> Tensor:
    """Rotate points by unit quaternions: ``uv = 2 v x p; p' = p + w uv + v x uv`` (spec §9.1).

    Args:
        q: ``[..., 4]`` unit quaternion (x, y, z, w); p: ``[..., 3]``; leading dims broadcast.
    Returns:
        ``[..., 3]`` rotated points.
    """
    v, w = q[..., :3], q[..., 3:]
    uv = 2.0 * _cross(v, p)
    return p + w * uv + _cross(v, uv)


def quat_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrix ``[..., 3, 3]`` of unit quaternions ``[..., 4]`` (x, y, z, w)."""
    x, y, z, w = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    m = torch.stack(
        (
            1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
            2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
            2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
        ),
        dim=-1,
    )
    return m.reshape(*q.shape[:-1], 3, 3)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a finite gradient at 0 (the value there only feeds the small-angle branches)."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _normalize_quat(q: Tensor) -> Tensor:
    return q / q.norm(dim=-1, keepdim=True)


def _so3_exp_quat(omega: Tensor) -> Tensor:
    """Unit quaternion of ``Exp(omega)``: ``[(sin(θ/2)/θ) ω, cos(θ/2)]`` with the θ<1e-6 Taylor branch (§9.1)."""
    theta2 = _dot(omega, omega)
    theta = _safe_sqrt(theta2)
    small = theta < _TINY
    safe = torch.where(small, torch.ones_like(theta), theta)
    imag = torch.where(small, 0.5 - theta2 / 48.0 + theta2 * theta2 / 3840.0, torch.sin(0.5 * safe) / safe)
    real = torch.where(small, 1.0 - theta2 / 8.0 + theta2 * theta2 / 384.0, torch.cos(0.5 * safe))
    return torch.cat((imag * omega, real), dim=-1)


def _so3_log(q: Tensor) -> Tensor:
    """``omega [..., 3]`` of a unit quaternion, |omega| <= pi (§9.1: ``2 atan(n/w)/n · v`` with its branches).

    The quaternion is first brought to ``w >= 0`` (q and -q are the same rotation); ``2 atan2(n, w)`` then equals
    lietorch's ``2 atan(n/w)`` for w > 0 and its ``±pi/n`` branch at ``w = 0`` without any division by w.
    """
    sign = torch.where(q[..., 3:] < 0, -torch.ones_like(q[..., 3:]), torch.ones_like(q[..., 3:]))
    v = q[..., :3] * sign
    w = q[..., 3:] * sign
    n2 = _dot(v, v)
    n = _safe_sqrt(n2)
    small = n < _TINY
    n_safe = torch.where(small, torch.ones_like(n), n)
    w_safe = torch.where(small, w, torch.ones_like(w))  # w ~ 1 where n is tiny
    factor = torch.where(small, 2.0 / w_safe - (2.0 / 3.0) * n2 / (w_safe ** 3), 2.0 * torch.atan2(n, w) / n_safe)
    return factor * v


def _w_coeffs(theta2: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients (A, B, C) of ``W = A Ω + B Ω² + C I`` (lietorch ``RxSO3::calcW``, spec §9.1).

    theta2, sigma: ``[..., 1]``. Series inside ``|σ + iθ| < 0.25``; §9.1 closed forms outside (module docstring).
    """
    theta = _safe_sqrt(theta2)
    one = torch.ones_like(theta)
    z2 = theta2 + sigma * sigma
    in_series = z2 < _SERIES_RADIUS ** 2

    # --- exact power series: phi(z) = sum z^n/(n+1)!; P_n = Re z^n, Q_n = Im z^n / θ, R_n = (σ^n - P_n)/θ²
    # recurrences: P_{n+1} = σ P_n - θ² Q_n,  Q_{n+1} = P_n + σ Q_n,  R_{n+1} = σ R_n + Q_n   (no divisions)
    s_ser = torch.where(in_series, sigma, torch.zeros_like(sigma))
    t2_ser = torch.where(in_series, theta2, torch.zeros_like(theta2))
    P, Q, R, S = one, torch.zeros_like(one), torch.zeros_like(one), one
    A_s, B_s, C_s = torch.zeros_like(one), torch.zeros_like(one), one.clone()
    fact = 1.0
    for n in range(1, _SERIES_TERMS + 1):
        P, Q, R, S = s_ser * P - t2_ser * Q, P + s_ser * Q, s_ser * R + Q, S * s_ser
        fact *= n + 1
        A_s = A_s + Q / fact
        B_s = B_s + R / fact
        C_s = C_s + S / fact

    # --- closed forms of §9.1 (outside the series disc, so not both σ and θ are small)
    sig_small = sigma.abs() < _TINY
    th_small = theta < _TINY
    sig_safe = torch.where(sig_small, one, sigma)
    th_safe = torch.where(th_small, one, theta)
    t2_safe = torch.where(th_small, one, theta2)
    es = torch.exp(sigma)
    C_g = torch.where(sig_small, 1.0 + 0.5 * sigma, torch.expm1(sigma) / sig_safe)
    # Outside the series disc |σ| and θ are never both small: where θ is tiny |σ| >= ~0.25 and the θ -> 0 limits
    # below are well conditioned; elsewhere θ >= ~0.25 and the generic forms are smooth in σ (also at σ = 0, where
    # they reduce to the SE(3) values (1 - cos θ)/θ² and (θ - sin θ)/θ³, so lietorch's |σ| < 1e-6 switch to those
    # — an O(σ) approximation — is not needed).
    # θ = 0, σ ≠ 0
    A1 = ((sigma - 1.0) * es + 1.0) / (sig_safe * sig_safe)
    B1 = (0.5 * sigma * sigma * es + es - 1.0 - sigma * es) / (sig_safe ** 3)
    # generic
    a = es * torch.sin(th_safe)
    b = es * torch.cos(th_safe)
    c = t2_safe + sigma * sigma
    A2 = (a * sigma + (1.0 - b) * th_safe) / (th_safe * c)
    B2 = (C_g - ((b - 1.0) * sigma + a * th_safe) / c) / t2_safe
    A_g = torch.where(th_small, A1, A2)
    B_g = torch.where(th_small, B1, B2)

    A = torch.where(in_series, A_s, A_g)
    B = torch.where(in_series, B_s, B_g)
    C = torch.where(in_series, C_s, C_g)
    return A, B, C


def _apply_w(omega: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """``W(omega, sigma) v`` without forming W: ``A ω×v + B ω×(ω×v) + C v``. Shapes ``[...,3], [...,1], [...,3]``."""
    A, B, C = _w_coeffs(_dot(omega, omega), sigma)
    wv = _cross(omega, v)
    return A * wv + B * _cross(omega, wv) + C * v


def _w_matrix(omega: Tensor, sigma: Tensor) -> Tensor:
    """``W [..., 3, 3]``."""
    A, B, C = _w_coeffs(_dot(omega, omega), sigma)
    Om = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return A.unsqueeze(-1) * Om + B.unsqueeze(-1) * (Om @ Om) + C.unsqueeze(-1) * eye


def _solve3(M: Tensor, b: Tensor) -> Tensor:
    """``M^{-1} b`` for batched 3×3 M via the adjugate (no LAPACK call, no host sync). M [...,3,3], b [...,3]."""
    r0, r1, r2 = M[..., 0, :], M[..., 1, :], M[..., 2, :]
    c0, c1, c2 = _cross(r1, r2), _cross(r2, r0), _cross(r0, r1)  # columns of adj(M)
    det = _dot(r0, c0)
    return (c0 * b[..., 0:1] + c1 * b[..., 1:2] + c2 * b[..., 2:3]) / det


# ------------------------------------------------------------------------------------------------------------ Sim3
class Sim3:
    """Batch of Sim(3) elements ``T = (t, q, s)``, ``data [..., 8] = [tx, ty, tz, qx, qy, qz, qw, s]``.

    Math and conventions: spec/upstream_algorithm.md §9.1 (lietorch). Binary operations broadcast the leading (batch)
    dimensions with ordinary PyTorch rules (trailing alignment), e.g. ``Sim3 [B,1]`` acts on points ``[B,HW,3]`` and
    ``Sim3 [1]`` (or ``[]``) on ``[HW,3]``.

    Args:
        data: ``[..., 8]`` float32/float64 tensor (not copied). The quaternion need not be exactly unit: every
            operation reads it normalised; the scale must be > 0.
    Raises:
        TypeError: data is not a floating tensor. ValueError: last dimension is not 8.
    """

    embedded_dim = 8
    manifold_dim = 7
    __slots__ = ("data",)

    def __init__(self, data: Tensor):
        if isinstance(data, Sim3):
            data = data.data
        _check_float(data, "Sim3 data")
        if data.dim() == 0 or data.shape[-1] != 8:
            raise ValueError(f"Sim3 data must have shape [..., 8] (t, q_xyzw, s), got {tuple(data.shape)}")
        self.data = data

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def identity(cls, *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> "Sim3":
        """Identity elements of batch shape ``shape`` (``identity()`` is a single element, data ``[8]``)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        data = torch.zeros(*shape, 8, dtype=dtype, device=device)
        data[..., 6] = 1.0
        data[..., 7] = 1.0
        return cls(data)

    Identity = identity  # lietorch spelling

    @classmethod
    def exp(cls, xi: Tensor) -> "Sim3":
        """Exponential map ``Exp(xi)``, ``xi [..., 7] = [tau, omega, sigma]`` -> Sim3 ``[...]`` (spec §9.1).

        ``q = [(sin(θ/2)/θ) ω, cos(θ/2)]``, ``s = e^σ``, ``t = W(ω, σ) τ``.
        """
        _check_float(xi, "xi")
        if xi.shape[-1] != 7:
            raise ValueError(f"Sim3.exp: expected tangent [..., 7] (tau, omega, sigma), got {tuple(xi.shape)}")
        tau, omega, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6:7]
        q = _normalize_quat(_so3_exp_quat(omega))
        t = _apply_w(omega, sigma, tau)
        return cls(torch.cat((t, q, torch.exp(sigma)), dim=-1))

    @staticmethod
    def stack(items: Sequence["Sim3"], dim: int = 0) -> "Sim3":
        """Stack Sim3 batches of equal shape along a new batch dimension ``dim``."""
        items = list(items)
        if not items:
            raise ValueError("Sim3.stack: empty sequence")
        nd = items[0].data.dim()
        d = dim if dim >= 0 else dim + nd  # a negative batch dim counts from before the 8-vector
        return Sim3(torch.stack([x.data for x in items], dim=d))

    @staticmethod
    def cat(items: Sequence["Sim3"], dim: int = 0) -> "Sim3":
        """Concatenate Sim3 batches along existing batch dimension ``dim``."""
        items = list(items)
        if not items:
            raise ValueError("Sim3.cat: empty sequence")
        nd = items[0].data.dim()
        d = dim if dim >= 0 else dim + nd - 1
        if not 0 <= d < nd - 1:
            raise IndexError(f"Sim3.cat: dim {dim} out of range for batch shape {tuple(items[0].shape)}")
        return Sim3(torch.cat([x.data for x in items], dim=d))

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def shape(self) -> torch.Size:
        """Batch shape (``data.shape[:-1]``)."""
        return self.data.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        if self.data.dim() < 2:
            raise TypeError("len() of an unbatched Sim3")
        return self.data.shape[0]

    def __repr__(self) -> str:
        return f"Sim3(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def translation(self) -> Tensor:
        """``t [..., 3]``."""
        return self.data[..., :3]

    def rotation(self) -> Tensor:
        """Unit quaternion ``[..., 4]`` in (qx, qy, qz, qw) order (normalised copy of the stored one)."""
        return _normalize_quat(self.data[..., 3:7])

    def scale(self) -> Tensor:
        """``s [..., 1]``."""
        return self.data[..., 7:8]

    def rotation_matrix(self) -> Tensor:
        """``R [..., 3, 3]``."""
        return quat_to_matrix(self.rotation())

    # ------------------------------------------------------------------------------------------- tensor plumbing
    def _index(self, idx) -> tuple:
        idx_t = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx_t):
            return (*idx_t, slice(None))
        return (*idx_t, Ellipsis, slice(None))

    def __getitem__(self, idx) -> "Sim3":
        """Index the batch dimensions (never the 8-vector); returns a view where PyTorch does."""
        return Sim3(self.data[self._index(idx)])

    def __setitem__(self, idx, value: "Sim3") -> None:
        self.data[self._index(idx)] = value.data if isinstance(value, Sim3) else value

    def to(self, *args, **kwargs) -> "Sim3":
        """``data.to(...)`` (device and/or dtype)."""
        return Sim3(self.data.to(*args, **kwargs))

    def cpu(self) -> "Sim3":
        return Sim3(self.data.cpu())

    def cuda(self, *args, **kwargs) -> "Sim3":
        return Sim3(self.data.cuda(*args, **kwargs))

    def clone(self) -> "Sim3":
        return Sim3(self.data.clone())

    def detach(self) -> "Sim3":
        return Sim3(self.data.detach())

    def float(self) -> "Sim3":
        return Sim3(self.data.float())

    def double(self) -> "Sim3":
        return Sim3(self.data.double())

    def view(self, *shape: int) -> "Sim3":
        """Reshape the batch dimensions."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return Sim3(self.data.reshape(*shape, 8))

    reshape = view

    # --------------------------------------------------------------------------------------------- group ops
    def inv(self) -> "Sim3":
        """Inverse ``(-(1/s) Rᵀ t, q*, 1/s)`` (§9.1)."""
        q = self.rotation()
        qc = torch.cat((-q[..., :3], q[..., 3:]), dim=-1)
        s_inv = 1.0 / self.scale()
        t = -s_inv * quat_rotate(qc, self.translation())
        return Sim3(torch.cat((t, qc, s_inv), dim=-1))

    def __mul__(self, other: "Sim3") -> "Sim3":
        """Composition ``(t1 + s1 R1 t2, q1⊗q2, s1 s2)`` with broadcasting; the quaternion is renormalised."""
        if not isinstance(other, Sim3):
            return NotImplemented
        q1, q2 = self.rotation(), other.rotation()
        s1 = self.scale()
        t = self.translation() + s1 * quat_rotate(q1, other.translation())
        q = _normalize_quat(quat_multiply(q1, q2))
        s = s1 * other.scale()
        return Sim3(torch.cat((t, q, s), dim=-1))  # each part already has the broadcast batch shape

    def act(self, X: Tensor) -> Tensor:
        """Transform points: ``s R X + t``.

        Args:
            X: points ``[..., 3]`` (same dtype); the batch shape of T broadcasts with ``X.shape[:-1]``
               (e.g. T ``[B,1]`` with X ``[B,HW,3]``).
        Returns:
            ``[..., 3]`` transformed points.
        """
        _check_float(X, "points")
        if X.shape[-1] != 3:
            raise ValueError(f"Sim3.act: expected points [..., 3], got {tuple(X.shape)}")
        # s R X + t as three fused multiply-adds with the 3x3 sR (2-3x faster than the quaternion sandwich on
        # large point sets; same result to rounding)
        M = self.scale().unsqueeze(-1) * self.rotation_matrix()
        out = torch.addcmul(self.translation(), X[..., 0:1], M[..., :, 0])
        out = out.addcmul_(X[..., 1:2], M[..., :, 1])
        return out.addcmul_(X[..., 2:3], M[..., :, 2])

    def __matmul__(self, X: Tensor) -> Tensor:
        return self.act(X)

    def retr(self, xi: Tensor) -> "Sim3":
        """Left retraction ``Exp(xi) · T`` (lietorch ``retr``; spec §9.1). xi: ``[..., 7]``."""
        return Sim3.exp(xi) * self

    def log(self) -> Tensor:
        """Logarithm ``xi [..., 7] = [W(ω,σ)⁻¹ t, ω, log s]`` with |ω| <= pi (spec §9.1)."""
        omega = _so3_log(self.rotation())
        sigma = torch.log(self.scale())
        tau = _solve3(_w_matrix(omega, sigma), self.translation())
        return torch.cat((tau, omega, sigma), dim=-1)

    def matrix(self) -> Tensor:
        """Homogeneous matrix ``[[sR, t], [0, 1]]``, ``[..., 4, 4]``."""
        sR = self.scale().unsqueeze(-1) * self.rotation_matrix()
        top = torch.cat((sR, self.translation().unsqueeze(-1)), dim=-1)
        bottom = torch.zeros(*self.shape, 1, 4, dtype=self.dtype, device=self.device)
        bottom[..., 0, 3] = 1.0
        return torch.cat((top, bottom), dim=-2)

    def adjoint(self) -> Tensor:
        """Adjoint ``Ad(T) [..., 7, 7] = [[sR, [t]x R, -t], [0, R, 0], [0, 0, 1]]`` so that
        ``Exp(Ad(T) xi) = T Exp(xi) T⁻¹`` (tangent order tau, omega, sigma; spec §9.1)."""
        R = self.rotation_matrix()
        t = self.translation()
        s = self.scale().unsqueeze(-1)
        Ad = torch.zeros(*self.shape, 7, 7, dtype=self.dtype, device=self.device)
        Ad[..., :3, :3] = s * R
        Ad[..., :3, 3:6] = skew(t) @ R
        Ad[..., :3, 6] = -t
        Ad[..., 3:6, 3:6] = R
        Ad[..., 6, 6] = 1.0
        return Ad

    def adj(self, a: Tensor) -> Tensor:
        """``Ad(T) a`` for tangent vectors ``a [..., 7]`` (lietorch ``adj``)."""
        return (self.adjoint() @ a.unsqueeze(-1)).squeeze(-1)

    def adjT(self, a: Tensor) -> Tensor:
        """``Ad(T)ᵀ a`` for ``a [..., 7]`` (lietorch ``adjT``)."""
        return (self.adjoint().transpose(-1, -2) @ a.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def hat(xi: Tensor) -> Tensor:
        """``hat(xi) [..., 4, 4] = [[[ω]x + σI, τ], [0, 0]]``."""
        tau, omega, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6:7]
        eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
        top = torch.cat((skew(omega) + sigma.unsqueeze(-1) * eye, tau.unsqueeze(-1)), dim=-1)
        bottom = torch.zeros(*xi.shape[:-1], 1, 4, dtype=xi.dtype, device=xi.device)
        return torch.cat((top, bottom), dim=-2)


# ------------------------------------------------------------------------------------------- one element, on the host
def _w_coeffs_host(theta2: float, sigma: float) -> tuple[float, float, float]:
    """Scalar float64 twin of :func:`_w_coeffs` (same series / closed-form split, same formulas)."""
    theta = math.sqrt(theta2)
    if theta2 + sigma * sigma < _SERIES_RADIUS ** 2:
        P, Q, R, S = 1.0, 0.0, 0.0, 1.0
        A, B, C = 0.0, 0.0, 1.0
        fact = 1.0
        for n in range(1, _SERIES_TERMS + 1):
            P, Q, R, S = sigma * P - theta2 * Q, P + sigma * Q, sigma * R + Q, S * sigma
            fact *= n + 1
            A += Q / fact
            B += R / fact
            C += S / fact
        return A, B, C
    es = math.exp(sigma)
    C = 1.0 + 0.5 * sigma if abs(sigma) < _TINY else math.expm1(sigma) / sigma
    if theta < _TINY:
        A = ((sigma - 1.0) * es + 1.0) / (sigma * sigma)
        B = (0.5 * sigma * sigma * es + es - 1.0 - sigma * es) / sigma ** 3
        return A, B, C
    a, b, c = es * math.sin(theta), es * math.cos(theta), theta2 + sigma * sigma
    A = (a * sigma + (1.0 - b) * theta) / (theta * c)
    B = (C - ((b - 1.0) * sigma + a * theta) / c) / theta2
    return A, B, C


def _qmul_host(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float]:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return (aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz)


def _qrot_host(q: Sequence[float], v: Sequence[float]) -> tuple[float, float, float]:
    x, y, z, w = q
    # v + 2w (u × v) + 2 u × (u × v), u = (x, y, z)
    cx, cy, cz = y * v[2] - z * v[1], z * v[0] - x * v[2], x * v[1] - y * v[0]
    return (v[0] + 2.0 * (w * cx + y * cz - z * cy), v[1] + 2.0 * (w * cy + z * cx - x * cz),
            v[2] + 2.0 * (w * cz + x * cy - y * cx))


def retr_host(data: Sequence[float], xi: Sequence[float]) -> list[float]:
    """Left retraction ``Exp(xi)·T`` of ONE Sim(3) element in float64 Python scalars (no tensor ops).

    The same math as :meth:`Sim3.retr` (series / closed forms of ``W``, quaternion renormalisation), for host loops
    that update a single pose many times per frame (the tracker's Gauss–Newton loop), where ~100 tiny tensor ops of
    the batched implementation cost ~0.6 ms per call and this costs ~20 µs.

    Args: data: 8 numbers ``[tx, ty, tz, qx, qy, qz, qw, s]``; xi: 7 numbers ``[tau, omega, sigma]``.
    Returns: the 8 numbers of ``Exp(xi)·T`` (float64). Raises: ValueError on wrong lengths.
    """
    d = [float(v) for v in data]
    x = [float(v) for v in xi]
    if len(d) != 8 or len(x) != 7:
        raise ValueError(f"retr_host: expected 8 pose and 7 tangent values, got {len(d)} and {len(x)}")
    tau, om, sigma = x[0:3], x[3:6], x[6]
    theta2 = om[0] * om[0] + om[1] * om[1] + om[2] * om[2]
    theta = math.sqrt(theta2)
    if theta < _TINY:
        imag, real = 0.5 - theta2 / 48.0 + theta2 * theta2 / 3840.0, 1.0 - theta2 / 8.0 + theta2 * theta2 / 384.0
    else:
        imag, real = math.sin(0.5 * theta) / theta, math.cos(0.5 * theta)
    q1 = [imag * om[0], imag * om[1], imag * om[2], real]
    n1 = math.sqrt(sum(v * v for v in q1))
    q1 = [v / n1 for v in q1]
    A, B, C = _w_coeffs_host(theta2, sigma)
    wv = (om[1] * tau[2] - om[2] * tau[1], om[2] * tau[0] - om[0] * tau[2], om[0] * tau[1] - om[1] * tau[0])
    wwv = (om[1] * wv[2] - om[2] * wv[1], om[2] * wv[0] - om[0] * wv[2], om[0] * wv[1] - om[1] * wv[0])
    t1 = [A * wv[k] + B * wwv[k] + C * tau[k] for k in range(3)]
    s1 = math.exp(sigma)
    q2 = d[3:7]
    n2 = math.sqrt(sum(v * v for v in q2))
    q2 = [v / n2 for v in q2]
    Rt2 = _qrot_host(q1, d[0:3])
    q = _qmul_host(q1, q2)
    nq = math.sqrt(sum(v * v for v in q))
    return [s1 * Rt2[0] + t1[0], s1 * Rt2[1] + t1[1], s1 * Rt2[2] + t1[2],
            q[0] / nq, q[1] / nq, q[2] / nq, q[3] / nq, s1 * d[7]]


# ------------------------------------------------------------------------ float64 NumPy Sim(3) over rows (host loops)
# Same formulas as Sim3 (quat_rotate, quat_multiply + renormalisation, inv, adjoint, quat_to_matrix), batched
# over the leading dim of [k,8] arrays ``[tx,ty,tz,qx,qy,qz,qw,s]``.
def _np_cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack((a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]), axis=-1)


def _np_qrot(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``[k,3]`` rotation of ``p [k,3]`` by unit quaternions ``q [k,4]`` (x,y,z,w): ``p + w·uv + v×uv``, uv = 2 v×p."""
    v, w = q[:, :3], q[:, 3:]
    uv = 2.0 * _np_cross(v, p)
    return p + w * uv + _np_cross(v, uv)


def host_inv(T: np.ndarray) -> np.ndarray:
    """Inverse ``(−(1/s) Rᵀ t, q*, 1/s)`` of ``T [k,8]`` float64 (as :meth:`Sim3.inv`)."""
    qc = np.concatenate((-T[:, 3:6], T[:, 6:7]), axis=1)
    s_inv = 1.0 / T[:, 7:8]
    return np.concatenate((-s_inv * _np_qrot(qc, T[:, :3]), qc, s_inv), axis=1)


def host_mul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Composition ``A·B = (t_A + s_A R_A t_B, q_A⊗q_B (renormalised), s_A s_B)`` of ``[k,8]`` arrays."""
    qa, qb = A[:, 3:7], B[:, 3:7]
    va, wa, vb, wb = qa[:, :3], qa[:, 3:], qb[:, :3], qb[:, 3:]
    q = np.concatenate((wa * vb + wb * va + _np_cross(va, vb), wa * wb - (va * vb).sum(1, keepdims=True)), axis=1)
    q = q / np.sqrt((q * q).sum(1, keepdims=True))
    t = A[:, :3] + A[:, 7:8] * _np_qrot(qa, B[:, :3])
    return np.concatenate((t, q, A[:, 7:8] * B[:, 7:8]), axis=1)


def host_adjoint(T: np.ndarray) -> np.ndarray:
    """``Ad(T) [k,7,7] = [[sR, [t]× R, −t], [0, R, 0], [0, 0, 1]]`` (as :meth:`Sim3.adjoint`)."""
    x, y, z, w = T[:, 3], T[:, 4], T[:, 5], T[:, 6]
    k = T.shape[0]
    R = np.empty((k, 3, 3))
    R[:, 0, 0] = 1 - 2 * (y * y + z * z)
    R[:, 0, 1] = 2 * (x * y - w * z)
    R[:, 0, 2] = 2 * (x * z + w * y)
    R[:, 1, 0] = 2 * (x * y + w * z)
    R[:, 1, 1] = 1 - 2 * (x * x + z * z)
    R[:, 1, 2] = 2 * (y * z - w * x)
    R[:, 2, 0] = 2 * (x * z - w * y)
    R[:, 2, 1] = 2 * (y * z + w * x)
    R[:, 2, 2] = 1 - 2 * (x * x + y * y)
    t = T[:, :3]
    tx = np.zeros((k, 3, 3))
    tx[:, 0, 1], tx[:, 0, 2], tx[:, 1, 2] = -t[:, 2], t[:, 1], -t[:, 0]
    tx[:, 1, 0], tx[:, 2, 0], tx[:, 2, 1] = t[:, 2], -t[:, 1], t[:, 0]
    Ad = np.zeros((k, 7, 7))
    Ad[:, :3, :3] = T[:, 7, None, None] * R
    Ad[:, :3, 3:6] = tx @ R
    Ad[:, :3, 6] = -t
    Ad[:, 3:6, 3:6] = R
    Ad[:, 6, 6] = 1.0
    return Ad
