"""Frame-to-keyframe tracking: Sim(3) Gauss–Newton with Huber IRLS and Cholesky, fusion, keyframe decision.

Source: MASt3R-SLAM ``tracker.py:FrameTracker`` and ``nonlinear_optimizer.py`` (spec ``upstream_algorithm.md`` §5.1–5.7);
paper: Murai et al., "MASt3R-SLAM", CVPR 2025, §3.3 (tracking) and §3.4 (pointmap fusion, keyframe selection).

Two cost functions for the relative pose ``T = T_CkCf`` (frame -> keyframe, Sim(3), left retraction ``Exp(δ)·T``):

- uncalibrated ray + distance (§5.2): ``r = rd(Xk) − rd(T·Xf)`` with ``rd(X) = [X/|X|, |X|]``, weights
  ``sqrt(Q)·[1/σ_ray ×3, 1/σ_dist]``;
- calibrated pixel + log-depth (§5.3): ``r = [u_k, v_k, log z_k] − π_K(T·Xf)``, weights ``sqrt(Q)·[1/σ_pix ×2, 1/σ_depth]``,
  with both pointmaps constrained to their pixel rays (depth-only trust).

Both use IRLS with the Huber weight on the whitened residual (k = ``tracking.huber``), the 7×7 normal equations solved by
Cholesky (failure -> relocalization), convergence when the relative cost decrease or ``‖δ‖`` drops below the thresholds
(§5.4). The tracker never starts a thread.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mast3r_slam_ros import geometry
from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.frame import Frame
from mast3r_slam_ros.slam.keyframes import KeyframeStore
from mast3r_slam_ros.slam.matching import MatchParams, match_asymmetric


class TrackingFailure(RuntimeError):
    """The pose optimization failed (Cholesky of the 7×7 normal matrix, or a non-finite pose)."""


@dataclass
class TrackingParams:
    """Config section ``tracking`` (defaults of upstream ``base.yaml``, spec §10.1)."""

    min_match_frac: float = 0.05
    max_iters: int = 50
    C_conf: float = 0.0
    Q_conf: float = 1.5
    rel_error: float = 1e-3
    delta_norm: float = 1e-3
    huber: float = 1.345
    match_frac_thresh: float = 0.333
    sigma_ray: float = 0.003
    sigma_dist: float = 10.0
    sigma_pixel: float = 1.0
    sigma_depth: float = 10.0
    pixel_border: float = -10.0
    depth_eps: float = 1e-6
    filtering_mode: str = "weighted_pointmap"
    filtering_score: str = "median"

    @classmethod
    def from_config(cls, cfg: Any) -> "TrackingParams":
        """Build from ``cfg.tracking`` (a ``SlamConfig``) or any object with these attributes."""
        sec = getattr(cfg, "tracking", cfg)
        kw = {}
        for k, f in cls.__dataclass_fields__.items():
            if hasattr(sec, k):
                default = f.default
                kw[k] = type(default)(getattr(sec, k))
        return cls(**kw)


@dataclass
class PoseResult:
    """Outcome of one Sim(3) pose optimization: ``T`` (optimized ``Sim3 [1]``), ``iterations``, ``converged``, ``cost``
    (IRLS cost ``0.5·Σ(w·(s·r)²)`` at the last linearization point), ``n_valid`` (rows with non-zero weight)."""

    T: Sim3
    iterations: int
    converged: bool
    cost: float
    n_valid: int


# --------------------------------------------------------------------------------------------------------- helpers
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


def solve_step(J: Tensor, r: Tensor, sqrt_info: Tensor, huber: float) -> tuple[Tensor, float]:
    """One IRLS Gauss–Newton step (spec §5.4).

    Args:
        J: ``[N,m,7]`` Jacobian of the residual ``r`` (``∂r/∂ξ``); r: ``[N,m]`` residual ``z − h(x)``;
        sqrt_info: ``[N,m]`` square-root information (0 for invalid rows); huber: threshold on whitened residuals.
    Returns: ``(δ [7] float64, cost)`` with ``δ = −H⁻¹ Aᵀ b``, ``H = AᵀA``, ``A = s⊙J``, ``b = s⊙r``, ``s = sqrt_info·sqrt(w)``.
    Raises: TrackingFailure if the Cholesky factorization fails (rank-deficient or non-finite system).
    """
    w = huber_weight(sqrt_info * r, huber)
    s = sqrt_info * torch.sqrt(w)
    A = (s.unsqueeze(-1) * J).reshape(-1, 7).double()
    b = (s * r).reshape(-1, 1).double()
    H = A.T @ A
    g = -(A.T @ b)
    cost = 0.5 * float((b * b).sum())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0 or not torch.isfinite(L).all():
        raise TrackingFailure(f"Cholesky of the 7x7 tracking system failed (info={int(info)}); too few constraints")
    delta = torch.cholesky_solve(g, L).reshape(7)
    if not torch.isfinite(delta).all():
        raise TrackingFailure("non-finite Gauss-Newton step")
    return delta, cost


def _converged(step: int, old_cost: float, new_cost: float, delta: Tensor, rel_error: float, delta_norm: float) -> bool:
    """Upstream ``check_convergence``: relative cost decrease < rel_error or ‖δ‖ < delta_norm (at step 0 only the δ
    test can fire because the previous cost is +inf)."""
    small_step = float(torch.linalg.norm(delta)) < delta_norm
    if step == 0 or not math.isfinite(old_cost) or old_cost <= 0.0:
        return small_step
    return abs(old_cost - new_cost) / old_cost < rel_error or small_step


def _gn_loop(T: Sim3, linearize, p: TrackingParams) -> PoseResult:
    old_cost = math.inf
    it, conv, cost, n_valid = 0, False, math.inf, 0
    for step in range(int(p.max_iters)):
        J, r, sqrt_info = linearize(T)
        n_valid = int((sqrt_info.abs().sum(-1) > 0).sum())
        delta, cost = solve_step(J, r, sqrt_info, p.huber)
        T = T.retr(delta.to(T.data.dtype).reshape(1, 7))
        if not torch.isfinite(T.data).all():
            raise TrackingFailure("pose became non-finite during Gauss-Newton")
        it = step + 1
        if _converged(step, old_cost, cost, delta, p.rel_error, p.delta_norm):
            conv = True
            break
        old_cost = cost
    return PoseResult(T=T, iterations=it, converged=conv, cost=cost, n_valid=n_valid)


def _normal_equations(J: Tensor, r: Tensor, sqrt_info: Tensor, huber: float) -> Tensor:
    """IRLS normal equations of :func:`solve_step` reduced on the device, packed for one device-to-host copy:
    ``[58]`` float64 = ``H = AᵀA`` (49, row-major), ``Aᵀb`` (7), ``bᵀb`` (1), number of rows with non-zero weight (1)."""
    w = huber_weight(sqrt_info * r, huber)
    s = sqrt_info * torch.sqrt(w)
    A = (s.unsqueeze(-1) * J).reshape(-1, 7).double()
    b = (s * r).reshape(-1, 1).double()
    n_valid = (sqrt_info.abs().sum(-1) > 0).sum().double()
    return torch.cat([(A.T @ A).reshape(-1), (A.T @ b).reshape(-1), (b * b).sum().reshape(1), n_valid.reshape(1)])


def _ray_dist_system(Tdata: Tensor, Xf: Tensor, Xk: Tensor, sqrt_info: Tensor, huber: float) -> Tensor:
    r, J = ray_dist_residual(Sim3(Tdata), Xf, Xk)
    return _normal_equations(J, r, sqrt_info, huber)


def _calib_system(Tdata: Tensor, Xf: Tensor, meas_k: Tensor, static: Tensor, sq: Tensor, base: Tensor, K: Tensor,
                  img_size: tuple[int, int], pixel_border: float, z_eps: float, huber: float) -> Tensor:
    r, J, valid_proj = calib_residual(Sim3(Tdata), Xf, meas_k, K, img_size, pixel_border, z_eps)
    return _normal_equations(J, r, (static & valid_proj).float() * sq * base, huber)


def _graphed_gn_loop(key: tuple, system_fn, tensors: list[Tensor], T: Sim3, p: TrackingParams) -> PoseResult | None:
    """The Gauss–Newton loop of :func:`_gn_loop` with the linearization + normal equations replayed from a CUDA graph
    (fixed ``N``; ``network.graphs.graphed_function``), one device-to-host copy per iteration, the 7×7 Cholesky and
    the retraction on the CPU. Same steps, tests and errors as :func:`_gn_loop`. Returns None (caller runs the eager
    loop) for CPU tensors, without CUDA graphs (``MAST3R_SLAM_ROS_CUDA_GRAPHS=0``) or if the capture failed.

    Why: one linearization is ~100 small kernels on ``HW`` rows; launched eagerly from Python the tracking solve was
    CPU-bound (docs/performance.md).
    """
    if T.data.shape != (1, 8) or not T.data.is_cuda:
        return None
    from mast3r_slam_ros.network.graphs import graphed_function

    Tdev = T.data.detach().contiguous()
    graph = graphed_function(key, system_fn, [Tdev, *tensors])
    if graph is None:
        return None
    Tc = Sim3(T.data.detach().to("cpu"))
    old_cost = math.inf
    it, conv, cost, n_valid = 0, False, math.inf, 0
    for step in range(int(p.max_iters)):
        packed = graph(Tc.data.to(Tdev.device, non_blocking=True), *tensors).cpu()
        cost, n_valid = 0.5 * float(packed[56]), int(packed[57])
        H, g = packed[:49].reshape(7, 7), -packed[49:56].reshape(7, 1)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0 or not torch.isfinite(L).all() or not torch.isfinite(packed).all():
            raise TrackingFailure(f"Cholesky of the 7x7 tracking system failed (info={int(info)}); too few "
                                  "constraints")
        delta = torch.cholesky_solve(g, L).reshape(7)
        if not torch.isfinite(delta).all():
            raise TrackingFailure("non-finite Gauss-Newton step")
        Tc = Tc.retr(delta.to(Tc.data.dtype).reshape(1, 7))
        if not torch.isfinite(Tc.data).all():
            raise TrackingFailure("pose became non-finite during Gauss-Newton")
        it = step + 1
        if _converged(step, old_cost, cost, delta, p.rel_error, p.delta_norm):
            conv = True
            break
        old_cost = cost
    return PoseResult(T=Sim3(Tc.data.to(T.data.device)), iterations=it, converged=conv, cost=cost, n_valid=n_valid)


# ---------------------------------------------------------------------------------------------- the two cost types
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


def opt_pose_ray_dist_sim3(Xf: Tensor, Xk: Tensor, T_CkCf: Sim3, Qk: Tensor, valid: Tensor,
                           params: TrackingParams | None = None) -> PoseResult:
    """Uncalibrated ray + distance Sim(3) tracking (spec §5.2).

    Args:
        Xf: ``[N,3]`` frame canonical points gathered at the match of each keyframe pixel (frame camera coordinates).
        Xk: ``[N,3]`` keyframe canonical points (keyframe camera coordinates).
        T_CkCf: initial ``Sim3 [1]`` frame -> keyframe pose.
        Qk: ``[N,1]`` match confidence; valid: ``[N,1]`` bool rows to use.
    Returns: :class:`PoseResult` with the optimized ``T_CkCf``.
    Raises: TrackingFailure (Cholesky failure / non-finite pose).
    """
    p = params or TrackingParams()
    Xf, Xk = Xf.float(), Xk.float()
    dk = torch.linalg.norm(Xk, dim=-1, keepdim=True)
    base = torch.tensor([1 / p.sigma_ray] * 3 + [1 / p.sigma_dist], dtype=Xf.dtype, device=Xf.device)
    ok = valid.bool() & (dk > 0)
    sqrt_info = ok.float() * torch.sqrt(Qk.clamp_min(0)) * base

    def linearize(T: Sim3):
        r, J = ray_dist_residual(T, Xf, Xk)
        return J, r, sqrt_info

    huber = float(p.huber)
    fast = _graphed_gn_loop(("track_ray", huber), functools.partial(_ray_dist_system, huber=huber),
                            [Xf.contiguous(), Xk.contiguous(), sqrt_info.contiguous()], T_CkCf, p)
    if fast is not None:
        return fast
    return _gn_loop(T_CkCf, linearize, p)


def opt_pose_calib_sim3(Xf: Tensor, Xk: Tensor, T_CkCf: Sim3, Qk: Tensor, valid: Tensor, meas_k: Tensor,
                        valid_meas_k: Tensor, K: Tensor, img_size: tuple[int, int],
                        params: TrackingParams | None = None) -> PoseResult:
    """Calibrated pixel + log-depth Sim(3) tracking (spec §5.3).

    Args:
        Xf: ``[N,3]`` ray-constrained frame points gathered at each keyframe pixel's match.
        Xk: ``[N,3]`` ray-constrained keyframe points (unused in the residual; measurements come from ``meas_k``).
        T_CkCf: initial ``Sim3 [1]``; Qk ``[N,1]``; valid ``[N,1]`` bool.
        meas_k: ``[N,3]`` ``(u, v, log z)`` of each keyframe pixel; valid_meas_k ``[N,1]`` bool (z > depth_eps).
        K: ``[3,3]`` intrinsics of the network image (pixels); img_size ``(H, W)``.
    Returns: :class:`PoseResult`. Raises: TrackingFailure.
    """
    p = params or TrackingParams()
    Xf = Xf.float()
    K = K.to(Xf.device, Xf.dtype)
    base = torch.tensor([1 / p.sigma_pixel] * 2 + [1 / p.sigma_depth], dtype=Xf.dtype, device=Xf.device)
    static = valid.bool() & valid_meas_k.bool()
    sq = torch.sqrt(Qk.clamp_min(0))

    def linearize(T: Sim3):
        r, J, valid_proj = calib_residual(T, Xf, meas_k, K, img_size, p.pixel_border, p.depth_eps)
        return J, r, (static & valid_proj).float() * sq * base

    hw = (int(img_size[0]), int(img_size[1]))
    huber, border, eps = float(p.huber), float(p.pixel_border), float(p.depth_eps)
    fast = _graphed_gn_loop(("track_calib", hw, border, eps, huber),
                            functools.partial(_calib_system, img_size=hw, pixel_border=border, z_eps=eps, huber=huber),
                            [Xf.contiguous(), meas_k.float().contiguous(), static.contiguous(), sq.contiguous(), base,
                             K.contiguous()], T_CkCf, p)
    if fast is not None:
        return fast
    return _gn_loop(T_CkCf, linearize, p)


def calib_measurements(Xk: Tensor, img_size: tuple[int, int], depth_eps: float) -> tuple[Tensor, Tensor]:
    """``meas_k [HW,3] = (u, v, log z)`` on the pixel grid (u = column, v = row) and ``valid_meas_k [HW,1] = z > eps``
    for a ray-constrained keyframe pointmap ``Xk [HW,3]`` (spec §5.3); invalid rows are zeroed."""
    H, W = int(img_size[0]), int(img_size[1])
    grid = geometry.pixel_grid(H, W, device=Xk.device, dtype=Xk.dtype).reshape(-1, 2)
    z = Xk[:, 2:3]
    valid = z > depth_eps
    logz = torch.log(torch.where(valid, z, torch.ones_like(z)))
    meas = torch.cat([grid, logz], dim=-1) * valid.float()
    return meas, valid


def keyframe_decision(valid_match_k: Tensor, Qk: Tensor, idx_f2k: Tensor, Q_conf: float, match_frac_thresh: float
                      ) -> tuple[bool, float, float]:
    """Keyframe rule of spec §5.7.

    Args: valid_match_k ``[HW,1]`` bool, Qk ``[HW,1]``, idx_f2k ``[HW]`` int64 (frame pixel of each keyframe pixel),
    Q_conf (1.5), match_frac_thresh (0.333).
    Returns: ``(new_kf, match_frac_k, unique_frac_f)`` with ``match_frac_k = |valid ∧ Qk > Q_conf| / HW``,
    ``unique_frac_f = |unique(idx_f2k[valid])| / HW`` and ``new_kf = min(both) < match_frac_thresh``.
    """
    hw = idx_f2k.numel()
    valid = valid_match_k.reshape(-1).bool()
    match_frac = float((valid & (Qk.reshape(-1) > Q_conf)).sum()) / hw
    unique_frac = float(torch.unique(idx_f2k.reshape(-1)[valid]).numel()) / hw
    return min(match_frac, unique_frac) < match_frac_thresh, match_frac, unique_frac


# ----------------------------------------------------------------------------------------------------- the tracker
@dataclass
class TrackOutcome:
    """Result of :meth:`FrameTracker.track`.

    ``new_kf`` (frame should become a keyframe), ``try_reloc`` (tracking lost -> RELOC), ``match_frac`` (valid
    keyframe matches with Q > Q_conf over HW), ``unique_frac`` (distinct frame pixels hit / HW), ``valid_frac`` (rows
    used by the optimizer / HW), ``iterations``, ``converged``, ``message`` (reason when lost).
    """

    new_kf: bool
    try_reloc: bool
    match_frac: float = 0.0
    unique_frac: float = 0.0
    valid_frac: float = 0.0
    iterations: int = 0
    converged: bool = False
    message: str = ""
    T_CkCf: Sim3 | None = field(default=None, repr=False)


class FrameTracker:
    """Tracks frames against the last keyframe (spec §5.1).

    Args:
        predictor: Predictor (``encode``/``decode``).
        keyframes: the :class:`KeyframeStore` (the last keyframe is the reference).
        cfg: ``SlamConfig`` (uses ``use_calib``, ``matching``, ``tracking``).
        K: ``[3,3]`` intrinsics of the network image when ``use_calib`` (required then).
    """

    def __init__(self, predictor: Any, keyframes: KeyframeStore, cfg: Any, K: Tensor | None = None):
        self.predictor = predictor
        self.keyframes = keyframes
        self.cfg = cfg
        self.use_calib = bool(getattr(cfg, "use_calib", False))
        if self.use_calib and K is None:
            raise ValueError("use_calib=True needs intrinsics K of the network image")
        self.K = K
        self.match_params = MatchParams.from_config(cfg)
        self.params = TrackingParams.from_config(cfg)
        self.idx_f2k: Tensor | None = None

    def reset_idx_f2k(self) -> None:
        """Forget the matching warm start (after a new keyframe)."""
        self.idx_f2k = None

    def track(self, frame: Frame) -> TrackOutcome:
        """Track ``frame`` against the last keyframe: match, optimize ``T_CkCf``, fuse, decide keyframe (spec §5.1).

        On success ``frame.T_WC`` is updated, ``frame.X_canon`` is the frame-anchored pointmap ``Xff`` and the keyframe's
        pointmap absorbs ``T_CkCf·Xkf``. On failure (too few valid matches, Cholesky failure) nothing but the frame's own
        pointmap changes and ``try_reloc`` is True.
        """
        p = self.params
        with self.keyframes.lock:
            kf = self.keyframes.last()
            kf_idx = len(self.keyframes) - 1
            T_WCk = Sim3(kf.T_WC.data.clone())
        m = match_asymmetric(self.predictor, frame, kf, self.idx_f2k, self.match_params)
        self.idx_f2k = m.idx_f2k.clone().reshape(1, -1)
        H, W = frame.height, frame.width
        hw = H * W
        frame.update_pointmap(m.Xff, m.Cff, p.filtering_mode, p.filtering_score)

        idx = m.idx_f2k
        Xf_all, Cf_all = frame.X_canon, frame.average_conf()
        Xk, Ck = kf.X_canon, kf.average_conf()
        if self.use_calib:
            K = self.K.to(Xk.device, torch.float32)
            Xf_all = geometry.constrain_points_to_ray((H, W), Xf_all.unsqueeze(0), K)[0]
            Xk = geometry.constrain_points_to_ray((H, W), Xk.unsqueeze(0), K)[0]
        Xf = Xf_all[idx]
        Cf = Cf_all[idx]
        valid_opt = m.valid_match_k & (Cf > p.C_conf) & (Ck > p.C_conf) & (m.Qk > p.Q_conf)
        valid_kf = m.valid_match_k & (m.Qk > p.Q_conf)
        valid_frac = float(valid_opt.sum()) / hw
        new_kf, match_frac, unique_frac = keyframe_decision(m.valid_match_k, m.Qk, idx, p.Q_conf,
                                                            p.match_frac_thresh)
        if valid_frac < p.min_match_frac:
            return TrackOutcome(False, True, match_frac, unique_frac, valid_frac,
                                message=f"lost: only {valid_frac:.3f} of pixels matched (< {p.min_match_frac})")
        T0 = T_WCk.inv() * Sim3(frame.T_WC.data.to(T_WCk.data))
        try:
            if self.use_calib:
                meas_k, valid_meas_k = calib_measurements(Xk, (H, W), p.depth_eps)
                res = opt_pose_calib_sim3(Xf, Xk, T0, m.Qk, valid_opt, meas_k, valid_meas_k, self.K, (H, W), p)
            else:
                res = opt_pose_ray_dist_sim3(Xf, Xk, T0, m.Qk, valid_opt, p)
        except TrackingFailure as e:
            return TrackOutcome(False, True, match_frac, unique_frac, valid_frac, message=f"lost: {e}")
        T_CkCf = res.T
        with self.keyframes.lock:
            # the keyframe pose may have been moved by the backend meanwhile: anchor to its current pose
            T_WCk_now = self.keyframes[kf_idx].T_WC if kf_idx < len(self.keyframes) else T_WCk
            frame.T_WC = Sim3((Sim3(T_WCk_now.data.to(T_CkCf.data)) * T_CkCf).data.clone())
            Xkk = T_CkCf.act(m.Xkf)
            kf.update_pointmap(Xkk, m.Ckf, p.filtering_mode, p.filtering_score)
            if kf_idx < len(self.keyframes) and self.keyframes[kf_idx] is kf:
                self.keyframes.mark_dirty(kf_idx)
        if new_kf:
            self.reset_idx_f2k()
        return TrackOutcome(new_kf, False, match_frac, unique_frac, valid_frac, res.iterations, res.converged,
                            T_CkCf=T_CkCf)
