"""Tracking linearization kernels (``kernels.track_system_rays`` / ``track_system_calib``, PyTorch implementation) and
the tracker's sync-free bookkeeping (keyframe counts, packed frame statistics, host Gauss–Newton loop, non-finite
network output), on the CPU. The CUDA kernels are compared with these in test/test_kernels_cuda.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mast3r_slam_ros import kernels
from mast3r_slam_ros.kernels.track_torch import track_system_calib_torch, track_system_rays_torch
from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam import tracker as tracker_mod
from mast3r_slam_ros.slam.frame import Frame
from mast3r_slam_ros.slam.keyframes import KeyframeStore
from mast3r_slam_ros.slam.tracker import (FrameTracker, TrackingParams, _gn_loop, _host_gn_loop, calib_residual,
                                          frame_statistics, keyframe_counts, keyframe_decision, ray_dist_residual,
                                          solve_step)

XI = torch.tensor([[0.05, -0.03, 0.04, 0.02, -0.03, 0.01, 0.08]])
K = torch.tensor([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
HH, WW = 48, 64


def ray_problem(n: int = 2000, seed: int = 0):
    """Frame points, noisy keyframe points, sqrt-information with ~20 % zero rows."""
    g = torch.Generator().manual_seed(seed)
    z = 1.0 + 3.0 * torch.rand(n, 1, generator=g)
    Xf = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * z, z], -1)
    Xk = Sim3.exp(XI).act(Xf) + 0.02 * torch.randn(n, 3, generator=g)
    Xk[::50] += 1.0  # outliers (Huber-clipped)
    si = (torch.rand(n, 1, generator=g) + 0.5) * torch.tensor([1 / 0.003] * 3 + [1 / 10.0])
    si[torch.rand(n, generator=g) < 0.2] = 0.0
    return Xf, Xk, si


def calib_problem(n: int = 2000, seed: int = 1):
    """Points partly behind the camera (z < 0) and partly projecting outside the border-extended image."""
    g = torch.Generator().manual_seed(seed)
    z = 0.5 + 3.0 * torch.rand(n, 1, generator=g)
    Xf = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 1.6 * z, z], -1)
    Xf[::17, 2] = -Xf[::17, 2]  # behind the camera
    P = Sim3.exp(XI).act(Xf)
    uv = P[:, :2] / P[:, 2:3].abs() * 60.0 + torch.tensor([31.5, 23.5])
    meas = torch.cat([uv + 0.5 * torch.randn(n, 2, generator=g), torch.log(P[:, 2:3].abs())], -1)
    static = torch.rand(n, 1, generator=g) > 0.1
    sq = torch.rand(n, 1, generator=g) + 1.0
    base = torch.tensor([1.0, 1.0, 0.1])
    return Xf, meas, static, sq, base


def _solve(packed: torch.Tensor):
    H, g = packed[:49].reshape(7, 7), -packed[49:56].reshape(7, 1)
    return torch.linalg.solve(H, g).reshape(7)


def test_rays_system_equals_solve_step():
    Xf, Xk, si = ray_problem()
    T = Sim3.exp(0.3 * XI)
    packed = track_system_rays_torch(T.data, Xf, Xk, si, 1.345)
    assert packed.dtype == torch.float64 and packed.shape == (58,)
    H = packed[:49].reshape(7, 7)
    torch.testing.assert_close(H, H.T, rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(H).min() > 0
    r, J = ray_dist_residual(T, Xf, Xk)
    delta, cost = solve_step(J, r, si, 1.345)
    torch.testing.assert_close(_solve(packed), delta, rtol=1e-8, atol=1e-12)
    assert math.isclose(0.5 * float(packed[56]), cost, rel_tol=1e-12)
    assert int(packed[57]) == int((si.abs().sum(-1) > 0).sum())


def test_rays_system_against_numpy_float64():
    """H, Aᵀb, bᵀb from the per-row formulas evaluated independently in float64 NumPy."""
    Xf, Xk, si = ray_problem(500, seed=3)
    T = Sim3.exp(0.5 * XI)
    packed = track_system_rays_torch(T.data, Xf, Xk, si, 1.345).numpy()
    Td = T.double()
    P = Td.act(Xf.double()).numpy()
    xk = Xk.double().numpy()
    d = np.linalg.norm(P, axis=1, keepdims=True)
    ray = P / d
    dk = np.linalg.norm(xk, axis=1, keepdims=True)
    r = np.concatenate([xk / dk - ray, dk - d], 1)
    A_rows, b_rows = [], []
    for n in range(P.shape[0]):
        drd = np.vstack([(np.eye(3) - np.outer(ray[n], ray[n])) / d[n], ray[n][None]])
        Px = np.array([[0, -P[n, 2], P[n, 1]], [P[n, 2], 0, -P[n, 0]], [-P[n, 1], P[n, 0], 0]])
        J = -drd @ np.hstack([np.eye(3), -Px, P[n][:, None]])
        s = si[n].double().numpy()
        x = np.abs(s * r[n])
        w = np.where(x < 1.345, 1.0, 1.345 / np.maximum(x, 1e-30))
        sw = s * np.sqrt(w)
        A_rows.append(sw[:, None] * J)
        b_rows.append(sw * r[n])
    A, b = np.concatenate(A_rows), np.concatenate(b_rows)
    scale = np.abs(A.T @ A).max()
    np.testing.assert_allclose(packed[:49].reshape(7, 7), A.T @ A, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(packed[49:56], A.T @ b, rtol=1e-4, atol=1e-5 * np.abs(A.T @ b).max())
    assert math.isclose(packed[56], b @ b, rel_tol=1e-4)


def test_calib_system_equals_solve_step_and_masks_invalid_projections():
    Xf, meas, static, sq, base = calib_problem()
    T = Sim3.exp(0.3 * XI)
    packed = track_system_calib_torch(T.data, Xf, meas, static, sq, base, K, (HH, WW), -10.0, 1e-6, 1.345)
    r, J, valid_proj = calib_residual(T, Xf, meas, K, (HH, WW), -10.0, 1e-6)
    assert not valid_proj[::17].any()  # behind the camera
    assert valid_proj.float().mean() < 0.9  # some fall outside the border-extended image
    si = (static & valid_proj).float() * sq * base
    delta, cost = solve_step(J, r, si, 1.345)
    torch.testing.assert_close(_solve(packed), delta, rtol=1e-8, atol=1e-12)
    assert math.isclose(0.5 * float(packed[56]), cost, rel_tol=1e-12)
    assert int(packed[57]) == int((static & valid_proj).sum())
    assert torch.isfinite(packed).all()


def test_public_api_cpu_dispatch_and_checks():
    Xf, Xk, si = ray_problem(100)
    T = Sim3.exp(XI).data
    torch.testing.assert_close(kernels.track_system_rays(T, Xf, Xk, si, 1.345),
                               track_system_rays_torch(T, Xf, Xk, si, 1.345), rtol=0, atol=0)
    with pytest.raises(ValueError):
        kernels.track_system_rays(T, Xf, Xk, si[:, :3], 1.345)
    with pytest.raises(TypeError):
        kernels.track_system_rays(T.double(), Xf, Xk, si, 1.345)
    with pytest.raises(ValueError):
        kernels.track_system_rays(T, Xf, Xk, si, 0.0)
    Xc, meas, static, sq, base = calib_problem(100)
    torch.testing.assert_close(
        kernels.track_system_calib(T, Xc, meas, static, sq, base, K, (HH, WW), -10.0, 1e-6, 1.345),
        track_system_calib_torch(T, Xc, meas, static, sq, base, K, (HH, WW), -10.0, 1e-6, 1.345), rtol=0, atol=0)
    with pytest.raises(TypeError):
        kernels.track_system_calib(T, Xc, meas, static.float(), sq, base, K, (HH, WW), -10.0, 1e-6, 1.345)
    with pytest.raises(ValueError):
        kernels.track_system_calib(T, Xc, meas, static, sq, base[:2], K, (HH, WW), -10.0, 1e-6, 1.345)


def test_empty_system_is_zero():
    e = torch.zeros(0, 3)
    out = kernels.track_system_rays(Sim3.identity(1).data, e, e, torch.zeros(0, 4), 1.345)
    assert out.shape == (58,) and not out.any()


@pytest.mark.parametrize("hw,frac_valid,n_unique", [(1000, 0.9, 900), (1000, 0.9, 200), (1000, 0.2, 1000),
                                                    (777, 0.0, 10), (500, 1.0, 1)])
def test_keyframe_counts_against_unique(hw, frac_valid, n_unique):
    rng = np.random.default_rng(hw + n_unique)
    valid = torch.from_numpy(rng.random(hw) < frac_valid)[:, None]
    idx = torch.from_numpy(rng.integers(0, n_unique, hw))
    Q = torch.from_numpy(rng.random(hw) * 4)[:, None]
    n_match, n_uniq = keyframe_counts(valid, Q, idx, 1.5).tolist()
    assert n_match == int((valid[:, 0] & (Q[:, 0] > 1.5)).sum())
    assert n_uniq == torch.unique(idx[valid[:, 0]]).numel()
    new_kf, mf, uf = keyframe_decision(valid, Q, idx, 1.5, 0.333)
    assert (mf, uf) == (n_match / hw, n_uniq / hw) and new_kf == (min(mf, uf) < 0.333)


def test_frame_statistics_packing():
    hw = 300
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(hw, 1, generator=g) > 0.3
    Q = torch.rand(hw, 1, generator=g) * 3
    idx = torch.randint(0, hw, (hw,), generator=g)
    valid_opt = valid & (Q > 2.0)
    T0 = Sim3.exp(XI).data
    X = torch.randn(hw, 3, generator=g)
    stats = frame_statistics(valid_opt, valid, Q, idx, 1.5, (X, Q), T0)
    assert stats.dtype == torch.float64 and stats.shape == (12,)
    assert int(stats[0]) == int(valid_opt.sum())
    assert stats[1:3].long().tolist() == keyframe_counts(valid, Q, idx, 1.5).tolist()
    assert float(stats[3]) == 1.0
    torch.testing.assert_close(stats[4:].float().reshape(1, 8), T0, rtol=0, atol=0)
    X[5, 1] = float("nan")
    assert float(frame_statistics(valid_opt, valid, Q, idx, 1.5, (Q, X), T0)[3]) == 0.0
    X[5, 1] = float("inf")
    assert float(frame_statistics(valid_opt, valid, Q, idx, 1.5, (X,), T0)[3]) == 0.0


def test_host_gn_loop_equals_eager_loop_on_cpu():
    """The device loop (packed normal equations, CPU Cholesky) takes the same steps as the eager loop."""
    Xf, Xk, si = ray_problem(3000, seed=5)
    p = TrackingParams()

    def linearize(T):
        r, J = ray_dist_residual(T, Xf, Xk)
        return J, r, si

    eager = _gn_loop(Sim3.identity(1), linearize, p)
    host = _host_gn_loop(lambda Td: track_system_rays_torch(Td, Xf, Xk, si, p.huber), Sim3.identity(1).data,
                         torch.device("cpu"), p)
    assert host.iterations == eager.iterations and host.converged == eager.converged
    assert host.n_valid == eager.n_valid
    # the host loop retracts in float64 (lie.retr_host), the eager loop in float32: costs agree to float32 rounding
    assert math.isclose(host.cost, eager.cost, rel_tol=1e-6)
    torch.testing.assert_close(host.T.data, eager.T.data, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- FrameTracker.track
def _frame(fid: int, T_WC: Sim3, H: int = HH, W: int = WW) -> Frame:
    return Frame(frame_id=fid, stamp_ns=fid * 10, img=torch.zeros(1, 3, H, W),
                 true_shape=torch.tensor([[H, W]], dtype=torch.int32), uimg=torch.zeros(H, W, 3, dtype=torch.uint8),
                 T_WC=T_WC)


def _tracking_setup(device: str = "cpu", nan: bool = False):
    """A keyframe at the origin and a frame moved by ``Exp(XI)``; matching replaced by exact correspondences."""
    hw = HH * WW
    g = torch.Generator().manual_seed(7)
    z = 1.5 + torch.rand(hw, 1, generator=g)
    v, u = torch.meshgrid(torch.arange(HH, dtype=torch.float32), torch.arange(WW, dtype=torch.float32),
                          indexing="ij")
    Xk = torch.cat([((u.reshape(-1, 1) - 31.5) / 60) * z, ((v.reshape(-1, 1) - 23.5) / 60) * z, z], -1)
    T_true = Sim3.exp(XI)  # T_CkCf
    Xf_frame = T_true.inv().act(Xk)  # frame pointmap, keyframe pixel k <-> frame pixel k
    store = KeyframeStore()
    kf = _frame(0, Sim3.identity(1, device=device))
    kf.img = kf.img.to(device)
    kf.update_pointmap(Xk.to(device), torch.full((hw, 1), 2.0, device=device))
    store.append(kf)
    frame = _frame(1, Sim3.identity(1, device=device))
    frame.img = frame.img.to(device)
    Xff = Xf_frame.clone()
    if nan:
        Xff[10, 0] = float("nan")
    m = SimpleNamespace(idx_f2k=torch.arange(hw), valid_match_k=torch.ones(hw, 1, dtype=torch.bool),
                        Xff=Xff, Cff=torch.full((hw, 1), 2.0), Xkf=Xf_frame.clone(),  # keyframe in frame camera
                        Ckf=torch.full((hw, 1), 2.0),
                        Qk=torch.full((hw, 1), 3.0))
    m = SimpleNamespace(**{k: t.to(device) for k, t in vars(m).items()})
    cfg = SimpleNamespace(use_calib=False, tracking=TrackingParams(), matching=SimpleNamespace())
    trk = FrameTracker(predictor=None, keyframes=store, cfg=cfg)
    return trk, frame, kf, m, T_true


def test_track_recovers_pose_and_nonfinite_output_goes_to_reloc(monkeypatch):
    trk, frame, kf, m, T_true = _tracking_setup()
    monkeypatch.setattr(tracker_mod, "match_asymmetric", lambda *a, **k: m)
    out = trk.track(frame)
    assert not out.try_reloc and out.converged and out.iterations >= 1
    assert out.valid_frac == 1.0 and out.match_frac == 1.0 and out.unique_frac == 1.0 and not out.new_kf
    torch.testing.assert_close(out.T_CkCf.data, T_true.data, rtol=0, atol=1e-4)
    assert kf.N == 2 and frame.N == 1

    trk, frame, kf, m, _ = _tracking_setup(nan=True)
    monkeypatch.setattr(tracker_mod, "match_asymmetric", lambda *a, **k: m)
    out = trk.track(frame)  # must not raise
    assert out.try_reloc and not out.new_kf and "NaN" in out.message
    assert kf.N == 1 and torch.isfinite(kf.X_canon).all()  # keyframe untouched
    assert frame.X_canon is None or torch.isfinite(frame.X_canon).all()
