"""Tracking math (spec §5.2–5.4, §5.7): residual Jacobians vs finite differences, Sim(3) recovery for both cost
functions, Huber IRLS robustness, Cholesky failure, convergence rule, keyframe rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.tracker import (TrackingFailure, TrackingParams, _converged, calib_residual, huber_weight,
                                          keyframe_decision, opt_pose_calib_sim3, opt_pose_ray_dist_sim3,
                                          ray_dist_residual, solve_step)

XI_TRUE = torch.tensor([[0.12, -0.05, 0.08, 0.03, -0.04, 0.02, 0.15]], dtype=torch.float64)
K = torch.tensor([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
HH, WW = 48, 64


def scene_points(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """Points in front of the frame camera, depths 1.5–4, inside a ~55° field of view."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 + 2.5 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    xy = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 0.9 * z
    return torch.cat([xy, z], dim=-1)


def pose_error(T: Sim3, T_ref: Sim3) -> tuple[float, float, float]:
    """(translation error, rotation angle error [rad], |log scale ratio|) of T vs T_ref."""
    E = T_ref.double().inv() * T.double()
    xi = E.log()[0]
    return float(torch.linalg.norm(T.data[0, :3].double() - T_ref.data[0, :3].double())), \
        float(torch.linalg.norm(xi[3:6])), float(abs(xi[6]))


def fd_jacobian(fun, T: Sim3, eps: float = 1e-6) -> torch.Tensor:
    cols = []
    for k in range(7):
        d = torch.zeros(1, 7, dtype=torch.float64)
        d[0, k] = eps
        cols.append((fun(T.retr(d)) - fun(T.retr(-d))) / (2 * eps))
    return torch.stack(cols, dim=-1)


def test_ray_dist_jacobian_matches_finite_differences():
    Xf = scene_points(50)
    T = Sim3.exp(XI_TRUE)
    Xk = T.act(Xf) + 0.01
    r, J = ray_dist_residual(T, Xf, Xk)
    J_fd = fd_jacobian(lambda Tp: ray_dist_residual(Tp, Xf, Xk)[0], T)
    torch.testing.assert_close(J, J_fd, rtol=1e-6, atol=1e-7)


def test_calib_jacobian_matches_finite_differences():
    Xf = scene_points(50)
    T = Sim3.exp(XI_TRUE)
    meas = torch.zeros(50, 3, dtype=torch.float64)
    Kd = K.double()
    r, J, valid = calib_residual(T, Xf, meas, Kd, (HH, WW), -10, 1e-6)
    J_fd = fd_jacobian(lambda Tp: calib_residual(Tp, Xf, meas, Kd, (HH, WW), -10, 1e-6)[0], T)
    torch.testing.assert_close(J, J_fd, rtol=1e-5, atol=1e-5)


def test_huber_weight_and_irls_step_against_lstsq():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.345, 2.69])
    torch.testing.assert_close(huber_weight(x, 1.345), torch.tensor([1.345 / 3, 1, 1, 1, 1.0, 0.5]))
    g = torch.Generator().manual_seed(0)
    J = torch.randn(40, 2, 7, generator=g, dtype=torch.float64)
    r = torch.randn(40, 2, generator=g, dtype=torch.float64) * 3
    si = torch.rand(40, 2, generator=g, dtype=torch.float64) + 0.5
    delta, cost = solve_step(J, r, si, 1.345)
    sr = (si * r).numpy()
    w = np.where(np.abs(sr) < 1.345, 1.0, 1.345 / np.abs(sr))
    s = si.numpy() * np.sqrt(w)
    A = (s[..., None] * J.numpy()).reshape(-1, 7)
    b = (s * r.numpy()).reshape(-1)
    ref = np.linalg.lstsq(A, -b, rcond=None)[0]  # minimizes |A δ + b|
    np.testing.assert_allclose(delta.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert math.isclose(cost, 0.5 * float(b @ b), rel_tol=1e-12)


def test_ray_dist_recovers_sim3_noise_free():
    Xf = scene_points().float()
    T_true = Sim3.exp(XI_TRUE.float())
    Xk = T_true.act(Xf)
    n = Xf.shape[0]
    res = opt_pose_ray_dist_sim3(Xf, Xk, Sim3.identity(1), torch.full((n, 1), 4.0), torch.ones(n, 1, dtype=torch.bool))
    dt, dr, ds = pose_error(res.T, T_true)
    assert dt < 1e-4 and dr < 1e-4 and ds < 1e-4
    assert res.converged and res.iterations < 50


def test_ray_dist_is_robust_to_outliers():
    Xf = scene_points(seed=1).float()
    T_true = Sim3.exp(XI_TRUE.float())
    g = torch.Generator().manual_seed(2)
    Xk = T_true.act(Xf)
    Xk = Xk * (1 + 0.002 * torch.randn(Xk.shape, generator=g))
    out = torch.rand(Xk.shape[0], generator=g) < 0.2
    Xk[out] = Xk[out] + torch.randn(int(out.sum()), 3, generator=g) * 0.5  # 20 % gross outliers
    n = Xf.shape[0]
    res = opt_pose_ray_dist_sim3(Xf, Xk, Sim3.identity(1), torch.full((n, 1), 4.0), torch.ones(n, 1, dtype=torch.bool))
    dt, dr, ds = pose_error(res.T, T_true)
    assert dt < 5e-3 and dr < 3e-3 and ds < 1e-2
    # without robust weighting (huge Huber threshold) the same data gives a clearly worse pose
    p = TrackingParams(huber=1e9)
    res_ls = opt_pose_ray_dist_sim3(Xf, Xk, Sim3.identity(1), torch.full((n, 1), 4.0),
                                    torch.ones(n, 1, dtype=torch.bool), p)
    assert pose_error(res_ls.T, T_true)[1] > 3 * dr


def test_calib_recovers_sim3_noise_free():
    Xf = scene_points(seed=3).float()
    T_true = Sim3.exp(XI_TRUE.float())
    P = T_true.act(Xf)
    uv = (P[:, :2] / P[:, 2:3]) * K[0, 0] + K[:2, 2]
    meas = torch.cat([uv, torch.log(P[:, 2:3])], dim=-1)
    n = Xf.shape[0]
    ones = torch.ones(n, 1, dtype=torch.bool)
    res = opt_pose_calib_sim3(Xf, P, Sim3.identity(1), torch.full((n, 1), 4.0), ones, meas, ones, K, (HH, WW))
    dt, dr, ds = pose_error(res.T, T_true)
    assert dt < 1e-4 and dr < 1e-4 and ds < 1e-4


def test_no_valid_rows_is_a_cholesky_failure():
    Xf = scene_points(100).float()
    with pytest.raises(TrackingFailure, match="Cholesky"):
        opt_pose_ray_dist_sim3(Xf, Xf, Sim3.identity(1), torch.full((100, 1), 4.0), torch.zeros(100, 1, dtype=torch.bool))


def test_convergence_rule():
    small, big = torch.full((7,), 1e-5), torch.full((7,), 1.0)
    assert _converged(0, math.inf, 5.0, small, 1e-3, 1e-3)          # step 0: only the step-size test
    assert not _converged(0, math.inf, 5.0, big, 1e-3, 1e-3)
    assert _converged(3, 1.0, 0.9995, big, 1e-3, 1e-3)              # relative decrease 5e-4 < 1e-3
    assert not _converged(3, 1.0, 0.9, big, 1e-3, 1e-3)


def test_keyframe_decision_against_numpy():
    rng = np.random.default_rng(0)
    hw = 1000
    for frac_valid, n_unique in ((0.9, 900), (0.9, 200), (0.2, 1000)):
        valid = rng.random(hw) < frac_valid
        idx = rng.integers(0, n_unique, hw)
        Q = rng.random(hw) * 4
        new_kf, mf, uf = keyframe_decision(torch.from_numpy(valid)[:, None], torch.from_numpy(Q)[:, None],
                                           torch.from_numpy(idx), 1.5, 0.333)
        mf_ref = (valid & (Q > 1.5)).sum() / hw
        uf_ref = len(np.unique(idx[valid])) / hw
        assert math.isclose(mf, mf_ref) and math.isclose(uf, uf_ref)
        assert new_kf == (min(mf_ref, uf_ref) < 0.333)
