"""PyTorch implementation of the matching kernels (CPU and GPU, vectorized over pixels).

Math: spec ``upstream_algorithm.md`` §4.2 (``iter_proj``), §4.4 (``refine_matches``) and the fallback guidance §4.6.
Inputs are assumed validated by :mod:`mast3r_slam_ros.kernels` (the public entry points); these functions only
compute.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["iter_proj_torch", "refine_matches_torch", "refine_initial_best"]


def _bilinear_taps(img: Tensor, u: Tensor, v: Tensor, W: int) -> Tensor:
    """Bilinear 4-tap sample of ``img [B,HW,C]`` at ``(u, v) [B,N]`` (already clamped so all 4 taps are in bounds).

    Weights exactly as §4.2: ``(1-du)(1-dv)·I[v0,u0] + du(1-dv)·I[v0,u0+1] + (1-du)dv·I[v0+1,u0] + du·dv·I[v0+1,u0+1]``.
    Returns ``[B,N,C]`` in ``img.dtype``.
    """
    u0f = torch.floor(u)
    v0f = torch.floor(v)
    du = (u - u0f).unsqueeze(-1)
    dv = (v - v0f).unsqueeze(-1)
    u0 = u0f.long()
    v0 = v0f.long()
    C = img.shape[-1]
    i00 = v0 * W + u0
    idx = torch.stack((i00, i00 + 1, i00 + W, i00 + W + 1), dim=-1)  # [B,N,4]
    B, N = u.shape
    g = torch.gather(img, 1, idx.reshape(B, N * 4, 1).expand(B, N * 4, C)).reshape(B, N, 4, C)
    return ((1 - du) * (1 - dv) * g[:, :, 0] + du * (1 - dv) * g[:, :, 1]
            + (1 - du) * dv * g[:, :, 2] + du * dv * g[:, :, 3])


def _clamp(x: Tensor, lo: float, hi: float) -> Tensor:
    """``clamp`` with CUDA ``fminf(fmaxf(x, lo), hi)`` semantics: NaN maps to ``lo`` (so sampling stays in bounds)."""
    return torch.where(torch.isnan(x), torch.full_like(x, lo), x.clamp(lo, hi))


def _unit(x: Tensor) -> Tensor:
    """``x / |x|`` along the last dim; the norm is clamped at 1e-12 (F.normalize's eps): a zero ray gives 0, not NaN."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def iter_proj_torch(rays_with_grad: Tensor, pts3d_norm: Tensor, p_init: Tensor, max_iter: int,
                    lambda_init: float, cost_thresh: float) -> tuple[Tensor, Tensor]:
    """Per-pixel Levenberg–Marquardt projective matching (spec §4.2), all pixels of all batches at once.

    Args:
        rays_with_grad: ``[B,H,W,9]`` float32 — unit rays of image 1 (ch 0–2), ∂ray/∂u (3–5), ∂ray/∂v (6–8).
        pts3d_norm: ``[B,HW,3]`` float32 — target unit rays (points of image 2 in camera 1, normalized).
        p_init: ``[B,HW,2]`` float32 — initial pixel ``(u, v)`` in image 1 (u = column, v = row).
        max_iter: number of LM iterations (no early exit, as upstream).
        lambda_init: initial damping λ (upstream 1e-8); λ ×0.1 on an accepted step, ×10 on a rejected one.
        cost_thresh: convergence threshold on the squared unit-ray distance ``|r - t|²`` (upstream 1e-6).

    Returns:
        ``p [B,HW,2]`` float32 (clamped to ``u∈[1,W-2], v∈[1,H-2]``) and ``converged [B,HW]`` bool (state of the
        last iteration only, as upstream).

    Deviations from upstream (documented, only affect degenerate inputs): a zero-norm sampled ray is normalized with
    eps 1e-12 instead of producing NaN, and a non-positive or non-finite 2×2 determinant gives a zero step (then
    rejected, λ ×10) instead of an unguarded division.
    """
    B, H, W, Cc = rays_with_grad.shape
    img = rays_with_grad.reshape(B, H * W, Cc)
    t = pts3d_norm
    dtype = img.dtype
    u = _clamp(p_init[..., 0].to(dtype), 1.0, float(W - 2))
    v = _clamp(p_init[..., 1].to(dtype), 1.0, float(H - 2))
    lam = torch.full_like(u, float(lambda_init))
    converged = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    for _ in range(int(max_iter)):
        val = _bilinear_taps(img, u, v, W)
        r = _unit(val[..., 0:3])
        gx = val[..., 3:6]
        gy = val[..., 6:9]
        e = r - t
        c = (e * e).sum(-1)
        a00 = (gx * gx).sum(-1) + lam
        a01 = (gx * gy).sum(-1)
        a11 = (gy * gy).sum(-1) + lam
        b0 = -(e * gx).sum(-1)
        b1 = -(e * gy).sum(-1)
        det = a00 * a11 - a01 * a01
        ok = torch.isfinite(det) & (det > 0)
        det_inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
        du = det_inv * (a11 * b0 - a01 * b1)
        dv = det_inv * (-a01 * b0 + a00 * b1)
        un = _clamp(u + du, 1.0, float(W - 2))
        vn = _clamp(v + dv, 1.0, float(H - 2))
        rn = _unit(_bilinear_taps(img, un, vn, W)[..., 0:3])
        en = rn - t
        cn = (en * en).sum(-1)
        better = cn < c
        u = torch.where(better, un, u)
        v = torch.where(better, vn, v)
        lam = torch.where(better, lam * 0.1, lam * 10.0)
        converged = torch.where(better, cn < cost_thresh, c < cost_thresh)
    return torch.stack((u, v), dim=-1).to(torch.float32), converged


def refine_initial_best(dtype: torch.dtype) -> float:
    """Initial running best score of :func:`refine_matches_torch` (and of the CUDA kernel) for a descriptor dtype.

    Upstream initializes ``best = numeric_limits<scalar_t>::min()``: the smallest positive normal for float/double and
    (no libcu++ specialization) 0 for half. We keep exactly that: with the strict ``>`` comparison, candidates with a
    non-positive score never win, so a pixel whose scores are all ≤ 0 keeps its position.
    """
    if dtype == torch.float16:
        return 0.0
    return float(torch.finfo(dtype).tiny)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def refine_matches_torch(D11: Tensor, D21: Tensor, p1: Tensor, radius: int, dilation_max: int,
                         chunk_bytes: int | None = None) -> Tensor:
    """Dilated local descriptor search (spec §4.4), vectorized over pixels and the 49 offsets of one level.

    Args:
        D11: ``[B,H,W,F]`` float16/float32/float64 — descriptors of image 1.
        D21: ``[B,HW,F]`` same dtype — descriptors of the image-2 pixels.
        p1: ``[B,HW,2]`` int64 — current match ``(u, v)`` in image 1 of every image-2 pixel.
        radius: search radius r (offsets ``d·{-r..r}²``), upstream 3.
        dilation_max: levels ``d = dilation_max .. 1`` (upstream 5); after each level the search recenters on the best.
        chunk_bytes: memory bound of the per-chunk temporaries (pixels are processed in chunks); default 64 MiB on
            the CPU, 1 GiB on a GPU (fewer, larger kernel launches).

    Returns:
        ``p1_new [B,HW,2]`` int64.

    Score and tie rule (identical in the CUDA kernel): the score is the dot product accumulated sequentially over the
    F channels, ``s = s + a_k·b_k`` with separately rounded multiply and add, in float32 for half/float descriptors
    (products of halves are exact in float32) and float64 for double. Candidates are visited level by level, offsets
    in upstream order (u offset outer, v offset inner); a candidate wins only if its score is strictly greater than the
    running best, which starts at :func:`refine_initial_best` and is not reset between levels. Out-of-image candidates
    are skipped. So on ties the first candidate in visiting order wins.
    """
    B, H, W, F = D11.shape
    HW = H * W
    acc = _accum_dtype(D11.dtype)
    # channel-major copy in the accumulation dtype: one contiguous gather per channel and candidate set
    d11t = D11.reshape(B, HW, F).to(acc).transpose(1, 2).contiguous()  # [B,F,HW]
    r = int(radius)
    side = 2 * r + 1
    n_off = side * side
    offs = torch.arange(-r, r + 1, device=p1.device, dtype=torch.int64)
    off_u = offs.repeat_interleave(side)  # outer loop over u offsets
    off_v = offs.repeat(side)             # inner loop over v offsets
    out = torch.empty_like(p1)
    per_pixel = n_off * 8 * 6  # index + a few float temporaries per candidate
    if chunk_bytes is None:
        chunk_bytes = 2**30 if D11.is_cuda else 64 * 2**20
    chunk = max(1, int(chunk_bytes) // max(1, B * per_pixel))
    init = refine_initial_best(D11.dtype)
    for s0 in range(0, HW, chunk):
        s1 = min(HW, s0 + chunk)
        n = s1 - s0
        u0 = p1[:, s0:s1, 0].clone()
        v0 = p1[:, s0:s1, 1].clone()
        q = D21[:, s0:s1].to(acc)  # [B,n,F]
        best = torch.full((B, n), init, dtype=acc, device=D11.device)
        for d in range(int(dilation_max), 0, -1):
            uc = u0.unsqueeze(-1) + off_u * d  # [B,n,49]
            vc = v0.unsqueeze(-1) + off_v * d
            inb = (uc >= 0) & (uc < W) & (vc >= 0) & (vc < H)
            lin = torch.where(inb, vc * W + uc, torch.zeros_like(uc)).reshape(B, n * n_off)
            s = None
            for k in range(F):  # sequential channel sum, separately rounded products and adds (as the CUDA kernel)
                prod = torch.gather(d11t[:, k], 1, lin).reshape(B, n, n_off) * q[:, :, k:k + 1]
                s = prod if s is None else s + prod
            s = torch.where(inb & ~torch.isnan(s), s, torch.full_like(s, float("-inf")))
            smax = s.amax(dim=-1)
            # first candidate (visiting order) that reaches the level maximum; argmax returns the first maximal index
            amax = torch.argmax((s == smax.unsqueeze(-1)).to(torch.uint8), dim=-1)
            win = smax > best
            best = torch.where(win, smax, best)
            u0 = torch.where(win, torch.gather(uc, 2, amax.unsqueeze(-1)).squeeze(-1), u0)
            v0 = torch.where(win, torch.gather(vc, 2, amax.unsqueeze(-1)).squeeze(-1), v0)
        out[:, s0:s1, 0] = u0
        out[:, s0:s1, 1] = v0
    return out
