"""Kernels of mast3r_slam_ros: projective matching, descriptor refinement and the global Gauss–Newton solves.

Every operation has ONE documented signature here and two implementations behind it:

- ``cuda``: the compiled extension ``mast3r_slam_ros._cuda`` built from ``csrc/`` (CUDA tensors only). For the
  Gauss–Newton solves the extension computes the per-edge 7×7 Hessian blocks and gradients on the GPU; assembly of
  the reduced system, the solve and the retraction are the same code as in the torch implementation
  (:func:`.gn_torch.gn_solve`: on the host in float64 for up to ``HOST_MAX_KF`` free keyframes, one device->host
  copy of the blocks per iteration; in tensors on the device above that).
- ``torch``: pure PyTorch (CPU or GPU), vectorized over pixels; also the reference in the tests.

The tracking linearizations (:func:`track_system_rays`, :func:`track_system_calib`) are one fused kernel each on CUDA
(``csrc/track_kernels.cu``) and :mod:`.track_torch` otherwise; an extension built before they existed still loads and
these two then run through PyTorch.

Selection: :func:`set_backend` with ``"auto"`` (CUDA extension if it loads and the inputs are CUDA tensors, else torch),
``"cuda"`` (error if the extension is unavailable; CPU inputs still run through torch because the extension has no
CPU code) or ``"torch"``. The SLAM system calls ``set_backend(cfg.runtime.kernel_backend)``.

Spec: ``upstream_algorithm.md`` §4.2, §4.4, §4.6 (matching), §6.3–§6.8 (global optimization), §9 (Sim(3)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from .gn_torch import cuda_blocks, gn_blocks_calib_torch, gn_blocks_points_torch, gn_blocks_rays_torch, gn_solve
from .matching_torch import iter_proj_torch, refine_initial_best, refine_matches_torch
from .result import GNResult
from .track_torch import track_system_calib_torch, track_system_rays_torch

__all__ = [
    "backend", "set_backend", "cuda_available", "iter_proj", "refine_matches", "gauss_newton_rays",
    "gauss_newton_calib", "gauss_newton_points", "GNResult", "refine_initial_best", "track_system_rays",
    "track_system_calib", "cuda_op_available",
]

_MODE = "auto"
_MODES = ("auto", "cuda", "torch")


def set_backend(mode: str) -> None:
    """Select the kernel implementation: ``"auto"`` | ``"cuda"`` | ``"torch"`` (config ``runtime.kernel_backend``).

    Raises:
        ValueError: unknown mode.
        RuntimeError: ``"cuda"`` requested but the extension cannot be loaded (the message says why).
    """
    global _MODE
    if not isinstance(mode, str) or mode.strip().lower() not in _MODES:
        raise ValueError(f"kernel backend must be one of {_MODES}, got {mode!r}")
    mode = mode.strip().lower()
    if mode == "cuda" and _ext.load() is None:
        raise RuntimeError("kernel_backend 'cuda' requested but the CUDA extension mast3r_slam_ros._cuda is not "
                           f"available ({_ext.load_error() or 'not built'}); build it with "
                           "MAST3R_SLAM_ROS_BUILD_CUDA=1 "
                           "or use 'auto'/'torch'")
    _MODE = mode


def cuda_available() -> bool:
    """True if the compiled extension loaded (and CUDA is available)."""
    return _ext.load() is not None


def cuda_op_available(name: str) -> bool:
    """True if CUDA tensors passed to the operation ``name`` (e.g. ``"track_system_rays"``) run the compiled kernel:
    the backend is ``"cuda"`` (see :func:`backend`) and the loaded extension exports it (an extension built before an
    optional kernel existed lacks it; that operation then runs through PyTorch)."""
    return backend() == "cuda" and _ext.has(name)


def backend() -> str:
    """The implementation used for CUDA tensors: ``"cuda"`` (extension) or ``"torch"``. CPU tensors always use torch."""
    if _MODE == "torch":
        return "torch"
    return "cuda" if _ext.load() is not None else "torch"


def _use_cuda(*tensors: Tensor) -> bool:
    return backend() == "cuda" and all(t.is_cuda for t in tensors)


# -------------------------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, dtypes: tuple, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_same_device(**tensors: Tensor) -> None:
    devs = {k: v.device for k, v in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on the same device, got {devs}")


def _check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------------------------ matching
def iter_proj(rays_with_grad: Tensor, pts3d_norm: Tensor, p_init: Tensor, max_iter: int, lambda_init: float,
              cost_thresh: float) -> tuple[Tensor, Tensor]:
    """Iterative projective matching: per-pixel LM on the unit-ray error (spec §4.2).

    For each target ray ``t = pts3d_norm[b,n]`` (a point of image 2 expressed in camera 1, normalized) find the
    sub-pixel position ``(u, v)`` in image 1 whose bilinearly interpolated ray points at it, starting from
    ``p_init[b,n]``. Positions are clamped to ``u∈[1,W-2], v∈[1,H-2]``; λ starts at ``lambda_init`` and is ×0.1 on an
    accepted step and ×10 on a rejected one; exactly ``max_iter`` iterations.

    Args:
        rays_with_grad: ``[B,H,W,9]`` float32 — unit rays of image 1 (camera-1 frame) and their ∂/∂u, ∂/∂v
            (Scharr/32 image gradients), channels ``[ray(3), d/du(3), d/dv(3)]``.
        pts3d_norm: ``[B,HW,3]`` float32 — unit target rays.
        p_init: ``[B,HW,2]`` float32 — initial ``(u, v)`` pixel coordinates in image 1 (u = column).
        max_iter: iterations (upstream 10). lambda_init: initial λ (1e-8). cost_thresh: on ``|r-t|²`` (1e-6).

    Returns:
        ``(p [B,HW,2] float32, converged [B,HW] bool)`` on the input device; ``converged`` is the last iteration's
        test ``cost < cost_thresh``.

    Raises:
        TypeError / ValueError: wrong type, dtype, rank, shape, device or parameters (H, W must be ≥ 3).
    """
    _check_tensor("rays_with_grad", rays_with_grad, (torch.float32,), 4)
    _check_tensor("pts3d_norm", pts3d_norm, (torch.float32,), 3)
    _check_tensor("p_init", p_init, (torch.float32,), 3)
    B, H, W, C = rays_with_grad.shape
    if C != 9:
        raise ValueError(f"rays_with_grad must have 9 channels [ray, d/du, d/dv], got {C}")
    if H < 3 or W < 3:
        raise ValueError(f"image must be at least 3x3 for iter_proj, got H={H}, W={W}")
    _check_shape("pts3d_norm", pts3d_norm, (B, H * W, 3))
    _check_shape("p_init", p_init, (B, H * W, 2))
    _check_same_device(rays_with_grad=rays_with_grad, pts3d_norm=pts3d_norm, p_init=p_init)
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if _use_cuda(rays_with_grad):
        ext = _ext.load()
        p, conv = ext.iter_proj(rays_with_grad.contiguous(), pts3d_norm.contiguous(), p_init.contiguous(),
                                int(max_iter), float(lambda_init), float(cost_thresh))
        return p, conv
    return iter_proj_torch(rays_with_grad, pts3d_norm, p_init, int(max_iter), float(lambda_init), float(cost_thresh))


def refine_matches(D11: Tensor, D21: Tensor, p1: Tensor, radius: int, dilation_max: int) -> Tensor:
    """Dilated local descriptor search around each match (spec §4.4).

    For each image-2 pixel n with current match ``p1[b,n] = (u, v)`` in image 1, for ``d = dilation_max..1`` test the
    in-image candidates ``(u, v) + d·(i, j)``, ``i, j ∈ {-radius..radius}``, keep the one with the highest descriptor
    dot product ``D11[b,v',u']·D21[b,n]`` and recenter on it before the next level.

    Tie / initial-best rule (kept from upstream, identical in both implementations): strict ``>`` against a running
    best that starts at 0 for float16 and at the smallest positive normal for float32/float64
    (:func:`refine_initial_best`) and is not reset between levels; candidates are visited with the u offset in the
    outer loop. Hence candidates with a non-positive score never win (a pixel whose scores are all ≤ 0 stays put),
    and on exact ties the first candidate visited wins. Scores are accumulated sequentially over channels in float32
    (float16/float32 inputs; exact products for float16) or float64 (float64 inputs).

    Args:
        D11: ``[B,H,W,F]`` float16 | float32 | float64 — descriptors of image 1.
        D21: ``[B,HW,F]`` same dtype — descriptors of image 2 (by pixel).
        p1: ``[B,HW,2]`` int64 — matches ``(u, v)`` in image 1 (integer pixels, normally in the image).
        radius: ≥ 0 (upstream 3). dilation_max: ≥ 1 (upstream 5).

    Returns:
        ``p1_new [B,HW,2]`` int64.

    Raises:
        TypeError / ValueError: wrong type, dtype, rank, shape, device or parameters.
    """
    _check_tensor("D11", D11, (torch.float16, torch.float32, torch.float64), 4)
    _check_tensor("D21", D21, (D11.dtype,), 3)
    _check_tensor("p1", p1, (torch.int64,), 3)
    B, H, W, F = D11.shape
    _check_shape("D21", D21, (B, H * W, F))
    _check_shape("p1", p1, (B, H * W, 2))
    _check_same_device(D11=D11, D21=D21, p1=p1)
    if int(radius) < 0 or int(dilation_max) < 1:
        raise ValueError(f"need radius >= 0 and dilation_max >= 1, got radius={radius}, dilation_max={dilation_max}")
    if _use_cuda(D11):
        ext = _ext.load()
        return ext.refine_matches(D11.contiguous(), D21.contiguous(), p1.contiguous(), int(radius), int(dilation_max))
    return refine_matches_torch(D11, D21, p1, int(radius), int(dilation_max))


# ------------------------------------------------------------------------------------------------------- Gauss–Newton
def _check_graph(Twc, Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q) -> tuple[int, int, int, tuple, Tensor | None]:
    """Validate the inputs of ``gauss_newton_*`` once per solve without host syncs on large tensors.

    Shapes, dtypes and devices are checked on the metadata. ``ii, jj`` ([2E], tiny) are copied to the host once (the
    host Gauss–Newton loop needs them there anyway) and range-checked there. The matched-pixel index range of
    ``idx_ii2jj`` (``[2E,HW]``) is counted by ONE fused device reduction over bool temporaries (no int64 ``[2E,HW]``
    temporary): with the CUDA extension the count is NOT read here but returned and read back together with the first
    iteration's blocks (the kernels skip out-of-range indices, so evaluating them first is safe; the solve then raises
    ``ValueError`` before any pose changes); on CPU tensors or the PyTorch backend on CUDA (whose gather would fail
    on a bad index) it is read immediately.

    Returns:
        ``(n, HW, 2E, (ii, jj) as int64 NumPy arrays, deferred index-check count tensor or None)``.
    """
    _check_tensor("Twc", Twc, (torch.float32,), 2)
    n = Twc.shape[0]
    if Twc.shape[1] != 8:
        raise ValueError(f"Twc must be [n,8] (tx,ty,tz,qx,qy,qz,qw,s), got {tuple(Twc.shape)}")
    if not Twc.is_contiguous():
        raise ValueError("Twc must be contiguous (it is updated in place)")
    _check_tensor("Xs", Xs, (torch.float32,), 3)
    HW = Xs.shape[1]
    _check_shape("Xs", Xs, (n, HW, 3))
    _check_tensor("Cs", Cs, (torch.float32,), 3)
    _check_shape("Cs", Cs, (n, HW, 1))
    _check_tensor("ii", ii, (torch.int64,), 1)
    _check_tensor("jj", jj, (torch.int64,), 1)
    E2 = ii.shape[0]
    _check_shape("jj", jj, (E2,))
    _check_tensor("idx_ii2jj", idx_ii2jj, (torch.int64,), 2)
    _check_shape("idx_ii2jj", idx_ii2jj, (E2, HW))
    _check_tensor("valid_match", valid_match, (torch.bool,), 3)
    _check_shape("valid_match", valid_match, (E2, HW, 1))
    _check_tensor("Q", Q, (torch.float32,), 3)
    _check_shape("Q", Q, (E2, HW, 1))
    _check_same_device(Twc=Twc, Xs=Xs, Cs=Cs, ii=ii, jj=jj, idx_ii2jj=idx_ii2jj, valid_match=valid_match, Q=Q)
    ij = torch.stack((ii, jj)).cpu().numpy()  # [2,2E] int64: the one small device -> host copy of the checks
    ii_h, jj_h = ij[0], ij[1]
    index_check = None
    if E2 > 0:
        lo, hi = int(ij.min()), int(ij.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"ii/jj must be row indices into Twc (0..{n - 1}), got range [{lo}, {hi}]")
        if bool((ii_h == jj_h).any()):
            raise ValueError("an edge connects a keyframe to itself (ii == jj)")
        if HW > 0:  # only matched pixels must index a pixel (unmatched ones read pixel 0)
            count = torch.count_nonzero(valid_match[..., 0] & ((idx_ii2jj < 0) | (idx_ii2jj >= HW)))
            if _use_cuda(Twc):
                index_check = count  # read with the first iteration's blocks (see above)
            elif int(count) != 0:
                raise ValueError(f"idx_ii2jj must be pixel indices in [0, {HW}) wherever valid_match is set; "
                                 f"{int(count)} matched pixels are out of range")
    return n, HW, E2, (ii_h, jj_h), index_check


def _contig(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


def _check_common(max_iter, delta_thresh, **sigmas) -> None:
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    for k, s in sigmas.items():
        if not float(s) > 0:
            raise ValueError(f"{k} must be > 0, got {s}")
    if float(delta_thresh) < 0:
        raise ValueError(f"delta_thresh must be >= 0, got {delta_thresh}")


def _solve_cuda(fn, cargs: tuple, Twc: Tensor, ii: Tensor, jj: Tensor, max_iter, delta_thresh, edges_host,
                index_check, host_max_kf: int | None = None) -> GNResult:
    """:func:`gn_solve` with the CUDA blocks kernel ``fn(Tij [2E,8] f32, *cargs) -> sums [2E,36] f64``: the host loop
    uploads ``T_ij`` computed on the host (``tij_blocks``); the device loop computes it from ``Twc`` (``blocks``)."""
    def blocks(T):
        return cuda_blocks(fn, T, ii, jj, *cargs)

    def tij_blocks(Tij):
        return fn(Tij, *cargs)
    kw = {} if host_max_kf is None else {"host_max_kf": int(host_max_kf)}
    return gn_solve(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), tij_blocks=tij_blocks,
                    index_check=index_check, edges_host=edges_host, **kw)


def gauss_newton_rays(Twc: Tensor, Xs: Tensor, Cs: Tensor, ii: Tensor, jj: Tensor, idx_ii2jj: Tensor,
                      valid_match: Tensor, Q: Tensor, sigma_ray: float, sigma_dist: float, C_thresh: float,
                      Q_thresh: float, max_iter: int, delta_thresh: float) -> GNResult:
    """Global Sim(3) Gauss–Newton on ray + distance residuals (uncalibrated; spec §6.3, §6.4, §6.7, §6.8).

    Directed edge e: pixel k of keyframe ``jj[e]`` matches pixel ``m = idx_ii2jj[e,k]`` of keyframe ``ii[e]``.
    Residual ``[P/|P| − X_i,m/|X_i,m| ; |P| − |X_i,m|]`` with ``P = (T_i⁻¹ T_j)·X_j,k`` (canonical pointmaps in each
    keyframe's camera frame), Huber (1.345) IRLS weights on the whitened residuals ``√Q/σ · r``; pixels count only if
    ``valid_match ∧ Q > Q_thresh ∧ C_i,m > C_thresh ∧ C_j,k > C_thresh``. Variables: left perturbations of each
    ``T_WC`` except row 0 (gauge). Each iteration: per-edge 7×7 blocks (GPU kernel or PyTorch), dense reduced system
    in float64, Cholesky (damped retry on failure), ``T ← Exp(dx)·T``; stop when ``‖dx‖ < delta_thresh``.

    Args:
        Twc: ``[n,8]`` float32 contiguous, ``[tx,ty,tz,qx,qy,qz,qw,s]`` — **updated in place**.
        Xs: ``[n,HW,3]`` float32 canonical pointmaps (camera frame of each keyframe). Cs: ``[n,HW,1]`` float32
            confidences. ii, jj: ``[2E]`` int64 row indices into Twc. idx_ii2jj: ``[2E,HW]`` int64.
            valid_match: ``[2E,HW,1]`` bool. Q: ``[2E,HW,1]`` float32 match confidences.
        sigma_ray (0.003), sigma_dist (10): residual std devs. C_thresh, Q_thresh: validity thresholds.
        max_iter: GN iterations (10). delta_thresh: stop when ``‖dx‖`` below it (1e-8).

    Returns:
        :class:`GNResult`; ``ok=False`` with a message if the system could not be solved even with damping (the
        poses keep their last good value; never a silent zero step).

    Raises:
        TypeError / ValueError: inconsistent inputs (names the argument).
    """
    _check_common(max_iter, delta_thresh, sigma_ray=sigma_ray, sigma_dist=sigma_dist)
    n, HW, E2, edges_host, index_check = _check_graph(Twc, Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q)
    args = dict(Xs=Xs, Cs=Cs, ii=ii, jj=jj, idx=idx_ii2jj, valid=valid_match, Q=Q, sigma_ray=float(sigma_ray),
                sigma_dist=float(sigma_dist), C_thresh=float(C_thresh), Q_thresh=float(Q_thresh))
    if _use_cuda(Twc):
        ext = _ext.load()
        cargs = (*_contig(Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q), float(sigma_ray), float(sigma_dist),
                 float(C_thresh), float(Q_thresh))
        return _solve_cuda(ext.gn_rays_blocks, cargs, Twc, ii, jj, max_iter, delta_thresh, edges_host, index_check)

    def blocks(T):
        return gn_blocks_rays_torch(T, **args)
    return gn_solve(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), edges_host=edges_host)


def gauss_newton_calib(Twc: Tensor, Xs: Tensor, Cs: Tensor, K: Tensor, ii: Tensor, jj: Tensor, idx_ii2jj: Tensor,
                       valid_match: Tensor, Q: Tensor, height: int, width: int, pixel_border: int, z_eps: float,
                       sigma_pixel: float, sigma_depth: float, C_thresh: float, Q_thresh: float, max_iter: int,
                       delta_thresh: float) -> GNResult:
    """Global Sim(3) Gauss–Newton on pixel + log-depth residuals (calibrated; spec §6.3, §6.5, §6.7, §6.8).

    Residual ``[u − u_m, v − v_m, log P_z − log X_i,m,z]`` with ``P = (T_i⁻¹ T_j)·X_j,k`` projected by ``K``
    (``u_m = m % width``, ``v_m = m // width``). A pixel counts if valid as in :func:`gauss_newton_rays` and the
    projection lies in ``(b, W−1−b) × (b, H−1−b)`` (``b = pixel_border``, upstream −10) and both depths exceed
    ``z_eps``. The caller passes ``Xs`` already constrained to the rays of ``K`` (§5.3).

    Args:
        as :func:`gauss_newton_rays`, plus ``K [3,3]`` float32 intrinsics of the network image (same device),
        ``height, width`` (network image size, ``height*width == HW``), ``pixel_border``, ``z_eps``,
        ``sigma_pixel`` (1), ``sigma_depth`` (10).

    Returns / Raises: as :func:`gauss_newton_rays`.
    """
    _check_common(max_iter, delta_thresh, sigma_pixel=sigma_pixel, sigma_depth=sigma_depth)
    _check_tensor("K", K, (torch.float32, torch.float64), 2)
    _check_shape("K", K, (3, 3))
    n, HW, E2, edges_host, index_check = _check_graph(Twc, Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q)
    if int(height) * int(width) != HW:
        raise ValueError(f"height*width must equal HW={HW}, got {height}x{width}")
    K32 = K.to(device=Twc.device, dtype=torch.float32).contiguous()
    args = dict(Xs=Xs, Cs=Cs, K=K32, ii=ii, jj=jj, idx=idx_ii2jj, valid=valid_match, Q=Q, height=int(height),
                width=int(width), pixel_border=int(pixel_border), z_eps=float(z_eps),
                sigma_pixel=float(sigma_pixel), sigma_depth=float(sigma_depth), C_thresh=float(C_thresh),
                Q_thresh=float(Q_thresh))
    if _use_cuda(Twc):
        ext = _ext.load()
        Xc, Cc, iic, jjc, idxc, vc, Qc = _contig(Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q)
        cargs = (Xc, Cc, K32, iic, jjc, idxc, vc, Qc, int(height), int(width), int(pixel_border), float(z_eps),
                 float(sigma_pixel), float(sigma_depth), float(C_thresh), float(Q_thresh))
        return _solve_cuda(ext.gn_calib_blocks, cargs, Twc, ii, jj, max_iter, delta_thresh, edges_host, index_check)

    def blocks(T):
        return gn_blocks_calib_torch(T, **args)
    return gn_solve(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), edges_host=edges_host)


def gauss_newton_points(Twc: Tensor, Xs: Tensor, Cs: Tensor, ii: Tensor, jj: Tensor, idx_ii2jj: Tensor,
                        valid_match: Tensor, Q: Tensor, sigma_point: float, C_thresh: float, Q_thresh: float,
                        max_iter: int, delta_thresh: float) -> GNResult:
    """Global Sim(3) Gauss–Newton on 3-D point residuals ``(T_i⁻¹ T_j)·X_j,k − X_i,m`` (spec §6.6, §6.7).

    Args: as :func:`gauss_newton_rays` with one ``sigma_point``. Returns / Raises: as :func:`gauss_newton_rays`.
    """
    _check_common(max_iter, delta_thresh, sigma_point=sigma_point)
    n, HW, E2, edges_host, index_check = _check_graph(Twc, Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q)
    args = dict(Xs=Xs, Cs=Cs, ii=ii, jj=jj, idx=idx_ii2jj, valid=valid_match, Q=Q, sigma_point=float(sigma_point),
                C_thresh=float(C_thresh), Q_thresh=float(Q_thresh))
    if _use_cuda(Twc):
        ext = _ext.load()
        cargs = (*_contig(Xs, Cs, ii, jj, idx_ii2jj, valid_match, Q), float(sigma_point), float(C_thresh),
                 float(Q_thresh))
        return _solve_cuda(ext.gn_points_blocks, cargs, Twc, ii, jj, max_iter, delta_thresh, edges_host, index_check)

    def blocks(T):
        return gn_blocks_points_torch(T, **args)
    return gn_solve(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), edges_host=edges_host)


# ----------------------------------------------------------------------------------------------- tracking (frame->kf)
def _check_track_common(T: Tensor, Xf: Tensor, huber: float) -> int:
    _check_tensor("T", T, (torch.float32,), 2)
    _check_shape("T", T, (1, 8))
    _check_tensor("Xf", Xf, (torch.float32,), 2)
    if Xf.shape[1] != 3:
        raise ValueError(f"Xf must be [N,3], got {tuple(Xf.shape)}")
    if not float(huber) > 0:
        raise ValueError(f"huber must be > 0, got {huber}")
    return int(Xf.shape[0])


def track_system_rays(T: Tensor, Xf: Tensor, Xk: Tensor, sqrt_info: Tensor, huber: float) -> Tensor:
    """IRLS normal equations of the ray + distance tracking cost at ``T`` (spec §5.2, §5.4), reduced on the device.

    Residual per pixel ``r = rd(Xk) − rd(T·Xf)``, ``rd(X) = [X/|X|, |X|]`` (4 rows), Jacobian ``J = ∂r/∂ξ`` for the left
    perturbation ``Exp(ξ)·T`` (tangent τ, ω, σ), ``s = sqrt_info·sqrt(huber_weight(sqrt_info·r, huber))``,
    ``A = s⊙J``, ``b = s⊙r`` (per-row terms in float32, products and sums in float64).

    Args:
        T: ``[1,8]`` float32 Sim(3) data ``[tx,ty,tz,qx,qy,qz,qw,s]`` (frame -> keyframe), on the points' device.
        Xf: ``[N,3]`` float32 frame points (frame camera frame) gathered at each keyframe pixel's match.
        Xk: ``[N,3]`` float32 keyframe points (keyframe camera frame).
        sqrt_info: ``[N,4]`` float32 square-root information per residual row (0 = row unused).
        huber: Huber threshold (> 0) on the whitened residual.
    Returns:
        ``[58]`` float64 on the input device: ``H = AᵀA`` (49, row-major), ``Aᵀb`` (7), ``bᵀb`` (1), number of pixels
        with non-zero weight (1). No host synchronization (CUDA-graph capturable on the CUDA path).
    Raises:
        TypeError / ValueError: wrong type, dtype, shape or device.
    """
    N = _check_track_common(T, Xf, huber)
    _check_tensor("Xk", Xk, (torch.float32,), 2)
    _check_shape("Xk", Xk, (N, 3))
    _check_tensor("sqrt_info", sqrt_info, (torch.float32,), 2)
    _check_shape("sqrt_info", sqrt_info, (N, 4))
    _check_same_device(T=T, Xf=Xf, Xk=Xk, sqrt_info=sqrt_info)
    if _use_cuda(T) and _ext.has("track_system_rays"):
        ext = _ext.load()
        return ext.track_system_rays(*_contig(T, Xf, Xk, sqrt_info), float(huber))
    return track_system_rays_torch(T, Xf, Xk, sqrt_info, float(huber))


def track_system_calib(T: Tensor, Xf: Tensor, meas_k: Tensor, static: Tensor, sq: Tensor, base: Tensor, K: Tensor,
                       img_size: tuple[int, int], pixel_border: float, z_eps: float, huber: float) -> Tensor:
    """IRLS normal equations of the calibrated pixel + log-depth tracking cost at ``T`` (spec §5.3, §5.4).

    Per pixel ``P = T·Xf``, ``r = meas_k − [fx x/z + cx, fy y/z + cy, log z]`` (3 rows; ``z`` replaced by 1 and
    ``log z`` by 0 where ``z ≤ z_eps``), ``sqrt_info = (static ∧ valid_proj)·sq·base`` with ``valid_proj``: ``z > z_eps``
    and ``(u, v)`` inside ``(b, W−1−b) × (b, H−1−b)``, ``b = pixel_border``; then as :func:`track_system_rays`.

    Args:
        T: ``[1,8]`` float32 Sim(3) data (frame -> keyframe).
        Xf: ``[N,3]`` float32 ray-constrained frame points. meas_k: ``[N,3]`` float32 ``(u, v, log z)`` per keyframe
            pixel. static: ``[N,1]`` bool (valid match ∧ valid keyframe depth). sq: ``[N,1]`` float32 ``sqrt(Q)``.
            base: ``[3]`` float32 ``[1/σ_pix, 1/σ_pix, 1/σ_depth]``. K: ``[3,3]`` float32 intrinsics (pixels); all
            on one device (K and base are read on the device: no host copy).
        img_size: ``(H, W)`` of the network image. pixel_border: ``b`` (−10 = 10 px outside allowed). z_eps: min
            depth. huber: Huber threshold (> 0).
    Returns / Raises: as :func:`track_system_rays`.
    """
    N = _check_track_common(T, Xf, huber)
    _check_tensor("meas_k", meas_k, (torch.float32,), 2)
    _check_shape("meas_k", meas_k, (N, 3))
    _check_tensor("static", static, (torch.bool,), 2)
    _check_shape("static", static, (N, 1))
    _check_tensor("sq", sq, (torch.float32,), 2)
    _check_shape("sq", sq, (N, 1))
    _check_tensor("base", base, (torch.float32,), 1)
    _check_shape("base", base, (3,))
    _check_tensor("K", K, (torch.float32,), 2)
    _check_shape("K", K, (3, 3))
    _check_same_device(T=T, Xf=Xf, meas_k=meas_k, static=static, sq=sq, base=base, K=K)
    H, W = int(img_size[0]), int(img_size[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"img_size must be positive (H, W), got {img_size}")
    if _use_cuda(T) and _ext.has("track_system_calib"):
        ext = _ext.load()
        return ext.track_system_calib(*_contig(T, Xf, meas_k, static, sq, base, K), H, W, float(pixel_border),
                                      float(z_eps), float(huber))
    return track_system_calib_torch(T, Xf, meas_k, static, sq, base, K, (H, W), float(pixel_border), float(z_eps),
                                    float(huber))
