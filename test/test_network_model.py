"""MASt3R model pieces: RoPE against the float64 formula, precision modes, decode options, batching, SLAM wrappers."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mast3r_slam_ros.network import inference
from mast3r_slam_ros.network.keyed import apply_keyed_weights
from mast3r_slam_ros.network.model import Mast3rConfig, Mast3rModel
from mast3r_slam_ros.network.rope import RoPE2D

TINY = Path(__file__).resolve().parent / "data" / "mast3r_tiny_96x64"


def _rope_reference(x: np.ndarray, pos: np.ndarray, base: float = 100.0) -> np.ndarray:
    """Float64 loop over channel pairs, written from spec §3.2: halves (y | x), pairs (k, k + D/4), theta = p*base^(-k/Q)."""
    b, h, n, d = x.shape
    q = d // 4
    out = x.astype(np.float64).copy()
    for half, axis in ((0, 0), (1, 1)):
        off = half * (d // 2)
        for k in range(q):
            theta = pos[:, :, axis].astype(np.float64) * base ** (-k / q)  # [B, N]
            c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
            u = x[..., off + k].astype(np.float64)
            v = x[..., off + k + q].astype(np.float64)
            out[..., off + k] = u * c - v * s
            out[..., off + k + q] = v * c + u * s
    return out


# fp32: angles are built in fp32 like upstream (abs angle error ~ 31 * 1e-7 rad at the grid border); cuRoPE: 1.3e-5
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_rope_matches_float64_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 24 * 32, 64, generator=g)
    ys, xs = torch.meshgrid(torch.arange(24), torch.arange(32), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1)[None]
    xd = x.to(dtype)
    out = RoPE2D(100.0)(xd, pos)
    assert out.dtype == dtype
    ref = _rope_reference(xd.float().numpy(), pos.numpy())
    err = np.abs(out.float().numpy() - ref).max()
    assert err < tol, err
    # the two axes are not interchangeable and the base matters: a wrong convention gives O(1) errors
    assert np.abs(_rope_reference(x.numpy(), pos.flip(-1).numpy()) - ref).max() > 0.5
    assert np.abs(_rope_reference(x.numpy(), pos.numpy(), base=10000.0) - ref).max() > 0.5


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError):
        RoPE2D()(torch.zeros(1, 1, 4, 6), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        RoPE2D()(torch.zeros(1, 1, 4, 8), torch.zeros(1, 4, 3, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny():
    model = Mast3rModel(Mast3rConfig.tiny())
    apply_keyed_weights(model)
    ref = np.load(TINY / "reference.npz")
    img1, img2 = torch.from_numpy(ref["img1"]), torch.from_numpy(ref["img2"])
    shape = torch.from_numpy(ref["true_shape"])
    return model, img1, img2, shape


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# envelopes of spec §8.3 (measured on the full model on an H100), with about 2x margin
@pytest.mark.parametrize("precision, tok, pts, desc", [("bf16", 5e-2, 2e-1, 5e-2), ("fp16", 6e-3, 4e-2, 6e-3)])
def test_autocast_precisions_stay_within_spec_envelope(tiny, precision, tok, pts, desc):
    model, img1, img2, shape = tiny
    model.set_precision("fp32")
    f1, p1 = model.encode(img1, shape)
    f2, p2 = model.encode(img2, shape)
    ref = model.decode(f1, p1, f2, p2, shape)
    model.set_precision(precision)
    try:
        g1, q1 = model.encode(img1, shape)
        g2, _ = model.encode(img2, shape)
        out = model.decode(g1, q1, g2, q1, shape)
    finally:
        model.set_precision("fp32")
    assert g1.dtype == torch.float32 and _rel(g1, f1) < tok and _rel(g1, f1) > 0  # autocast really ran
    for a, b in zip(out, ref):
        assert a.pts3d.dtype == torch.float32  # heads in fp32
        assert _rel(a.pts3d, b.pts3d) < pts and _rel(a.conf, b.conf) < pts
        assert (a.desc - b.desc).abs().max() < desc and _rel(a.desc_conf, b.desc_conf) < desc
        assert torch.all(a.conf >= 1) and torch.all(a.desc_conf > 0)


def test_tf32_equals_fp32_on_cpu(tiny):
    model, img1, _, shape = tiny
    f, p = model.encode(img1, shape)
    model.set_precision("tf32")
    try:
        g, _ = model.encode(img1, shape)
    finally:
        model.set_precision("fp32")
    assert torch.equal(f, g)  # TF32 only changes CUDA matmuls


def test_precision_context_sets_and_restores_tf32_flags():
    from mast3r_slam_ros.network.precision import precision_context

    mm = torch.backends.cuda.matmul
    before = (mm.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with precision_context("tf32", "cpu"):
        assert mm.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
    with precision_context("fp32", "cpu", "head"):
        assert mm.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
    with precision_context("bf16", "cpu", "head"):  # heads: float32 with TF32 allowed, no autocast
        assert mm.fp32_precision == "tf32" and not torch.is_autocast_enabled("cpu")
    with precision_context("bf16", "cpu", "trunk"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert (mm.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    _ = mm.allow_tf32  # the legacy getter still works afterwards (no mixed-API error)
    with pytest.raises(ValueError, match="precision"):
        with precision_context("fp8", "cpu"):
            pass


def test_partial_decode_and_batching(tiny):
    model = tiny[0]
    img1, img2, shape = _small_pair()
    f1, p1 = model.encode(img1, shape)
    f2, p2 = model.encode(img2, shape)
    r1, r2 = model.decode(f1, p1, f2, p2, shape)
    s1, s2 = model.decode(f1, p1, f2, p2, (32, 48), need_res2=False, need_desc=False)
    assert s2 is None and s1.desc is None and s1.desc_conf is None
    assert torch.equal(s1.pts3d, r1.pts3d) and torch.equal(s1.conf, r1.conf)
    # a batch of two different pairs equals the two single decodes
    fb, pb = torch.cat([f1, f2]), torch.cat([p1, p2])
    fo, po = torch.cat([f2, f1]), torch.cat([p2, p1])
    b1, b2 = model.decode(fb, pb, fo, po, shape.expand(2, 2))
    t1, t2 = model.decode(f2, p2, f1, p1, shape)
    # fp32 bounds of spec §8.3 (batched GEMMs may sum in another order; exp() amplifies pts3d/conf)
    for got, want in ((b1.pts3d[0], r1.pts3d[0]), (b2.pts3d[0], r2.pts3d[0]), (b1.pts3d[1], t1.pts3d[0]),
                      (b1.conf[1], t1.conf[0])):
        assert _rel(got, want) < 3e-4
    assert (b2.desc[1] - t2.desc[0]).abs().max() < 5e-5 and _rel(b2.desc_conf[1], t2.desc_conf[0]) < 1e-4


def test_input_validation(tiny):
    model, img1, _, shape = tiny
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode(torch.zeros(1, 3, 60, 96))
    with pytest.raises(ValueError):
        model.encode(torch.zeros(3, 64, 96))
    f, p = model.encode(img1, shape)
    with pytest.raises(ValueError, match="share one shape"):
        model.decode(torch.cat([f, f]), torch.cat([p, p]), torch.cat([f, f]), torch.cat([p, p]),
                     torch.tensor([[64, 96], [96, 64]]))
    with pytest.raises(ValueError, match="does not match"):
        model.decode(f, p, f, p, (32, 96))


@pytest.mark.parametrize("hw", [(96, 64), (48, 80), (80, 48)])
def test_portrait_and_odd_token_grids(tiny, hw):
    """Portrait images run untransposed; an odd number of token rows/cols exercises the refinenet4 crop."""
    model = tiny[0]
    h, w = hw
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f, p = model.encode(img, torch.tensor([[h, w]]))
    assert f.shape == (1, h * w // 256, 128) and p[0, -1].tolist() == [h // 16 - 1, w // 16 - 1]
    r1, r2 = model.decode(f, p, f, p, torch.tensor([[h, w]], dtype=torch.int32))
    for r in (r1, r2):
        assert r.pts3d.shape == (1, h, w, 3) and r.conf.shape == (1, h, w)
        assert r.desc.shape == (1, h, w, 24) and r.desc_conf.shape == (1, h, w)
        assert torch.isfinite(r.pts3d).all() and torch.allclose(r.desc.norm(dim=-1), torch.ones(()), atol=1e-5)


def _frame(img, shape):
    return SimpleNamespace(img=img, true_shape=shape, feat=None, pos=None)


def _small_pair():
    g = torch.Generator().manual_seed(2)
    img1 = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    return img1, torch.roll(img1, 5, dims=-1), torch.tensor([[32, 48]], dtype=torch.int32)


def test_inference_wrappers(tiny):
    model = tiny[0]
    img1, img2, shape = _small_pair()
    fi, fj = _frame(img1, shape), _frame(img2, shape)
    X, C = inference.mono(model, fi)
    assert fi.feat is not None and X.shape == (32 * 48, 3) and C.shape == (32 * 48, 1)
    r1, _ = model.decode(fi.feat, fi.pos, fi.feat, fi.pos, shape, need_res2=False, need_desc=False)
    assert torch.equal(X, r1.pts3d.reshape(-1, 3)) and torch.equal(C, r1.conf.reshape(-1, 1))
    a = inference.asymmetric(model, fi, fj)
    assert a.X.shape == (2, 32, 48, 3) and a.D.shape == (2, 32, 48, 24) and a.Q.shape == (2, 32, 48)
    # batched symmetric decode == upstream's per-edge loop, order [ii, ji, jj, ij]
    feat_i, pos_i = torch.cat([fi.feat, fj.feat]), torch.cat([fi.pos, fj.pos])
    feat_j, pos_j = torch.cat([fj.feat, fi.feat]), torch.cat([fj.pos, fi.pos])
    sb = inference.symmetric_batch(model, feat_i, pos_i, feat_j, pos_j, shape, max_batch=3)

    class Looping:  # same model without the batching flag -> upstream loop
        encode, decode = model.encode, model.decode

    assert isinstance(model, inference.Predictor) and isinstance(Looping(), inference.Predictor)
    sl = inference.symmetric_batch(Looping(), feat_i, pos_i, feat_j, pos_j, shape)
    assert sb.X.shape == (4, 2, 32, 48, 3) and sl.X.shape == sb.X.shape
    for name, tol in (("X", 3e-4), ("C", 3e-4), ("D", 5e-5), ("Q", 1e-4)):
        assert _rel(getattr(sb, name), getattr(sl, name)) < tol, name
    # edge 0 = (i, j): ii / ji come from decode(i, j) (= asymmetric(i, j)); edge 1 = (j, i): its jj / ij too
    for k in (0, 1):
        assert _rel(sb.X[k, 0], a.X[k]) < 3e-4 and _rel(sb.X[k + 2, 1], a.X[k]) < 3e-4
        assert _rel(sb.Q[k, 0], a.Q[k]) < 1e-4 and _rel(sb.Q[k + 2, 1], a.Q[k]) < 1e-4
    assert math.isfinite(float(sb.Q.sum()))
