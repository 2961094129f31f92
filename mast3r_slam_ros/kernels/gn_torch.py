"""PyTorch implementation of the global Gauss–Newton solves (rays, calib, points) and the shared solve loop.

Math: spec ``upstream_algorithm.md`` §6.3–§6.8 (residuals, Huber IRLS weights, left-perturbation Jacobians, reduced
system with the first keyframe fixed), §9.1 (Sim(3)).

Structure (shared with the CUDA backend):

1. ``gn_blocks_*``: for every directed edge e = (i, j) and the relative pose ``T_ij = T_i⁻¹ T_j`` evaluate, over all
   pixels k of keyframe j, the residual ``r_k`` (prediction − measurement), the IRLS weights ``w_k`` and the Jacobian
   ``Jr_k`` w.r.t. a left perturbation of ``T_ij``, and reduce them to ``Hr_e = Σ Jrᵀ W Jr`` (7×7), ``gr_e = Σ Jrᵀ W r``
   (7) and the robust cost ``c_e = Σ ρ(√w₀ r)``. Per-pixel terms are computed in the input precision (float32 in SLAM),
   the sums over pixels in float64 (both backends).
2. :func:`gn_solve`: because a left perturbation ``ξ_j`` of ``T_WC,j`` moves ``T_ij`` by ``Ad(T_i⁻¹) ξ_j`` and ``ξ_i``
   by ``−Ad(T_i⁻¹) ξ_i`` (§6.4), ``J_j = Jr·Ad(T_i⁻¹)`` and ``J_i = −J_j`` for every pixel. So
   ``H_jj = H_ii = −H_ij = −H_ji = Adᵀ Hr Ad`` and ``g_j = −g_i = Adᵀ gr`` — the same blocks upstream accumulates as a
   14×14 per edge, with 28 + 7 accumulators instead of 105 + 14. The blocks are scattered (``index_add_``) into the
   dense float64 reduced system of the free keyframes (row 0 fixed), solved by Cholesky (Levenberg-damped retry on
   failure), and the poses are updated by the left retraction ``T ← Exp(dx)·T`` (:meth:`lie.Sim3.retr`).
3. Where it runs: the blocks are the only large computation. For up to :data:`HOST_MAX_KF` free keyframes the loop
   copies the per-edge blocks to the host ONCE per iteration and does steps 2's assembly, solve and retraction in
   float64 NumPy / CPU LAPACK (:func:`_gn_solve_host`): on a GPU every tiny tensor op costs a 5–10 µs launch and
   every ``float(...)``/``bool(...)`` a queue sync, which made a 4-keyframe solve ~60 ms. Larger graphs keep the
   device loop (:func:`_gn_solve_device`). Both give the same result to float rounding (test/test_gn_host.py).

Robust cost: whitened residual ``x = √w₀·r`` (``√w₀ = √Q/σ`` for valid pixels, else 0), Huber with k = 1.345,
``ρ(x) = x²`` for ``|x| ≤ k`` else ``2k|x| − k²``; its IRLS weight ``ρ'(x)/(2x)`` is upstream's ``huber(x)``, so
``w = huber(x)·w₀``.

Guards added to upstream (they only change degenerate pixels): a pixel is also invalid if ``|P| = 0`` or
``|X_i,m| = 0`` (rays) or if any residual / Jacobian entry is not finite; invalid pixels contribute exactly 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..lie import Sim3, act_jacobian, host_adjoint, host_inv, host_mul, retr_host
from .result import GNResult

__all__ = [
    "HUBER_K", "huber_weight", "huber_cost", "relative_poses", "rays_terms", "calib_terms", "points_terms",
    "edge_terms", "gn_blocks_rays_torch", "gn_blocks_calib_torch", "gn_blocks_points_torch", "gn_solve",
    "assemble_system", "unpack_sums", "cuda_blocks", "HOST_MAX_KF",
]

HUBER_K = 1.345
#: memory budget of one chunk of edges in the PyTorch blocks (bytes, approximate)
CHUNK_BYTES = 256 * 2**20


def huber_weight(x: Tensor) -> Tensor:
    """Upstream ``huber(x)``: 1 for ``|x| < 1.345`` else ``1.345/|x|`` (IRLS weight of :func:`huber_cost`)."""
    a = x.abs()
    return torch.where(a < HUBER_K, torch.ones_like(a), HUBER_K / a.clamp_min(HUBER_K))


def huber_cost(x: Tensor) -> Tensor:
    """Huber loss ``ρ(x) = x²`` (``|x| ≤ 1.345``) else ``2·1.345·|x| − 1.345²``, elementwise."""
    a = x.abs()
    return torch.where(a <= HUBER_K, a * a, 2 * HUBER_K * a - HUBER_K * HUBER_K)


def relative_poses(Twc: Tensor, ii: Tensor, jj: Tensor) -> Sim3:
    """``T_ij = T_WC,i⁻¹ · T_WC,j`` for every edge. Twc ``[n,8]``, ii/jj ``[E]`` int64 -> Sim3 ``[E]``."""
    return Sim3(Twc[ii]).inv() * Sim3(Twc[jj])


def _gather_rows(x: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """``x[rows[e], idx[e,k]]`` for ``x [n,HW,C]``, rows ``[E]``, idx ``[E,HW]`` -> ``[E,HW,C]``."""
    src = x[rows]
    return torch.gather(src, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def rays_terms(P: Tensor, Xi: Tensor, sqrt_w_ray: Tensor, sqrt_w_dist: Tensor, valid: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ray + distance residual (§6.4) at predicted points ``P = T_ij·X_j`` [...,3] vs measured ``X_i`` [...,3].

    Returns ``err [...,4]``, ``sqrt_w0 [...,4]``, ``Jr [...,4,7]`` (w.r.t. left perturbation of T_ij: rows 0–2
    ``[(I − r rᵀ)/|P|, −[r]×, 0]``, row 3 ``[rᵀ, 0, |P|]`` with ``r = P/|P|``) and the validity mask ``[...]``.
    """
    nP = torch.linalg.vector_norm(P, dim=-1, keepdim=True)
    nX = torch.linalg.vector_norm(Xi, dim=-1, keepdim=True)
    ok = valid & (nP[..., 0] > 0) & (nX[..., 0] > 0)
    nPs = torch.where(ok.unsqueeze(-1), nP, torch.ones_like(nP))
    nXs = torch.where(ok.unsqueeze(-1), nX, torch.ones_like(nX))
    r = P / nPs
    err = torch.cat((r - Xi / nXs, nPs - nXs), dim=-1)
    Jp = torch.zeros(*P.shape[:-1], 4, 3, dtype=P.dtype, device=P.device)
    eye = torch.eye(3, dtype=P.dtype, device=P.device)
    Jp[..., :3, :] = (eye - r.unsqueeze(-1) * r.unsqueeze(-2)) / nPs.unsqueeze(-1)
    Jp[..., 3, :] = r
    Jr = Jp @ act_jacobian(P)  # chain rule through dP/dxi = [I, -[P]x, P]
    sw = torch.cat((sqrt_w_ray.expand(*sqrt_w_ray.shape[:-1], 3), sqrt_w_dist), dim=-1)
    return err, sw, Jr, ok


def calib_terms(P: Tensor, Xi: Tensor, uv_target: Tensor, K: Tensor, height: int, width: int, pixel_border: int,
                z_eps: float, sqrt_w_pix: Tensor, sqrt_w_depth: Tensor, valid: Tensor):
    """Pixel + log-depth residual (§6.5): ``[u − u_m, v − v_m, log P_z − log X_i,z]`` with ``(u, v) = π_K(P)``.

    Returns ``err [...,3]``, ``sqrt_w0 [...,3]``, ``Jr [...,3,7]`` (chain rule of the projection through
    ``[I, −[P]×, P]``) and the validity mask (input validity ∧ both depths > z_eps ∧ projection inside the image
    enlarged by ``−pixel_border``).
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    z = P[..., 2]
    valid_z = (z > z_eps) & (Xi[..., 2] > z_eps)
    zs = torch.where(valid_z, z, torch.ones_like(z))
    zi = torch.where(valid_z, Xi[..., 2], torch.ones_like(z))
    zinv = 1.0 / zs
    x, y = P[..., 0] * zinv, P[..., 1] * zinv
    u = fx * x + cx
    v = fy * y + cy
    b = float(pixel_border)
    inside = (u > b) & (u < width - 1 - b) & (v > b) & (v < height - 1 - b)
    ok = valid & valid_z & inside
    err = torch.stack((u - uv_target[..., 0], v - uv_target[..., 1], torch.log(zs) - torch.log(zi)), dim=-1)
    Jp = torch.zeros(*P.shape[:-1], 3, 3, dtype=P.dtype, device=P.device)
    Jp[..., 0, 0] = fx * zinv
    Jp[..., 0, 2] = -fx * x * zinv
    Jp[..., 1, 1] = fy * zinv
    Jp[..., 1, 2] = -fy * y * zinv
    Jp[..., 2, 2] = zinv
    Jr = Jp @ act_jacobian(P)
    sw = torch.cat((sqrt_w_pix.expand(*sqrt_w_pix.shape[:-1], 2), sqrt_w_depth), dim=-1)
    return err, sw, Jr, ok


def points_terms(P: Tensor, Xi: Tensor, sqrt_w_point: Tensor, valid: Tensor):
    """3-D point residual (§6.6) ``P − X_i`` with ``Jr = [I, −[P]×, P]``."""
    err = P - Xi
    sw = sqrt_w_point.expand(*sqrt_w_point.shape[:-1], 3)
    return err, sw, act_jacobian(P), valid


def edge_terms(kind: str, Twc: Tensor, Xs: Tensor, Cs: Tensor, ii: Tensor, jj: Tensor, idx: Tensor, valid: Tensor,
               Q: Tensor, C_thresh: float, Q_thresh: float, **p) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-pixel residuals, IRLS weights and T_ij-Jacobians of a set of directed edges (reference level).

    Args:
        kind: ``"rays"`` (p: sigma_ray, sigma_dist), ``"calib"`` (p: K, height, width, pixel_border, z_eps,
            sigma_pixel, sigma_depth) or ``"points"`` (p: sigma_point).
        Twc ``[n,8]``, Xs ``[n,HW,3]``, Cs ``[n,HW,1]``, ii/jj ``[E]`` rows, idx ``[E,HW]``, valid ``[E,HW,1]``,
        Q ``[E,HW,1]``; any float dtype (float64 for reference checks).

    Returns:
        ``err [E,HW,R]``, ``w [E,HW,R]`` (Huber IRLS weight × √w₀², 0 for invalid pixels), ``Jr [E,HW,R,7]``
        (left perturbation of T_ij; ``J_j = Jr·Ad(T_i⁻¹)``, ``J_i = −J_j``) and ``cost [E]`` (Σ ρ(√w₀·err)).
    """
    dtype = Xs.dtype
    vm = valid[..., 0]
    m = torch.where(vm, idx, torch.zeros_like(idx))
    Xi = _gather_rows(Xs, ii, m)
    Ci = _gather_rows(Cs, ii, m)[..., 0]
    Cj = Cs[jj][..., 0]
    Xj = Xs[jj]
    q = Q[..., 0].to(dtype)
    v = vm & (q > Q_thresh) & (Ci > C_thresh) & (Cj > C_thresh)
    Tij = relative_poses(Twc.to(dtype), ii, jj)
    P = Sim3(Tij.data.unsqueeze(1)).act(Xj)
    sq = torch.sqrt(q.clamp_min(0)).unsqueeze(-1)
    if kind == "rays":
        err, sw, Jr, ok = rays_terms(P, Xi, sq / p["sigma_ray"], sq / p["sigma_dist"], v)
    elif kind == "calib":
        W = int(p["width"])
        uv_t = torch.stack(((m % W), (m // W)), dim=-1).to(dtype)
        err, sw, Jr, ok = calib_terms(P, Xi, uv_t, p["K"].to(dtype), int(p["height"]), W, int(p["pixel_border"]),
                                      float(p["z_eps"]), sq / p["sigma_pixel"], sq / p["sigma_depth"], v)
    elif kind == "points":
        err, sw, Jr, ok = points_terms(P, Xi, sq / p["sigma_point"], v)
    else:
        raise ValueError(f"unknown residual kind {kind!r}")
    ok = ok & torch.isfinite(err).all(-1) & torch.isfinite(Jr).flatten(-2).all(-1)
    okf = ok.unsqueeze(-1)
    err = torch.where(okf, err, torch.zeros_like(err))
    sw = torch.where(okf, sw, torch.zeros_like(sw))
    Jr = torch.where(okf.unsqueeze(-1), Jr, torch.zeros_like(Jr))
    x = sw * err
    w = huber_weight(x) * sw * sw
    cost = huber_cost(x).to(torch.float64).sum(dim=(1, 2))
    return err, w, Jr, cost


def _blocks(kind: str, Twc: Tensor, Xs: Tensor, Cs: Tensor, ii: Tensor, jj: Tensor, idx: Tensor, valid: Tensor,
            Q: Tensor, C_thresh: float, Q_thresh: float, **p) -> tuple[Tensor, Tensor, Tensor]:
    E2, HW = idx.shape
    R = {"rays": 4, "calib": 3, "points": 3}[kind]
    dtype = torch.float64
    Hr = torch.zeros(E2, 7, 7, dtype=dtype, device=Xs.device)
    gr = torch.zeros(E2, 7, dtype=dtype, device=Xs.device)
    cost = torch.zeros(E2, dtype=dtype, device=Xs.device)
    per_edge = max(1, HW * (R * 7 * 6 + 64) * Xs.element_size())
    chunk = max(1, CHUNK_BYTES // per_edge)
    for e0 in range(0, E2, chunk):
        e1 = min(E2, e0 + chunk)
        err, w, Jr, c = edge_terms(kind, Twc, Xs, Cs, ii[e0:e1], jj[e0:e1], idx[e0:e1], valid[e0:e1], Q[e0:e1],
                                   C_thresh, Q_thresh, **p)
        # per-pixel terms in the input precision, reduction over pixels in float64: the gradient is a sum of many
        # large, partly cancelling (Huber-clipped outlier) terms, and float32 sums there move the GN step by ~1e-4
        wJ = (Jr * w.unsqueeze(-1)).to(torch.float64)
        Hr[e0:e1] = torch.einsum("ekra,ekrb->eab", wJ, Jr.to(torch.float64))
        gr[e0:e1] = torch.einsum("ekra,ekr->ea", wJ, err.to(torch.float64))
        cost[e0:e1] = c.to(torch.float64)
    return Hr, gr, cost


def gn_blocks_rays_torch(Twc: Tensor, *, Xs, Cs, ii, jj, idx, valid, Q, sigma_ray, sigma_dist, C_thresh, Q_thresh):
    """Per-edge ``Hr [2E,7,7]``, ``gr [2E,7]``, ``cost [2E]`` (float64 sums) of the rays residual (§6.4)."""
    return _blocks("rays", Twc, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, sigma_ray=sigma_ray,
                   sigma_dist=sigma_dist)


def gn_blocks_calib_torch(Twc: Tensor, *, Xs, Cs, K, ii, jj, idx, valid, Q, height, width, pixel_border, z_eps,
                          sigma_pixel, sigma_depth, C_thresh, Q_thresh):
    """Per-edge ``Hr, gr, cost`` of the calibrated residual (§6.5)."""
    return _blocks("calib", Twc, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, K=K, height=height, width=width,
                   pixel_border=pixel_border, z_eps=z_eps, sigma_pixel=sigma_pixel, sigma_depth=sigma_depth)


def gn_blocks_points_torch(Twc: Tensor, *, Xs, Cs, ii, jj, idx, valid, Q, sigma_point, C_thresh, Q_thresh):
    """Per-edge ``Hr, gr, cost`` of the 3-D point residual (§6.6)."""
    return _blocks("points", Twc, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, sigma_point=sigma_point)


_TRIU = torch.triu_indices(7, 7)  # row-major upper triangle (a <= b), the order of csrc/gn_kernels.cu


def unpack_sums(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unpack the CUDA kernels' per-edge sums ``[2E,36]`` (28 upper-triangular Hr entries, 7 gr, 1 cost) into
    ``Hr [2E,7,7]`` (symmetric), ``gr [2E,7]``, ``cost [2E]`` (dtype of ``sums``)."""
    E2 = sums.shape[0]
    Hr = torch.zeros(E2, 7, 7, dtype=sums.dtype, device=sums.device)
    r, c = _TRIU[0].to(sums.device), _TRIU[1].to(sums.device)
    Hr[:, r, c] = sums[:, :28]
    Hr[:, c, r] = sums[:, :28]
    return Hr, sums[:, 28:35], sums[:, 35]


def cuda_blocks(fn: Callable, Twc: Tensor, ii: Tensor, jj: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """Per-edge blocks from a CUDA extension function ``fn(Tij [2E,8] f32, *args) -> sums [2E,36] f64``; ``T_ij``
    comes from :func:`relative_poses` exactly as in the PyTorch blocks."""
    Tij = relative_poses(Twc, ii, jj).data.to(torch.float32).contiguous()
    return unpack_sums(fn(Tij, *args))


def assemble_system(Twc: Tensor, ii: Tensor, jj: Tensor, Hr: Tensor, gr: Tensor) -> tuple[Tensor, Tensor]:
    """Dense float64 reduced system ``A [7(n−1), 7(n−1)]``, ``b [7(n−1)]`` of the free keyframes (row 0 fixed).

    ``Ad = Ad(T_i⁻¹)`` per edge; ``H = Adᵀ Hr Ad``, ``g = Adᵀ gr``; blocks ``(i,i) += H``, ``(j,j) += H``,
    ``(i,j) −= H``, ``(j,i) −= H``, ``b_i −= g``, ``b_j += g``, skipping the fixed keyframe (§6.7 step 2).
    """
    n = Twc.shape[0]
    m = n - 1
    dev = Twc.device
    Ad = Sim3(Twc[ii].to(torch.float64)).inv().adjoint()  # [E,7,7]
    H = Ad.transpose(-1, -2) @ Hr.to(torch.float64) @ Ad
    g = (Ad.transpose(-1, -2) @ gr.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    ri, rj = ii - 1, jj - 1
    A = torch.zeros(m * m, 7, 7, dtype=torch.float64, device=dev)
    b = torch.zeros(m, 7, dtype=torch.float64, device=dev)
    for r1, r2, sign in ((ri, ri, 1.0), (rj, rj, 1.0), (ri, rj, -1.0), (rj, ri, -1.0)):
        keep = (r1 >= 0) & (r2 >= 0)
        A.index_add_(0, (r1 * m + r2)[keep], sign * H[keep])
    b.index_add_(0, ri[ri >= 0], -g[ri >= 0])
    b.index_add_(0, rj[rj >= 0], g[rj >= 0])
    A = A.reshape(m, m, 7, 7).permute(0, 2, 1, 3).reshape(7 * m, 7 * m)
    return A, b.reshape(7 * m)


#: relative Levenberg damping factors tried after a failed plain Cholesky
DAMPING = (1e-6, 1e-3, 1e-1)


def _solve(A: Tensor, b: Tensor) -> tuple[Tensor | None, str]:
    """Solve ``A dx = −b`` by Cholesky; on failure retry with Levenberg damping ``A + μ·diag(max(A_kk, ε))``
    (``ε = 1e-6·mean(A_kk)``, μ from :data:`DAMPING`). Returns ``(dx or None, note)``; the note says what was done.

    For ``A = JᵀWJ``, ``b = JᵀWr`` lies in the range of ``A``, so directions that are unobservable (zero rows of A)
    get a (near) zero step instead of an arbitrary one.
    """
    if not (torch.isfinite(A).all() and torch.isfinite(b).all()):
        return None, "non-finite normal equations (NaN/Inf residuals or Jacobians)"
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return -torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1), ""
    d = torch.diagonal(A)
    floor = 1e-6 * float(d.abs().mean())
    if not floor > 0:
        return None, "all-zero normal equations"
    for mu in DAMPING:
        Ad = A + torch.diag(mu * d.clamp_min(floor))
        L, info = torch.linalg.cholesky_ex(Ad)
        if int(info) == 0:
            return (-torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1),
                    f"plain Cholesky failed (matrix not positive definite); solved with Levenberg damping mu={mu:g}")
    return None, "Cholesky failed even with Levenberg damping (singular system: keyframes without valid residuals?)"



# ------------------------------------------------------------------------------------------------ solve loop
#: largest number of free keyframes (n − 1) solved by the host loop (:func:`_gn_solve_host`): its dense float64
#: ``7(n−1)`` Cholesky costs ~ms on the CPU up to here; larger graphs use the device loop (:func:`_gn_solve_device`)
HOST_MAX_KF = 256
#: up to this many free poses the host retraction loops over :func:`lie.retr_host` (~8 µs each); above it one batched
#: :meth:`Sim3.retr` on CPU tensors (~0.3 ms, independent of the count)
HOST_RETR_LOOP_MAX = 32

BlocksFn = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
TijBlocksFn = Callable[[Tensor], Tensor]


def gn_solve(Twc: Tensor, ii: Tensor, jj: Tensor, blocks: BlocksFn, max_iter: int, delta_thresh: float, *,
             tij_blocks: TijBlocksFn | None = None, index_check: Tensor | None = None,
             edges_host: tuple | None = None, host_max_kf: int | None = None) -> GNResult:
    """Gauss–Newton loop shared by both backends (§6.7): blocks → assembly → solve → ``T ← Exp(dx)·T`` (rows ≥ 1).

    Two implementations with the same results (to float rounding) and the same :class:`GNResult` semantics:

    - host loop (``n − 1 ≤ host_max_kf``): per iteration ONE device→host copy of the per-edge blocks, then assembly,
      the (damped) Cholesky solve and the retraction in float64 on the CPU (:func:`_gn_solve_host`), and one
      host→device copy of the poses (or of the relative poses ``T_ij`` when ``tij_blocks`` is given);
    - device loop (larger graphs): everything in tensors on ``Twc.device`` (:func:`_gn_solve_device`).

    Args:
        Twc: ``[n,8]`` pose data, updated in place (any float dtype; retraction computed in float64; after every
            iteration the poses are rounded to ``Twc.dtype``, in both loops).
        ii, jj: ``[2E]`` int64 row indices (on ``Twc.device``).
        blocks: ``Twc -> (Hr [2E,7,7], gr [2E,7], cost [2E])`` (float64 sums) evaluated at the current poses.
        max_iter: iterations. delta_thresh: stop when ``‖dx‖ < delta_thresh`` (after applying the step, as upstream).
        tij_blocks: optional ``T_ij [2E,8] float32 (on Twc.device) -> sums [2E,36] float64`` (the CUDA kernels'
            packed layout, see :func:`unpack_sums`); the host loop then computes ``T_ij = T_i⁻¹ T_j`` on the host in
            float64, uploads it and calls this instead of ``blocks`` (``Twc`` itself is written once, at the end).
        index_check: optional 0-dim integer tensor (device) = number of matched pixels whose ``idx_ii2jj`` is out of
            range; read back with the first iteration's blocks (no extra sync) and ``ValueError`` if non-zero
            (raised before any pose changes).
        edges_host: optional ``(ii, jj)`` as int64 NumPy arrays (saves the one device→host copy of ``ii, jj``).
        host_max_kf: use the host loop when ``n − 1 ≤ host_max_kf``; None: :data:`HOST_MAX_KF` (read at call time).

    Returns:
        :class:`GNResult`. On a failed solve the poses keep the last applied state, ``ok=False``.
    """
    n = Twc.shape[0]
    dx = torch.zeros(max(n - 1, 0), 7, dtype=torch.float32, device=Twc.device)
    if n <= 1:
        return GNResult(dx, 0, True, True, "nothing to optimize (at most one keyframe; it is fixed)", 0.0, 0.0)
    if ii.numel() == 0:
        return GNResult(dx, 0, True, True, "no edges", 0.0, 0.0)
    if n - 1 <= int(HOST_MAX_KF if host_max_kf is None else host_max_kf):
        return _gn_solve_host(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), tij_blocks, index_check,
                              edges_host)
    return _gn_solve_device(Twc, ii, jj, blocks, int(max_iter), float(delta_thresh), index_check)


def _raise_index_error(count: int) -> None:
    raise ValueError(f"idx_ii2jj must be pixel indices in [0, HW) wherever valid_match is set; {count} matched pixels "
                     "are out of range")


def _dead_note(it: int, dead: list[int], notes: list[str]) -> None:
    if it == 1 or not notes or "held fixed" not in notes[-1]:
        notes.append(f"iteration {it}: keyframe rows {dead} have no valid residual and are held fixed")


def _gn_solve_device(Twc: Tensor, ii: Tensor, jj: Tensor, blocks: BlocksFn, max_iter: int, delta_thresh: float,
                     index_check: Tensor | None) -> GNResult:
    """Device loop of :func:`gn_solve` (all tensors on ``Twc.device``; ~7 host syncs and ~200 small ops/iteration)."""
    n = Twc.shape[0]
    dx = torch.zeros(n - 1, 7, dtype=torch.float32, device=Twc.device)
    cost0 = float("nan")
    cost = float("nan")
    notes: list[str] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        Hr, gr, c = blocks(Twc)
        if it == 1 and index_check is not None and int(index_check) != 0:
            _raise_index_error(int(index_check))
        cost = float(c.sum())
        if it == 1:
            cost0 = cost
        A, b = assemble_system(Twc, ii, jj, Hr, gr)
        # keyframes without any valid residual have an all-zero block: hold them fixed (reported), solve the rest
        live = torch.diagonal(A).reshape(n - 1, 7).abs().sum(-1) > 0
        if not bool(live.any()):
            return GNResult(dx, it, False, False, f"iteration {it}: no valid residual in the whole graph "
                            "(all matches invalid or below the Q/C thresholds); poses unchanged", cost, cost0)
        step = torch.zeros(n - 1, 7, dtype=torch.float64, device=Twc.device)
        if bool(live.all()):
            sol, note = _solve(A, b)
        else:
            _dead_note(it, (torch.nonzero(~live).flatten() + 1).tolist(), notes)
            sel = torch.nonzero(live.repeat_interleave(7)).flatten()
            sol, note = _solve(A[sel][:, sel], b[sel])
        if sol is None:
            return GNResult(dx, it, False, False, f"iteration {it}: {note}; poses keep the last good state",
                            cost, cost0)
        if note:
            notes.append(f"iteration {it}: {note}")
        step[live] = sol.reshape(-1, 7)
        T = Sim3(Twc[1:].to(torch.float64)).retr(step)
        Twc[1:] = T.data.to(Twc.dtype)
        dx = step.to(torch.float32)
        if float(torch.linalg.vector_norm(step)) < delta_thresh:
            converged = True
            break
    msg = "; ".join(notes) if notes else ("converged" if converged else f"stopped after {it} iterations")
    return GNResult(dx, it, converged, True, msg, cost, cost0)


def _np_retr(P: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Left retraction ``Exp(step)·P`` of ``P [k,8]`` by ``step [k,7]`` (float64) with the math of :meth:`Sim3.retr`:
    :func:`lie.retr_host` per row for few rows, else one batched :meth:`Sim3.retr` on CPU tensors."""
    if P.shape[0] <= HOST_RETR_LOOP_MAX:
        return np.array([retr_host(p, s) for p, s in zip(P.tolist(), step.tolist())], dtype=np.float64)
    return Sim3(torch.from_numpy(P)).retr(torch.from_numpy(step)).data.numpy()


class _HostSystem:
    """Reduced-system assembly on the host for a fixed edge list (index arrays precomputed once per solve).

    Same blocks as :func:`assemble_system`: ``H = Adᵀ Hr Ad``, ``g = Adᵀ gr`` with ``Ad = Ad(T_i⁻¹)``; ``(i,i) += H``,
    ``(j,j) += H``, ``(i,j) −= H``, ``(j,i) −= H``, ``b_i −= g``, ``b_j += g``, rows of the fixed keyframe 0 skipped.
    """

    def __init__(self, n: int, ii: np.ndarray, jj: np.ndarray):
        self.n, self.m = n, n - 1
        self.ii, self.jj = ii, jj
        ri, rj = ii - 1, jj - 1
        self.scatter = []
        for r1, r2, sign in ((ri, ri, 1.0), (rj, rj, 1.0), (ri, rj, -1.0), (rj, ri, -1.0)):
            keep = np.nonzero((r1 >= 0) & (r2 >= 0))[0]
            self.scatter.append((keep, r1[keep], r2[keep], sign))
        self.bi = np.nonzero(ri >= 0)[0]
        self.bj = np.nonzero(rj >= 0)[0]
        self.ri, self.rj = ri, rj

    def assemble(self, P: np.ndarray, Hr: np.ndarray, gr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``A [7m,7m]``, ``b [7m]`` float64 at poses ``P [n,8]`` from ``Hr [2E,7,7]``, ``gr [2E,7]``."""
        m = self.m
        Ad = host_adjoint(host_inv(P[self.ii]))
        AdT = Ad.transpose(0, 2, 1)
        H = AdT @ Hr @ Ad
        g = (AdT @ gr[:, :, None])[:, :, 0]
        A = np.zeros((m, 7, m, 7))
        for keep, r1, r2, sign in self.scatter:
            # advanced indices separated by a slice: the indexed view is [k, 7 (row in block), 7 (column in block)]
            np.add.at(A, (r1, slice(None), r2), sign * H[keep])
        b = np.zeros((m, 7))
        np.add.at(b, self.ri[self.bi], -g[self.bi])
        np.add.at(b, self.rj[self.bj], g[self.bj])
        return A.reshape(7 * m, 7 * m), b.reshape(7 * m)


_TRIU_NP = (_TRIU[0].numpy(), _TRIU[1].numpy())


def _np_unpack(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host twin of :func:`unpack_sums` for ``sums [2E,36]`` float64."""
    Hr = np.empty((sums.shape[0], 7, 7))
    Hr[:, _TRIU_NP[0], _TRIU_NP[1]] = sums[:, :28]
    Hr[:, _TRIU_NP[1], _TRIU_NP[0]] = sums[:, :28]
    return Hr, sums[:, 28:35], sums[:, 35]


def _gn_solve_host(Twc: Tensor, ii: Tensor, jj: Tensor, blocks: BlocksFn, max_iter: int, delta_thresh: float,
                   tij_blocks: TijBlocksFn | None, index_check: Tensor | None, edges_host: tuple | None) -> GNResult:
    """Host loop of :func:`gn_solve`: per iteration one blocks call, ONE device→host copy (blocks, + the index check
    count at iteration 1), float64 NumPy assembly / live-row selection, :func:`_solve` on CPU tensors (same damping,
    same notes), the retraction on the host, and one host→device copy of the poses (``blocks``) or of ``T_ij``
    (``tij_blocks``). ``Twc`` is written at the end (and before every ``blocks`` call)."""
    n = Twc.shape[0]
    dev = Twc.device
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(Twc.dtype)
    if np_dtype is None:
        raise TypeError(f"Twc must be float32 or float64, got {Twc.dtype}")
    if edges_host is None:  # poses and edges in one device -> host copy (row indices are exact in float64)
        start = torch.cat((Twc.detach().reshape(-1).to(torch.float64), ii.to(torch.float64),
                           jj.to(torch.float64))).cpu().numpy()
        E2 = ii.shape[0]
        P = start[:8 * n].reshape(n, 8).copy()
        ii_h = start[8 * n:8 * n + E2].astype(np.int64)
        jj_h = start[8 * n + E2:].astype(np.int64)
    else:
        ii_h, jj_h = (np.asarray(a, dtype=np.int64) for a in edges_host)
        E2 = ii_h.shape[0]
        P = Twc.detach().cpu().numpy().astype(np.float64)  # [n,8] host poses (values of Twc.dtype)
    system = _HostSystem(n, ii_h, jj_h)
    twc_stale = False  # Twc on the device lags P (tij_blocks path: written at the end)
    dx = np.zeros((n - 1, 7))
    cost0 = float("nan")
    cost = float("nan")
    notes: list[str] = []
    converged = False
    it = 0

    def result(converged_: bool, ok: bool, msg: str) -> GNResult:
        if twc_stale:
            Twc.copy_(torch.from_numpy(P.astype(np_dtype)), non_blocking=True)
        return GNResult(torch.from_numpy(dx.astype(np.float32)).to(dev, non_blocking=True), it, converged_, ok, msg,
                        cost, cost0)

    for it in range(1, max_iter + 1):
        if tij_blocks is not None:
            Tij = host_mul(host_inv(P[ii_h]), P[jj_h]).astype(np.float32)
            packed = tij_blocks(torch.from_numpy(Tij).to(dev, non_blocking=True)).reshape(E2, 36)
        else:
            Hr_d, gr_d, c_d = blocks(Twc)
            packed = torch.cat((Hr_d.reshape(E2, 49).to(torch.float64), gr_d.reshape(E2, 7).to(torch.float64),
                                c_d.reshape(E2, 1).to(torch.float64)), dim=1)
        flat = packed.reshape(-1)
        if it == 1 and index_check is not None:
            flat = torch.cat((flat, index_check.reshape(1).to(device=flat.device, dtype=torch.float64)))
        host = flat.cpu().numpy()  # the one device -> host copy (sync) of this iteration
        if it == 1 and index_check is not None:
            if host[-1] != 0:
                _raise_index_error(int(host[-1]))
            host = host[:-1]
        if tij_blocks is not None:
            Hr, gr, c = _np_unpack(host.reshape(E2, 36))
        else:
            h2 = host.reshape(E2, 57)
            Hr, gr, c = h2[:, :49].reshape(E2, 7, 7), h2[:, 49:56], h2[:, 56]
        cost = float(c.sum())
        if it == 1:
            cost0 = cost
        A, b = system.assemble(P, Hr, gr)
        live = np.abs(np.diagonal(A)).reshape(n - 1, 7).sum(-1) > 0
        if not live.any():
            return result(False, False, f"iteration {it}: no valid residual in the whole graph "
                          "(all matches invalid or below the Q/C thresholds); poses unchanged")
        step = np.zeros((n - 1, 7))
        if live.all():
            sol, note = _solve(torch.from_numpy(A), torch.from_numpy(b))
        else:
            _dead_note(it, (np.nonzero(~live)[0] + 1).tolist(), notes)
            sel = np.nonzero(np.repeat(live, 7))[0]
            sol, note = _solve(torch.from_numpy(A[np.ix_(sel, sel)]), torch.from_numpy(b[sel]))
        if sol is None:
            return result(False, False, f"iteration {it}: {note}; poses keep the last good state")
        if note:
            notes.append(f"iteration {it}: {note}")
        step[live] = sol.numpy().reshape(-1, 7)
        P[1:] = _np_retr(P[1:], step).astype(np_dtype)  # rounded to Twc.dtype, as the device loop stores it
        dx = step
        if tij_blocks is None:
            Twc.copy_(torch.from_numpy(P.astype(np_dtype)), non_blocking=True)
        else:
            twc_stale = True
        if float(np.sqrt((step * step).sum())) < delta_thresh:
            converged = True
            break
    msg = "; ".join(notes) if notes else ("converged" if converged else f"stopped after {it} iterations")
    return result(converged, True, msg)
