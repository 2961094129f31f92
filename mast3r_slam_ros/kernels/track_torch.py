"""PyTorch implementation of the frame-to-keyframe tracking linearization (reference of ``csrc/track_kernels.cu``).

One IRLS Gauss–Newton linearization of the relative pose ``T = T_CkCf`` (frame -> keyframe, Sim(3), left perturbation
``Exp(ξ)·T``, tangent order τ, ω, σ), reduced to the 7×7 normal equations and packed for one device-to-host copy:

``[58]`` float64 = ``H = AᵀA`` (49, row-major), ``Aᵀb`` (7), ``bᵀb`` (1), number of rows with non-zero weight (1),
with ``A = s⊙J``, ``b = s⊙r``, ``s = sqrt_info·sqrt(huber_weight(sqrt_info·r))`` (per-row terms in float32, products
and sums in float64).

Two residual models (spec ``upstream_algorithm.md`` §5.2, §5.3; paper: Murai et al., "MASt3R-SLAM", CVPR 2025, §3.3):

- :func:`ray_dist_residual`: ``r = rd(Xk) − rd(T·Xf)``, ``rd(X) = [X/|X|, |X|]`` (uncalibrated);
- :func:`calib_residual`: ``r = [u_k, v_k, log z_k] − π_K(T·Xf)`` (calibrated pixel + log-depth).

The Huber IRLS weight is spec §5.4. Public entry points with argument checks and CUDA dispatch:
``mast3r_slam_ros.kernels.track_system_rays`` / ``track_system_calib``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mast3r_slam_ros.lie import Sim3

#: length of the packed normal equations
PACKED_LEN = 58


def huber_weight(x: Tensor, k: float) -> Tensor:
    """IRLS Huber weight, elementwise: 1 if ``|x| < k`` else ``k/|x|`` (spec §5.4)."""
    a = x.abs()
    return torch.where(a < k, torch.ones_like(a), k / a.clamp_min(1e-30))


def _skew(v: Tensor) -> Tensor:
    """``[N,3] -> [N,3,3]`` cross-product matrices."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack([torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1), torch.stack([-y, x, z], -1)], -2)


def point_jacobian(P: Tensor) -> Tensor:
    """``∂(Exp(ξ)·T·p)/∂ξ`` at ``ξ = 0`` for transformed points ``P = T·p`` ``[N,3]`` -> ``[N,3,7]`` = ``[I, −[P]×, P]``
    (tangent order τ, ω, σ; spec §9.1 ``act_jacobian``)."""
    eye = torch.eye(3, dtype=P.dtype, device=P.device).expand(P.shape[0], 3, 3)
    return torch.cat([eye, -_skew(P), P.unsqueeze(-1)], dim=-1)


def ray_dist_residual(T: Sim3, Xf: Tensor, Xk: Tensor) -> tuple[Tensor, Tensor]:
    """Ray + distance residual and Jacobian (spec §5.2).

    Args: T ``Sim3 [1]`` (frame -> keyframe), Xf ``[N,3]``, Xk ``[N,3]``.
    Returns: ``r [N,4] = rd(Xk) − rd(T·Xf)`` with ``rd(X) = [X/|X|, |X|]`` and ``J [N,4,7] = ∂r/∂ξ`` for the left
    perturbation ``Exp(ξ)·T`` (tangent τ, ω, σ).
    """
    dk = torch.linalg.norm(Xk, dim=-1, keepdim=True)
    rd_k = torch.cat([Xk / dk.clamp_min(1e-12), dk], dim=-1)
    P = T.act(Xf)
    d = torch.linalg.norm(P, dim=-1, keepdim=True).clamp_min(1e-12)
    ray = P / d
    r = rd_k - torch.cat([ray, d], dim=-1)
    eye = torch.eye(3, dtype=P.dtype, device=P.device)
    dray = (eye - ray.unsqueeze(-1) * ray.unsqueeze(-2)) / d.unsqueeze(-1)  # [N,3,3]
    drd = torch.cat([dray, ray.unsqueeze(-2)], dim=-2)  # [N,4,3]
    return r, -(drd @ point_jacobian(P))


def calib_residual(T: Sim3, Xf: Tensor, meas_k: Tensor, K: Tensor, img_size: tuple[int, int], pixel_border: float,
                   z_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel + log-depth residual and Jacobian (spec §5.3).

    Args: T ``Sim3 [1]``, Xf ``[N,3]`` (ray-constrained frame points), meas_k ``[N,3]`` ``(u, v, log z)``, K ``[3,3]``,
    img_size ``(H, W)``, pixel_border (−10: projections may fall 10 px outside), z_eps (min depth).
    Returns: ``r [N,3] = meas_k − [fx x/z + cx, fy y/z + cy, log z]`` (log z := 0 where z ≤ z_eps), ``J [N,3,7] = ∂r/∂ξ``
    and ``valid_proj [N,1]`` bool (inside the border-extended image and z > z_eps).
    """
    H, W = int(img_size[0]), int(img_size[1])
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    b = float(pixel_border)
    P = T.act(Xf)
    x, y, z = P[:, 0:1], P[:, 1:2], P[:, 2:3]
    zpos = z > z_eps
    zs = torch.where(zpos, z, torch.ones_like(z))
    u = fx * x / zs + cx
    v = fy * y / zs + cy
    logz = torch.where(zpos, torch.log(zs), torch.zeros_like(z))
    valid_proj = (u > b) & (u < W - 1 - b) & (v > b) & (v < H - 1 - b) & zpos
    r = meas_k - torch.cat([u, v, logz], dim=-1)
    zero = torch.zeros_like(x)
    dpred = torch.stack([
        torch.cat([fx / zs, zero, -fx * x / zs**2], -1),
        torch.cat([zero, fy / zs, -fy * y / zs**2], -1),
        torch.cat([zero, zero, 1 / zs], -1)], dim=-2)  # [N,3,3]
    return r, -(dpred @ point_jacobian(P)), valid_proj


def normal_equations(J: Tensor, r: Tensor, sqrt_info: Tensor, huber: float) -> Tensor:
    """IRLS normal equations reduced on the tensors' device, packed for one device-to-host copy.

    Args: J ``[N,m,7]``, r ``[N,m]``, sqrt_info ``[N,m]`` (0 for unused rows), huber threshold on ``sqrt_info·r``.
    Returns: ``[58]`` float64 = ``H = AᵀA`` (49, row-major), ``Aᵀb`` (7), ``bᵀb`` (1), number of rows (pixels) with
    non-zero weight (1), ``A = s⊙J``, ``b = s⊙r``, ``s = sqrt_info·sqrt(w)`` (``A``, ``b`` formed in J's dtype, then
    float64).
    """
    w = huber_weight(sqrt_info * r, huber)
    s = sqrt_info * torch.sqrt(w)
    A = (s.unsqueeze(-1) * J).reshape(-1, 7).double()
    b = (s * r).reshape(-1, 1).double()
    n_valid = (sqrt_info.abs().sum(-1) > 0).sum().double()
    return torch.cat([(A.T @ A).reshape(-1), (A.T @ b).reshape(-1), (b * b).sum().reshape(1), n_valid.reshape(1)])


def track_system_rays_torch(T: Tensor, Xf: Tensor, Xk: Tensor, sqrt_info: Tensor, huber: float) -> Tensor:
    """Packed normal equations of the ray + distance cost (see ``kernels.track_system_rays``).

    Args: T ``[1,8]`` Sim(3) data, Xf/Xk ``[N,3]``, sqrt_info ``[N,4]``, huber. Returns: ``[58]`` float64.
    """
    r, J = ray_dist_residual(Sim3(T), Xf, Xk)
    return normal_equations(J, r, sqrt_info, huber)


def track_system_calib_torch(T: Tensor, Xf: Tensor, meas_k: Tensor, static: Tensor, sq: Tensor, base: Tensor,
                             K: Tensor, img_size: tuple[int, int], pixel_border: float, z_eps: float,
                             huber: float) -> Tensor:
    """Packed normal equations of the pixel + log-depth cost (see ``kernels.track_system_calib``).

    ``sqrt_info = (static ∧ valid_proj)·sq·base`` with ``valid_proj`` of :func:`calib_residual` at ``T``.
    Returns: ``[58]`` float64.
    """
    r, J, valid_proj = calib_residual(Sim3(T), Xf, meas_k, K, img_size, pixel_border, z_eps)
    return normal_equations(J, r, (static & valid_proj).float() * sq * base, huber)
