"""CPU tests of the PyTorch matching kernels against independent float64 / numpy references (spec §4.2, §4.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mast3r_slam_ros import kernels


# ------------------------------------------------------------------------------------------------ reference helpers
def _scharr_grad(rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scharr/32 gradients with reflect padding of an [H,W,3] float64 ray image (upstream prep, spec §4.1)."""
    p = np.pad(rays, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    H, W = rays.shape[:2]
    kx = np.array([[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]], dtype=np.float64) / 32.0
    gx = np.zeros_like(rays)
    gy = np.zeros_like(rays)
    for a in range(3):
        for b in range(3):
            win = p[a:a + H, b:b + W]
            gx += kx[a, b] * win
            gy += kx.T[a, b] * win
    return gx, gy


def _ray_field(H: int, W: int, seed: int) -> np.ndarray:
    """Smooth, injective unit-ray field [H,W,3] float64: a pinhole with a smooth random warp."""
    rng = np.random.default_rng(seed)
    v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    f = 0.9 * W
    a = rng.uniform(-0.03, 0.03, size=4)
    x = (u - W / 2) / f + a[0] * np.sin(v / H * 3.0) + a[1] * np.cos(u / W * 2.0)
    y = (v - H / 2) / f + a[2] * np.sin(u / W * 2.5) + a[3] * np.cos(v / H * 1.5)
    X = np.stack([x, y, np.ones_like(x)], -1)
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def _bilinear64(img: np.ndarray, u: float, v: float) -> np.ndarray:
    u0, v0 = math.floor(u), math.floor(v)
    du, dv = u - u0, v - v0
    return ((1 - du) * (1 - dv) * img[v0, u0] + du * (1 - dv) * img[v0, u0 + 1]
            + (1 - du) * dv * img[v0 + 1, u0] + du * dv * img[v0 + 1, u0 + 1])


def _iter_proj_ref(img9: np.ndarray, t: np.ndarray, p: np.ndarray, max_iter: int, lam0: float, thr: float):
    """Scalar float64 transcription of spec §4.2 for one pixel; returns (u, v, converged, final cost)."""
    H, W = img9.shape[:2]
    u = min(max(p[0], 1.0), W - 2.0)
    v = min(max(p[1], 1.0), H - 2.0)
    lam, conv, cost = lam0, False, None

    def ray(uu, vv):
        r = _bilinear64(img9, uu, vv)
        return r[0:3] / np.linalg.norm(r[0:3]), r[3:6], r[6:9]

    for _ in range(max_iter):
        r, gx, gy = ray(u, v)
        e = r - t
        c = float(e @ e)
        A = np.array([[gx @ gx + lam, gx @ gy], [gx @ gy, gy @ gy + lam]])
        b = -np.array([e @ gx, e @ gy])
        d = np.linalg.solve(A, b)
        un = min(max(u + d[0], 1.0), W - 2.0)
        vn = min(max(v + d[1], 1.0), H - 2.0)
        rn = ray(un, vn)[0]
        cn = float((rn - t) @ (rn - t))
        if cn < c:
            u, v, lam, conv, cost = un, vn, lam * 0.1, cn < thr, cn
        else:
            lam, conv, cost = lam * 10.0, c < thr, c
    return u, v, conv, cost


def _make_problem(B: int, H: int, W: int, N: int, seed: int, max_off: float = 1.5):
    """Rays with grads [B,H,W,9] f32, targets at known sub-pixel positions p_true [B,HW,2] and perturbed p_init."""
    rng = np.random.default_rng(seed)
    imgs = []
    for b in range(B):
        rays = _ray_field(H, W, seed + b)
        gx, gy = _scharr_grad(rays)
        imgs.append(np.concatenate([rays, gx, gy], -1))
    img9 = np.stack(imgs)  # float64 [B,H,W,9]
    img9_32 = img9.astype(np.float32)
    HW = H * W
    p_true = np.stack([rng.uniform(3.0, W - 4.0, (B, HW)), rng.uniform(3.0, H - 4.0, (B, HW))], -1)
    t = np.zeros((B, HW, 3))
    for b in range(B):
        for n in range(HW):
            # targets from the float32 field the kernel sees (bilinear in float64), so the true minimum is exact
            r = _bilinear64(img9_32[b].astype(np.float64), *p_true[b, n])[0:3]
            t[b, n] = r / np.linalg.norm(r)
    p_init = p_true + rng.uniform(-max_off, max_off, p_true.shape)
    return img9_32, t, p_true, p_init


@pytest.fixture(scope="module")
def problem():
    return _make_problem(B=2, H=20, W=28, N=0, seed=3)


def test_iter_proj_recovers_subpixel_correspondences(problem):
    img9, t, p_true, p_init = problem
    p, conv = kernels.iter_proj(torch.from_numpy(img9), torch.from_numpy(t).float(),
                                torch.from_numpy(p_init).float(), 10, 1e-8, 1e-6)
    assert p.dtype == torch.float32 and conv.dtype == torch.bool
    assert p.shape == p_init.shape and conv.shape == p_init.shape[:2]
    err = np.linalg.norm(p.numpy() - p_true, axis=-1)
    assert conv.float().mean().item() > 0.97
    assert np.median(err) < 1e-3
    assert np.quantile(err[conv.numpy()], 0.99) < 0.05  # converged => within the 1e-3 rad cost ball (~0.06 px here)


def test_iter_proj_matches_float64_reference(problem):
    img9, t, p_true, p_init = problem
    p, conv = kernels.iter_proj(torch.from_numpy(img9), torch.from_numpy(t).float(),
                                torch.from_numpy(p_init).float(), 10, 1e-8, 1e-6)
    rng = np.random.default_rng(0)
    checked = 0
    for b in range(img9.shape[0]):
        for n in rng.choice(t.shape[1], 40, replace=False):
            u, v, c_ok, cost = _iter_proj_ref(img9[b].astype(np.float64), t[b, n], p_init[b, n], 10, 1e-8, 1e-6)
            assert abs(p[b, n, 0].item() - u) < 1e-3 and abs(p[b, n, 1].item() - v) < 1e-3, (b, n)
            if cost < 1e-7 or cost > 1e-5:  # well conditioned w.r.t. the threshold
                assert bool(conv[b, n]) == c_ok
                checked += 1
    assert checked > 60


def test_iter_proj_clamps_and_handles_non_multiple_of_16():
    H, W = 7, 9  # HW = 63, not a multiple of 16
    rays = _ray_field(H, W, 1)
    gx, gy = _scharr_grad(rays)
    img = torch.from_numpy(np.concatenate([rays, gx, gy], -1)[None]).float()
    t = torch.nn.functional.normalize(torch.randn(1, H * W, 3), dim=-1)
    p0 = torch.tensor([[-50.0, 100.0]]).expand(1, H * W, 2).contiguous()
    p, conv = kernels.iter_proj(img, t, p0, 0, 1e-8, 1e-6)
    assert torch.all(p[..., 0] == 1.0) and torch.all(p[..., 1] == H - 2)
    assert not conv.any()
    p, _ = kernels.iter_proj(img, t, p0, 10, 1e-8, 1e-6)
    assert torch.all((p[..., 0] >= 1) & (p[..., 0] <= W - 2) & (p[..., 1] >= 1) & (p[..., 1] <= H - 2))
    # NaN starts and NaN rays stay in bounds (NaN clamps to the lower bound, as fminf/fmaxf in CUDA)
    p0n = p0.clone()
    p0n[0, :5] = float("nan")
    img_n = img.clone()
    img_n[0, 3, 4] = float("nan")
    p, conv = kernels.iter_proj(img_n, t, p0n, 10, 1e-8, 1e-6)
    assert torch.all((p[..., 0] >= 1) & (p[..., 0] <= W - 2) & (p[..., 1] >= 1) & (p[..., 1] <= H - 2))
    p, _ = kernels.iter_proj(img_n, t, p0n, 0, 1e-8, 1e-6)
    assert torch.all(p[0, :5] == 1.0)


def test_iter_proj_rejects_bad_input():
    img = torch.zeros(1, 8, 8, 9)
    with pytest.raises(ValueError):
        kernels.iter_proj(img, torch.zeros(1, 63, 3), torch.zeros(1, 64, 2), 10, 1e-8, 1e-6)
    with pytest.raises(TypeError):
        kernels.iter_proj(img.double(), torch.zeros(1, 64, 3), torch.zeros(1, 64, 2), 10, 1e-8, 1e-6)
    with pytest.raises(ValueError):
        kernels.iter_proj(torch.zeros(1, 8, 8, 6), torch.zeros(1, 64, 3), torch.zeros(1, 64, 2), 10, 1e-8, 1e-6)


# ------------------------------------------------------------------------------------------------ refine_matches
def _refine_ref(D11: np.ndarray, D21: np.ndarray, p1: np.ndarray, radius: int, dmax: int) -> np.ndarray:
    """Per-pixel numpy transcription of spec §4.4 with the documented score/tie rule.

    Score: sequential float32 (float64 for double input) accumulation of separately rounded products; running best
    starts at 0 (half) / smallest positive normal (float, double); strict '>'; u offset outer, v offset inner.
    """
    B, H, W, F = D11.shape
    acc = np.float64 if D11.dtype == np.float64 else np.float32
    init = 0.0 if D11.dtype == np.float16 else np.finfo(acc).tiny
    out = p1.copy()
    for b in range(B):
        for n in range(H * W):
            u0, v0 = int(p1[b, n, 0]), int(p1[b, n, 1])
            best = acc(init)
            q = D21[b, n].astype(acc)
            for d in range(dmax, 0, -1):
                rd = radius * d
                ub, vb = u0, v0
                for i in range(0, 2 * rd + 1, d):
                    for j in range(0, 2 * rd + 1, d):
                        u, v = u0 - rd + i, v0 - rd + j
                        if 0 <= u < W and 0 <= v < H:
                            c = D11[b, v, u].astype(acc)
                            s = acc(0)
                            for k in range(F):
                                s = acc(s + acc(c[k] * q[k]))
                            if s > best:
                                best, ub, vb = s, u, v
                u0, v0 = ub, vb
            out[b, n] = (u0, v0)
    return out


def _unit_desc(rng, shape, dtype):
    d = rng.standard_normal(shape)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return d.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_refine_matches_finds_planted_descriptor(dtype):
    rng = np.random.default_rng(5)
    B, H, W, F = 2, 40, 44, 24
    D11 = _unit_desc(rng, (B, H, W, F), dtype)
    HW = H * W
    p1 = np.stack([rng.integers(0, W, (B, HW)), rng.integers(0, H, (B, HW))], -1).astype(np.int64)
    D21 = _unit_desc(rng, (B, HW, F), dtype)
    # plant: for a subset of pixels, D21 equals the descriptor of a first-level candidate (offset 5*(i,j)) in image
    target = p1.copy()
    planted = np.zeros((B, HW), dtype=bool)
    for b in range(B):
        for n in rng.choice(HW, 300, replace=False):
            i, j = rng.integers(-3, 4, 2)
            u, v = p1[b, n, 0] + 5 * i, p1[b, n, 1] + 5 * j
            if 0 <= u < W and 0 <= v < H:
                D21[b, n] = D11[b, v, u]
                target[b, n] = (u, v)
                planted[b, n] = True
    out = kernels.refine_matches(torch.from_numpy(D11), torch.from_numpy(D21), torch.from_numpy(p1), 3, 5).numpy()
    assert out.dtype == np.int64 and out.shape == p1.shape
    assert planted.sum() > 200
    # |D|^2 = 1 > every other unit-descriptor dot product, and it is never beaten at finer levels (strict '>').
    np.testing.assert_array_equal(out[planted], target[planted])
    # every output lies inside the image
    assert (out[..., 0] >= 0).all() and (out[..., 0] < W).all() and (out[..., 1] >= 0).all() and (out[..., 1] < H).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_refine_matches_equals_reference(dtype):
    rng = np.random.default_rng(11)
    B, H, W, F = 1, 12, 14, 24
    D11 = _unit_desc(rng, (B, H, W, F), dtype)
    D21 = _unit_desc(rng, (B, H * W, F), dtype)
    p1 = np.stack([rng.integers(0, W, (B, H * W)), rng.integers(0, H, (B, H * W))], -1).astype(np.int64)
    out = kernels.refine_matches(torch.from_numpy(D11), torch.from_numpy(D21), torch.from_numpy(p1), 3, 5).numpy()
    np.testing.assert_array_equal(out, _refine_ref(D11, D21, p1, 3, 5))
    # smaller pattern
    out = kernels.refine_matches(torch.from_numpy(D11), torch.from_numpy(D21), torch.from_numpy(p1), 1, 2).numpy()
    np.testing.assert_array_equal(out, _refine_ref(D11, D21, p1, 1, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_refine_matches_tie_and_nonpositive_rules(dtype):
    B, H, W, F = 1, 9, 11, 4
    HW = H * W
    # all candidate scores negative: every pixel stays put (initial best is 0 / smallest positive normal)
    D11 = torch.zeros(B, H, W, F, dtype=dtype)
    D11[..., 0] = 1
    D21 = torch.zeros(B, HW, F, dtype=dtype)
    D21[..., 0] = -1
    gen = torch.Generator().manual_seed(0)
    p1 = torch.stack([torch.randint(0, W, (B, HW), generator=gen), torch.randint(0, H, (B, HW), generator=gen)], -1)
    np.testing.assert_array_equal(kernels.refine_matches(D11, D21, p1, 3, 5).numpy(), p1.numpy())
    # all scores equal and positive: the first in-image candidate visited at the coarsest level wins, then stays
    D21[..., 0] = 1
    out = kernels.refine_matches(D11, D21, p1, 1, 2).numpy()
    exp = _refine_ref(D11.numpy(), D21.numpy(), p1.numpy(), 1, 2)
    np.testing.assert_array_equal(out, exp)
    u0, v0 = p1[0, 0].tolist()
    first = next((u, v) for u in (u0 - 2, u0, u0 + 2) for v in (v0 - 2, v0, v0 + 2) if 0 <= u < W and 0 <= v < H)
    assert tuple(out[0, 0]) == first


def test_refine_matches_rejects_bad_input():
    D11 = torch.zeros(1, 4, 4, 8)
    with pytest.raises(TypeError):
        kernels.refine_matches(D11, torch.zeros(1, 16, 8, dtype=torch.float16),
                               torch.zeros(1, 16, 2, dtype=torch.int64), 3, 5)
    with pytest.raises(TypeError):
        kernels.refine_matches(D11, torch.zeros(1, 16, 8), torch.zeros(1, 16, 2), 3, 5)
    with pytest.raises(ValueError):
        kernels.refine_matches(D11, torch.zeros(1, 15, 8), torch.zeros(1, 16, 2, dtype=torch.int64), 3, 5)
    with pytest.raises(ValueError):
        kernels.refine_matches(D11, torch.zeros(1, 16, 8), torch.zeros(1, 16, 2, dtype=torch.int64), 3, 0)


def test_backend_selection():
    assert kernels.backend() in ("cuda", "torch")
    kernels.set_backend("torch")
    assert kernels.backend() == "torch"
    with pytest.raises(ValueError):
        kernels.set_backend("opencl")
    if not kernels.cuda_available():
        with pytest.raises(RuntimeError):
            kernels.set_backend("cuda")
    kernels.set_backend("auto")
