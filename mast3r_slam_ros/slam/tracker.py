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

import numpy as np
import torch
from torch import Tensor

from mast3r_slam_ros import geometry, kernels
from mast3r_slam_ros.kernels.track_torch import (_skew, calib_residual, huber_weight, normal_equations,  # noqa: F401
                                                 point_jacobian, ray_dist_residual, track_system_calib_torch,
                                                 track_system_rays_torch)
from mast3r_slam_ros.lie import Sim3, retr_host
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
# huber_weight, point_jacobian, ray_dist_residual, calib_residual: kernels/track_torch.py (re-exported here)


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
    norm = torch.linalg.norm(delta) if isinstance(delta, Tensor) else np.linalg.norm(np.asarray(delta, np.float64))
    small_step = float(norm) < delta_norm
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


_normal_equations = normal_equations
_ray_dist_system = track_system_rays_torch
_calib_system = track_system_calib_torch


def _host_gn_loop(system, T_host: Tensor, device: torch.device, p: TrackingParams) -> PoseResult:
    """Gauss–Newton loop with the linearization on ``device`` and the 7×7 solve on the CPU (same steps, tests and
    errors as :func:`_gn_loop`).

    Args:
        system: ``Tdev [1,8] f32 -> packed [58] f64`` on ``device`` (layout of :func:`normal_equations`); must not
            synchronize with the host.
        T_host: ``[1,8]`` float32 CPU start pose. device: where ``system`` runs. p: tracking parameters.
    Returns: :class:`PoseResult` with ``T`` on ``device`` (uploaded without a host sync).

    Host syncs: exactly one per iteration (the ``.cpu()`` of the 58 values); the pose travels host -> device with a
    non-blocking copy. The Cholesky solve (NumPy) and the retraction (:func:`lie.retr_host`) run in float64 on the
    host copy of the pose: ~30 µs per iteration instead of ~0.7 ms of tiny tensor ops.
    """
    Tc = [float(v) for v in T_host.reshape(8).tolist()]  # float64 host pose
    old_cost = math.inf
    it, conv, cost, n_valid = 0, False, math.inf, 0
    for step in range(int(p.max_iters)):
        Tdev = torch.tensor(Tc, dtype=torch.float32).reshape(1, 8).to(device, non_blocking=True)
        packed = system(Tdev).cpu().numpy()
        cost, n_valid = 0.5 * float(packed[56]), int(packed[57])
        if not np.isfinite(packed).all():
            raise TrackingFailure("non-finite tracking normal equations (NaN/inf residuals)")
        H, g = packed[:49].reshape(7, 7), -packed[49:56]
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            raise TrackingFailure("Cholesky of the 7x7 tracking system failed (not positive definite); too few "
                                  "constraints") from None
        delta = np.linalg.solve(L.T, np.linalg.solve(L, g))
        if not np.isfinite(delta).all():
            raise TrackingFailure("non-finite Gauss-Newton step")
        Tc = retr_host(Tc, delta)
        if not all(math.isfinite(v) for v in Tc):
            raise TrackingFailure("pose became non-finite during Gauss-Newton")
        it = step + 1
        if _converged(step, old_cost, cost, delta, p.rel_error, p.delta_norm):
            conv = True
            break
        old_cost = cost
    T_out = torch.tensor(Tc, dtype=torch.float32).reshape(1, 8).to(device, non_blocking=True)
    return PoseResult(T=Sim3(T_out), iterations=it, converged=conv, cost=cost, n_valid=n_valid)


def _graphed_gn_loop(key: tuple, system_fn, tensors: list[Tensor], T: Sim3, p: TrackingParams,
                     fused: tuple[str, Any] | None = None) -> PoseResult | None:
    """Device Gauss–Newton loop (:func:`_host_gn_loop`) for CUDA tensors: the linearization + normal equations run as
    the fused CUDA kernel when ``fused = (op, fn)`` is given and the CUDA kernel backend provides ``op``
    (``kernels.cuda_op_available``; ``fn(Tdev, *tensors)`` calls ``kernels.track_system_rays``/``track_system_calib``),
    else ``system_fn`` replayed from a CUDA graph (fixed ``N``;
    ``network.graphs.graphed_function``). Returns None (caller runs the eager loop) for CPU tensors, or when neither
    the kernel nor a graph is available (``MAST3R_SLAM_ROS_CUDA_GRAPHS=0``, capture failed).

    ``T`` may be on the CPU (no sync; the tracker passes the pose it read back with its frame statistics) or on the
    device (one extra device-to-host copy). The result's pose is on the tensors' device.

    Why: one linearization is ~100 small kernels on ``HW`` rows; launched eagerly from Python the tracking solve was
    CPU-bound (docs/performance.md); the fused kernel is one pass over the rows plus a tiny reduction.
    """
    device = tensors[0].device
    if tuple(T.data.shape) != (1, 8) or device.type != "cuda":
        return None
    T_host = T.data.detach().to("cpu", torch.float32)
    if fused is not None and kernels.cuda_op_available(fused[0]):
        fn = fused[1]
        return _host_gn_loop(lambda Td: fn(Td, *tensors), T_host, device, p)
    from mast3r_slam_ros.network.graphs import graphed_function

    graph = graphed_function(key, system_fn, [T_host.to(device, non_blocking=True), *tensors])
    if graph is None:
        return None
    return _host_gn_loop(lambda Td: graph(Td, *tensors), T_host, device, p)


def _to_device(values: list[float], like: Tensor) -> Tensor:
    """Small float32 constant on ``like``'s device without a host sync (``torch.tensor(..., device=cuda)`` blocks)."""
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- the two cost types
def opt_pose_ray_dist_sim3(Xf: Tensor, Xk: Tensor, T_CkCf: Sim3, Qk: Tensor, valid: Tensor,
                           params: TrackingParams | None = None) -> PoseResult:
    """Uncalibrated ray + distance Sim(3) tracking (spec §5.2).

    Args:
        Xf: ``[N,3]`` frame canonical points gathered at the match of each keyframe pixel (frame camera coordinates).
        Xk: ``[N,3]`` keyframe canonical points (keyframe camera coordinates).
        T_CkCf: initial ``Sim3 [1]`` frame -> keyframe pose (on Xf's device, or on the CPU: no sync then).
        Qk: ``[N,1]`` match confidence; valid: ``[N,1]`` bool rows to use.
    Returns: :class:`PoseResult` with the optimized ``T_CkCf`` on Xf's device.
    Raises: TrackingFailure (Cholesky failure / non-finite pose).
    """
    p = params or TrackingParams()
    Xf, Xk = Xf.float(), Xk.float()
    dk = torch.linalg.norm(Xk, dim=-1, keepdim=True)
    base = _to_device([1 / p.sigma_ray] * 3 + [1 / p.sigma_dist], Xf)
    ok = valid.bool() & (dk > 0)
    sqrt_info = ok.float() * torch.sqrt(Qk.float().clamp_min(0)) * base

    def linearize(T: Sim3):
        r, J = ray_dist_residual(T, Xf, Xk)
        return J, r, sqrt_info

    huber = float(p.huber)
    fast = _graphed_gn_loop(("track_ray", huber), functools.partial(_ray_dist_system, huber=huber),
                            [Xf.contiguous(), Xk.contiguous(), sqrt_info.contiguous()], T_CkCf, p,
                            fused=("track_system_rays", functools.partial(kernels.track_system_rays, huber=huber)))
    if fast is not None:
        return fast
    return _gn_loop(Sim3(T_CkCf.data.to(Xf.device)), linearize, p)


def opt_pose_calib_sim3(Xf: Tensor, Xk: Tensor, T_CkCf: Sim3, Qk: Tensor, valid: Tensor, meas_k: Tensor,
                        valid_meas_k: Tensor, K: Tensor, img_size: tuple[int, int],
                        params: TrackingParams | None = None) -> PoseResult:
    """Calibrated pixel + log-depth Sim(3) tracking (spec §5.3).

    Args:
        Xf: ``[N,3]`` ray-constrained frame points gathered at each keyframe pixel's match.
        Xk: ``[N,3]`` ray-constrained keyframe points (unused in the residual; measurements come from ``meas_k``).
        T_CkCf: initial ``Sim3 [1]`` (on Xf's device or the CPU); Qk ``[N,1]``; valid ``[N,1]`` bool.
        meas_k: ``[N,3]`` ``(u, v, log z)`` of each keyframe pixel; valid_meas_k ``[N,1]`` bool (z > depth_eps).
        K: ``[3,3]`` intrinsics of the network image (pixels); img_size ``(H, W)``.
    Returns: :class:`PoseResult` (pose on Xf's device). Raises: TrackingFailure.
    """
    p = params or TrackingParams()
    Xf = Xf.float()
    K = K.to(Xf.device, Xf.dtype, non_blocking=True)
    base = _to_device([1 / p.sigma_pixel] * 2 + [1 / p.sigma_depth], Xf)
    static = valid.bool() & valid_meas_k.bool()
    sq = torch.sqrt(Qk.float().clamp_min(0))
    meas_k = meas_k.float()

    def linearize(T: Sim3):
        r, J, valid_proj = calib_residual(T, Xf, meas_k, K, img_size, p.pixel_border, p.depth_eps)
        return J, r, (static & valid_proj).float() * sq * base

    hw = (int(img_size[0]), int(img_size[1]))
    huber, border, eps = float(p.huber), float(p.pixel_border), float(p.depth_eps)
    fast = _graphed_gn_loop(("track_calib", hw, border, eps, huber),
                            functools.partial(_calib_system, img_size=hw, pixel_border=border, z_eps=eps, huber=huber),
                            [Xf.contiguous(), meas_k.contiguous(), static.contiguous(), sq.contiguous(), base,
                             K.contiguous()], T_CkCf, p,
                            fused=("track_system_calib",
                                   functools.partial(kernels.track_system_calib, img_size=hw, pixel_border=border,
                                                     z_eps=eps, huber=huber)))
    if fast is not None:
        return fast
    return _gn_loop(Sim3(T_CkCf.data.to(Xf.device)), linearize, p)


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


def keyframe_counts(valid_match_k: Tensor, Qk: Tensor, idx_f2k: Tensor, Q_conf: float) -> Tensor:
    """Numerators of the keyframe rule (spec §5.7), computed on the tensors' device without a host sync.

    Args: valid_match_k ``[HW,1]`` bool, Qk ``[HW,1]``, idx_f2k ``[HW]`` int64 (frame pixel of each keyframe pixel),
    Q_conf.
    Returns: ``[2]`` int64 = ``(|valid ∧ Qk > Q_conf|, number of distinct frame pixels idx_f2k[valid])``. The distinct
    count scatters ``True`` into a ``[HW+1]`` buffer at ``where(valid, idx, HW)`` and counts the first HW entries
    (no ``torch.unique``, no boolean indexing: fixed shapes, no sync); indices outside ``[0, HW)`` are not counted.
    """
    hw = idx_f2k.numel()
    valid = valid_match_k.reshape(-1).bool()
    n_match = (valid & (Qk.reshape(-1) > Q_conf)).sum()
    idx = idx_f2k.reshape(-1).long()
    use = valid & (idx >= 0) & (idx < hw)
    hit = torch.zeros(hw + 1, dtype=torch.bool, device=idx.device)
    hit.index_fill_(0, torch.where(use, idx, torch.full_like(idx, hw)), True)
    return torch.stack([n_match, hit[:hw].sum()])


def _keyframe_rule(n_match: int, n_unique: int, hw: int, match_frac_thresh: float) -> tuple[bool, float, float]:
    match_frac = float(n_match) / hw
    unique_frac = float(n_unique) / hw
    return min(match_frac, unique_frac) < match_frac_thresh, match_frac, unique_frac


def keyframe_decision(valid_match_k: Tensor, Qk: Tensor, idx_f2k: Tensor, Q_conf: float, match_frac_thresh: float
                      ) -> tuple[bool, float, float]:
    """Keyframe rule of spec §5.7.

    Args: valid_match_k ``[HW,1]`` bool, Qk ``[HW,1]``, idx_f2k ``[HW]`` int64 (frame pixel of each keyframe pixel),
    Q_conf (1.5), match_frac_thresh (0.333).
    Returns: ``(new_kf, match_frac_k, unique_frac_f)`` with ``match_frac_k = |valid ∧ Qk > Q_conf| / HW``,
    ``unique_frac_f = |unique(idx_f2k[valid])| / HW`` and ``new_kf = min(both) < match_frac_thresh`` (counts by
    :func:`keyframe_counts`, one device-to-host copy).
    """
    n_match, n_unique = keyframe_counts(valid_match_k, Qk, idx_f2k, Q_conf).tolist()
    return _keyframe_rule(n_match, n_unique, idx_f2k.numel(), match_frac_thresh)


def frame_statistics(valid_opt: Tensor, valid_match_k: Tensor, Qk: Tensor, idx_f2k: Tensor, Q_conf: float,
                     outputs: tuple[Tensor, ...], T0: Tensor) -> Tensor:
    """Everything the tracker needs on the host before its Gauss–Newton loop, packed for ONE device-to-host copy.

    Args: valid_opt ``[HW,1]`` bool (rows used by the optimizer); valid_match_k, Qk, idx_f2k, Q_conf as
    :func:`keyframe_counts`; outputs: network outputs whose finiteness is checked (Xff, Cff, Xkf, Ckf); T0 ``[1,8]``
    start pose.
    Returns: ``[4 + 8]`` float64 on the device: ``|valid_opt|``, ``|valid ∧ Qk > Q_conf|``, distinct frame pixels,
    1.0 if every output is finite else 0.0, then ``T0`` (counts < 2^53 and float32 poses are exact in float64).
    """
    counts = keyframe_counts(valid_match_k, Qk, idx_f2k, Q_conf)
    finite = torch.stack([torch.isfinite(t).all() for t in outputs]).all()
    return torch.cat([valid_opt.sum().reshape(1).double(), counts.double(), finite.double().reshape(1),
                      T0.reshape(-1).double()])


_POINTMAP_STATE = ("X_canon", "C", "N", "N_updates", "score")


def _update_pointmap(frame: Any, X: Tensor, C: Tensor, p: TrackingParams) -> None:
    """Fuse without ``Frame.update_pointmap``'s finiteness test (a host sync): the tracker checks finiteness of the
    network outputs in its one packed read (:func:`frame_statistics`)."""
    frame.update_pointmap(X, C, p.filtering_mode, p.filtering_score, check_finite=False)


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
        self._K_dev: dict[str, Tensor] = {}

    def reset_idx_f2k(self) -> None:
        """Forget the matching warm start (after a new keyframe)."""
        self.idx_f2k = None

    def _K_on(self, device: torch.device) -> Tensor:
        """The intrinsics as float32 on ``device``, copied once (a blocking upload per frame would be a host sync)."""
        key = str(device)
        if key not in self._K_dev:
            self._K_dev[key] = self.K.to(device, torch.float32)
        return self._K_dev[key]

    def track(self, frame: Frame) -> TrackOutcome:
        """Track ``frame`` against the last keyframe: match, optimize ``T_CkCf``, fuse, decide keyframe (spec §5.1).

        On success ``frame.T_WC`` is updated, ``frame.X_canon`` is the frame-anchored pointmap ``Xff`` and the keyframe's
        pointmap absorbs ``T_CkCf·Xkf``. On failure (too few valid matches, Cholesky failure, non-finite network
        output) ``try_reloc`` is True and nothing but the frame's own pointmap changes (for non-finite network output
        not even that: its previous pointmap state is restored).

        Host syncs after matching (CUDA): one packed read of the frame statistics and the start pose
        (:func:`frame_statistics`), then one per Gauss–Newton iteration; the fusion after the solve does not sync.
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
        saved = tuple(getattr(frame, k, None) for k in _POINTMAP_STATE)
        try:
            _update_pointmap(frame, m.Xff, m.Cff, p)
        except ValueError as e:  # wrong pointmap size
            return TrackOutcome(False, True, message=f"lost: network output rejected ({e})")

        idx = m.idx_f2k
        Xf_all, Cf_all = frame.X_canon, frame.average_conf()
        Xk, Ck = kf.X_canon, kf.average_conf()
        if self.use_calib:
            K = self._K_on(Xk.device)
            Xf_all = geometry.constrain_points_to_ray((H, W), Xf_all.unsqueeze(0), K)[0]
            Xk = geometry.constrain_points_to_ray((H, W), Xk.unsqueeze(0), K)[0]
        Xf = Xf_all[idx]
        Cf = Cf_all[idx]
        valid_opt = m.valid_match_k & (Cf > p.C_conf) & (Ck > p.C_conf) & (m.Qk > p.Q_conf)
        T0 = T_WCk.inv() * Sim3(frame.T_WC.data.to(T_WCk.data))
        # the frame's single pre-solve host sync: counts, finiteness flag and start pose in one copy
        stats = frame_statistics(valid_opt, m.valid_match_k, m.Qk, idx, p.Q_conf, (m.Xff, m.Cff, m.Xkf, m.Ckf),
                                 T0.data).cpu()
        n_opt, n_match, n_unique, finite = (int(v) for v in stats[:4].tolist())
        if not finite:
            for k, v in zip(_POINTMAP_STATE, saved):
                setattr(frame, k, v)
            return TrackOutcome(False, True, message="lost: the network returned NaN/inf in the frame or keyframe "
                                                     "pointmap/confidence (Xff, Cff, Xkf, Ckf)")
        valid_frac = float(n_opt) / hw
        new_kf, match_frac, unique_frac = _keyframe_rule(n_match, n_unique, hw, p.match_frac_thresh)
        if valid_frac < p.min_match_frac:
            return TrackOutcome(False, True, match_frac, unique_frac, valid_frac,
                                message=f"lost: only {valid_frac:.3f} of pixels matched (< {p.min_match_frac})")
        T0_host = Sim3(stats[4:].to(T0.data.dtype).reshape(1, 8))
        try:
            if self.use_calib:
                meas_k, valid_meas_k = calib_measurements(Xk, (H, W), p.depth_eps)
                res = opt_pose_calib_sim3(Xf, Xk, T0_host, m.Qk, valid_opt, meas_k, valid_meas_k,
                                          self._K_on(Xk.device), (H, W), p)
            else:
                res = opt_pose_ray_dist_sim3(Xf, Xk, T0_host, m.Qk, valid_opt, p)
        except TrackingFailure as e:
            return TrackOutcome(False, True, match_frac, unique_frac, valid_frac, message=f"lost: {e}")
        T_CkCf = res.T
        with self.keyframes.lock:
            # the keyframe pose may have been moved by the backend meanwhile: anchor to its current pose
            T_WCk_now = self.keyframes[kf_idx].T_WC if kf_idx < len(self.keyframes) else T_WCk
            frame.T_WC = Sim3((Sim3(T_WCk_now.data.to(T_CkCf.data)) * T_CkCf).data.clone())
            Xkk = T_CkCf.act(m.Xkf)
            _update_pointmap(kf, Xkk, m.Ckf, p)
            if kf_idx < len(self.keyframes) and self.keyframes[kf_idx] is kf:
                self.keyframes.mark_dirty(kf_idx)
        if new_kf:
            self.reset_idx_f2k()
        return TrackOutcome(new_kf, False, match_frac, unique_frac, valid_frac, res.iterations, res.converged,
                            T_CkCf=T_CkCf)
