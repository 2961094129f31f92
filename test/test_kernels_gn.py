"""CPU tests of the PyTorch global Gauss–Newton kernels (spec §6.3–§6.8) against independent numpy/scipy references.

References: poses as 4×4 matrices, ``Exp`` = ``scipy.linalg.expm`` of the Sim(3) hat matrix (§9.1), residuals written
from the spec formulas in numpy float64, Jacobians by central finite differences, the GN step by a dense numpy solve.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
from scipy.spatial.transform import Rotation

from mast3r_slam_ros import kernels
from mast3r_slam_ros.kernels import gn_torch
from mast3r_slam_ros.lie import Sim3

HUBER = 1.345


# ------------------------------------------------------------------------------------------- numpy Sim(3) helpers
def hat(xi: np.ndarray) -> np.ndarray:
    tau, w, s = xi[:3], xi[3:6], xi[6]
    M = np.zeros((4, 4))
    M[:3, :3] = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) + s * np.eye(3)
    M[:3, 3] = tau
    return M


def expm7(xi: np.ndarray) -> np.ndarray:
    return scipy.linalg.expm(hat(xi))


def data_to_mat(d: np.ndarray) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3] = d[7] * Rotation.from_quat(d[3:7] / np.linalg.norm(d[3:7])).as_matrix()
    M[:3, 3] = d[:3]
    return M


def mat_to_data(M: np.ndarray) -> np.ndarray:
    s = np.cbrt(np.linalg.det(M[:3, :3]))
    q = Rotation.from_matrix(M[:3, :3] / s).as_quat()
    return np.concatenate([M[:3, 3], q, [s]])


def apply(M: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ M[:3, :3].T + M[:3, 3]


def pose_errors(d_est: np.ndarray, d_gt: np.ndarray) -> tuple[float, float, float]:
    """(rotation angle [rad], translation error, |log scale ratio|) between two pose data rows."""
    A, B = data_to_mat(d_est), data_to_mat(d_gt)
    sa, sb = np.cbrt(np.linalg.det(A[:3, :3])), np.cbrt(np.linalg.det(B[:3, :3]))
    Rrel = (A[:3, :3] / sa).T @ (B[:3, :3] / sb)
    ang = np.linalg.norm(Rotation.from_matrix(Rrel).as_rotvec())
    return float(ang), float(np.linalg.norm(A[:3, 3] - B[:3, 3])), float(abs(np.log(sa / sb)))


# --------------------------------------------------------------------------------------------- synthetic problems
H, W = 16, 20
HW = H * W
K_NP = np.array([[18.0, 0, (W - 1) / 2], [0, 18.0, (H - 1) / 2], [0, 0, 1]])
PAIRS = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)]


def gt_poses(n: int, rng) -> list[np.ndarray]:
    Ms = []
    for k in range(n):
        xi = np.concatenate([rng.uniform(-0.3, 0.3, 3), rng.uniform(-0.08, 0.08, 3), rng.uniform(-0.2, 0.2, 1)])
        Ms.append(expm7(xi))
    return Ms


def plane_pointmap(M: np.ndarray, Hh: int, Ww: int, K: np.ndarray) -> np.ndarray:
    """Camera-frame points [Hh*Ww,3] of each pixel of a camera with pose M (Sim3) looking at a bumpy world plane."""
    v, u = np.meshgrid(np.arange(Hh, dtype=float), np.arange(Ww, dtype=float), indexing="ij")
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    # world plane z = 3 + 0.1x, intersected with the camera rays (in world frame), then back to the camera
    sR, t = M[:3, :3], M[:3, 3]
    d_w = rays @ sR.T
    nrm = np.array([-0.1, 0.0, 1.0])
    lam = (3.0 - nrm @ t) / (d_w @ nrm)
    Pw = t + lam[:, None] * d_w
    Pw[:, 2] += 0.3 * np.sin(Pw[:, 0] * 2.0) * np.cos(Pw[:, 1] * 1.5)  # bump (off the rays slightly; fine)
    return apply(np.linalg.inv(M), Pw)


def make_identity_problem(seed: int, n: int = 4, noise: float = 1e-3):
    """All keyframes observe the same world points in the same pixel order (idx = identity): exact at the GT."""
    rng = np.random.default_rng(seed)
    Ms = gt_poses(n, rng)
    Pw = apply(Ms[0], plane_pointmap(Ms[0], H, W, K_NP))
    Xs = np.stack([apply(np.linalg.inv(M), Pw) for M in Ms])
    Xs_noisy = Xs + noise * rng.standard_normal(Xs.shape)
    ii = np.array([a for a, b in PAIRS] + [b for a, b in PAIRS])
    jj = np.array([b for a, b in PAIRS] + [a for a, b in PAIRS])
    E2 = len(ii)
    idx = np.tile(np.arange(HW), (E2, 1))
    valid = rng.uniform(size=(E2, HW, 1)) < 0.9
    Q = rng.uniform(1.6, 3.0, (E2, HW, 1))
    Q[rng.uniform(size=Q.shape) < 0.05] = 1.0
    Cs = rng.uniform(1.5, 3.0, (n, HW, 1))
    Cs[rng.uniform(size=Cs.shape) < 0.03] = 0.5
    return dict(Ms=Ms, Xs=Xs_noisy, Cs=Cs, ii=ii, jj=jj, idx=idx, valid=valid, Q=Q)


def make_calib_problem(seed: int, n: int = 4, noise: float = 1e-3):
    """Each keyframe back-projects its own pixel grid onto the scene; matches = rounded GT projections."""
    rng = np.random.default_rng(seed)
    Ms = gt_poses(n, rng)
    Xs = np.stack([plane_pointmap(M, H, W, K_NP) for M in Ms])
    ii = np.array([a for a, b in PAIRS] + [b for a, b in PAIRS])
    jj = np.array([b for a, b in PAIRS] + [a for a, b in PAIRS])
    idx = np.zeros((len(ii), HW), dtype=np.int64)
    valid = np.zeros((len(ii), HW, 1), dtype=bool)
    for e, (i, j) in enumerate(zip(ii, jj)):
        P = apply(np.linalg.inv(Ms[i]) @ Ms[j], Xs[j])
        uvz = P @ K_NP.T
        u, v = np.rint(uvz[:, 0] / uvz[:, 2]), np.rint(uvz[:, 1] / uvz[:, 2])
        ok = (P[:, 2] > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        idx[e] = np.where(ok, v * W + u, 0).astype(np.int64)
        valid[e, :, 0] = ok & (rng.uniform(size=HW) < 0.95)
    Xs = Xs * (1 + noise * rng.standard_normal(Xs.shape[:2] + (1,)))  # depth noise, points stay on their rays
    Q = rng.uniform(1.6, 3.0, (len(ii), HW, 1))
    Cs = rng.uniform(1.5, 3.0, (n, HW, 1))
    return dict(Ms=Ms, Xs=Xs, Cs=Cs, ii=ii, jj=jj, idx=idx, valid=valid, Q=Q)


PARAMS = {
    "rays": dict(sigma_ray=0.003, sigma_dist=10.0),
    # upstream's sigma_depth = 10 leaves the per-keyframe scale nearly unobservable on this tiny, rounded-match
    # problem; a stronger depth term makes pose recovery a sharp test of the math
    "calib": dict(height=H, width=W, pixel_border=-10, z_eps=0.1, sigma_pixel=1.0, sigma_depth=0.05),
    "points": dict(sigma_point=0.05),
}


def torch_inputs(prob, Twc_data: np.ndarray, dtype=torch.float32):
    return dict(Twc=torch.tensor(Twc_data, dtype=dtype).contiguous(), Xs=torch.tensor(prob["Xs"], dtype=dtype),
                Cs=torch.tensor(prob["Cs"], dtype=dtype), ii=torch.tensor(prob["ii"]), jj=torch.tensor(prob["jj"]),
                idx=torch.tensor(prob["idx"]), valid=torch.tensor(prob["valid"]),
                Q=torch.tensor(prob["Q"], dtype=dtype))


def run_public(kind: str, prob, Twc_data, max_iter=10, delta_thresh=1e-8):
    t = torch_inputs(prob, Twc_data)
    common = dict(C_thresh=1.0, Q_thresh=1.5, max_iter=max_iter, delta_thresh=delta_thresh)
    if kind == "rays":
        res = kernels.gauss_newton_rays(t["Twc"], t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"], t["Q"],
                                        **PARAMS["rays"], **common)
    elif kind == "calib":
        res = kernels.gauss_newton_calib(t["Twc"], t["Xs"], t["Cs"], torch.tensor(K_NP, dtype=torch.float32), t["ii"],
                                         t["jj"], t["idx"], t["valid"], t["Q"], **PARAMS["calib"], **common)
    else:
        res = kernels.gauss_newton_points(t["Twc"], t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"], t["Q"],
                                          **PARAMS["points"], **common)
    return res, t["Twc"].numpy().astype(np.float64)


def perturbed_start(Ms, rng, mag=0.03):
    data = []
    for k, M in enumerate(Ms):
        if k > 0:
            M = expm7(rng.uniform(-mag, mag, 7)) @ M
        data.append(mat_to_data(M))
    return np.stack(data)


# ---------------------------------------------------------------------- independent numpy residuals (spec formulas)
def np_residuals(kind: str, prob, Mats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Residuals [2E,HW,R] and whitening √w₀ [2E,HW,R] (0 where invalid) from 4×4 pose matrices."""
    errs, sws = [], []
    for e, (i, j) in enumerate(zip(prob["ii"], prob["jj"])):
        m = np.where(prob["valid"][e, :, 0], prob["idx"][e], 0)
        Xi, Xj = prob["Xs"][i][m], prob["Xs"][j]
        P = apply(np.linalg.inv(Mats[i]) @ Mats[j], Xj)
        q = prob["Q"][e, :, 0]
        v = prob["valid"][e, :, 0] & (q > 1.5) & (prob["Cs"][i][m, 0] > 1.0) & (prob["Cs"][j][:, 0] > 1.0)
        sq = np.sqrt(q)
        if kind == "rays":
            nP, nX = np.linalg.norm(P, axis=1), np.linalg.norm(Xi, axis=1)
            err = np.concatenate([P / nP[:, None] - Xi / nX[:, None], (nP - nX)[:, None]], 1)
            sw = np.stack([sq / PARAMS["rays"]["sigma_ray"]] * 3 + [sq / PARAMS["rays"]["sigma_dist"]], 1)
        elif kind == "points":
            err = P - Xi
            sw = np.stack([sq / PARAMS["points"]["sigma_point"]] * 3, 1)
        else:
            z = P[:, 2]
            u = K_NP[0, 0] * P[:, 0] / z + K_NP[0, 2]
            vv = K_NP[1, 1] * P[:, 1] / z + K_NP[1, 2]
            err = np.stack([u - m % W, vv - m // W, np.log(np.abs(z)) - np.log(np.abs(Xi[:, 2]))], 1)
            v = v & (z > 0.1) & (Xi[:, 2] > 0.1) & (u > -10) & (u < W - 1 + 10) & (vv > -10) & (vv < H - 1 + 10)
            sw = np.stack([sq / PARAMS["calib"]["sigma_pixel"]] * 2 + [sq / PARAMS["calib"]["sigma_depth"]], 1)
        sw = sw * v[:, None]
        errs.append(np.where(v[:, None], err, 0.0))
        sws.append(sw)
    return np.stack(errs), np.stack(sws)


def np_cost(kind, prob, Mats) -> float:
    err, sw = np_residuals(kind, prob, Mats)
    x = np.abs(sw * err)
    return float(np.where(x <= HUBER, x * x, 2 * HUBER * x - HUBER ** 2).sum())


# -------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["rays", "calib", "points"])
def test_gn_recovers_poses_and_decreases_cost(kind):
    prob = (make_calib_problem if kind == "calib" else make_identity_problem)(seed=7)
    rng = np.random.default_rng(1)
    start = perturbed_start(prob["Ms"], rng)
    res, final = run_public(kind, prob, start)
    assert res.ok, res.message
    assert res.iterations >= 1 and res.dx.shape == (3, 7) and res.dx.dtype == torch.float32
    c0 = np_cost(kind, prob, [data_to_mat(d) for d in start])
    c1 = np_cost(kind, prob, [data_to_mat(d) for d in final])
    cgt = np_cost(kind, prob, prob["Ms"])
    assert res.cost_initial == pytest.approx(c0, rel=1e-3)
    assert c1 < c0 - 0.5 * (c0 - cgt)  # most of the excess cost over the ground truth is removed ...
    assert c1 <= 1.001 * cgt  # ... and the optimum is at least as good as the ground truth (noisy data)
    np.testing.assert_array_equal(final[0], start[0].astype(np.float32))  # gauge keyframe untouched
    if kind == "calib":
        # matches are rounded GT projections (±0.5 px): the optimum is near, not at, the GT. Compare with the optimum
        # of the same robust cost found independently by scipy (trust-region, numeric Jacobian) ...
        start_M = [data_to_mat(d) for d in start]

        def f(xi):
            Ms = [start_M[0]] + [expm7(xi[7 * (k - 1):7 * k]) @ start_M[k] for k in range(1, 4)]
            err, sw = np_residuals(kind, prob, Ms)
            return (sw * err).ravel()

        sol = scipy.optimize.least_squares(f, np.zeros(21), loss="huber", f_scale=HUBER, xtol=1e-12, ftol=1e-12)
        opt = [mat_to_data(expm7(sol.x[7 * (k - 1):7 * k]) @ start_M[k]) for k in range(1, 4)]
        for k in range(1, 4):
            ang, dt, ds = pose_errors(final[k], opt[k - 1])
            assert ang < 3e-4 and dt < 1e-3 and ds < 3e-4, (kind, k, ang, dt, ds)
    tol = (1e-2, 3e-2, 1e-2) if kind == "calib" else (3e-3, 1e-2, 3e-3)  # ... and with the GT up to the noise
    for k in range(1, 4):
        ang, dt, ds = pose_errors(final[k], mat_to_data(prob["Ms"][k]))
        ang0, dt0, _ = pose_errors(start[k], mat_to_data(prob["Ms"][k]))
        assert ang < tol[0] and dt < tol[1] and ds < tol[2], (kind, k, ang, dt, ds, ang0, dt0)


def _fd_jacobians(kind, prob, Mats, e, h=1e-6):
    """Central-difference Jacobians of edge e's residuals wrt left perturbations of T_i and T_j -> [HW,R,7] each."""
    i, j = prob["ii"][e], prob["jj"][e]
    sub = dict(prob, ii=prob["ii"][e:e + 1], jj=prob["jj"][e:e + 1], idx=prob["idx"][e:e + 1],
               valid=prob["valid"][e:e + 1], Q=prob["Q"][e:e + 1])
    out = []
    for who in (i, j):
        cols = []
        for a in range(7):
            d = np.zeros(7)
            d[a] = h
            Mp = list(Mats)
            Mm = list(Mats)
            Mp[who] = expm7(d) @ Mats[who]
            Mm[who] = expm7(-d) @ Mats[who]
            cols.append((np_residuals(kind, sub, Mp)[0][0] - np_residuals(kind, sub, Mm)[0][0]) / (2 * h))
        out.append(np.stack(cols, -1))
    return out


@pytest.mark.parametrize("kind", ["rays", "calib", "points"])
def test_gn_residuals_and_jacobians_match_finite_differences(kind):
    prob = (make_calib_problem if kind == "calib" else make_identity_problem)(seed=3)
    rng = np.random.default_rng(2)
    start = perturbed_start(prob["Ms"], rng, mag=0.02)
    Mats = [data_to_mat(d) for d in start]
    t = torch_inputs(prob, start, dtype=torch.float64)
    p = dict(PARAMS[kind])
    if kind == "calib":
        p["K"] = torch.tensor(K_NP)
    err, w, Jr, cost = gn_torch.edge_terms(kind, t["Twc"], t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"],
                                           t["Q"], 1.0, 1.5, **p)
    err_ref, sw_ref = np_residuals(kind, prob, Mats)
    valid = sw_ref > 0
    assert valid.any(-1).sum() > 0.5 * valid.shape[0] * valid.shape[1]
    np.testing.assert_array_equal(w.numpy() > 0, valid)
    np.testing.assert_allclose(err.numpy()[valid], err_ref[valid], rtol=1e-9, atol=1e-9)
    x = np.abs(sw_ref * err_ref)
    w_ref = np.where(x < HUBER, 1.0, HUBER / np.maximum(x, 1e-300)) * sw_ref ** 2
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-9)
    for e in (0, 3, 7):
        Ti = Sim3(t["Twc"][t["ii"][e]])
        Jj = (Jr[e] @ Ti.inv().adjoint()).numpy()
        Ji_fd, Jj_fd = _fd_jacobians(kind, prob, Mats, e)
        ve = valid[e].all(-1)
        scale = np.abs(Jj_fd[ve]).max()
        np.testing.assert_allclose(Jj[ve], Jj_fd[ve], atol=1e-6 * scale, rtol=1e-5)
        np.testing.assert_allclose(-Jj[ve], Ji_fd[ve], atol=1e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rays", "calib", "points"])
def test_gn_first_step_equals_dense_numpy_solve(kind):
    """One GN step (float64 internals) equals −(JᵀWJ)⁻¹JᵀWr with J from finite differences over all free poses."""
    prob = (make_calib_problem if kind == "calib" else make_identity_problem)(seed=5)
    rng = np.random.default_rng(4)
    start = perturbed_start(prob["Ms"], rng, mag=0.02)
    Mats = [data_to_mat(d) for d in start]
    n = len(Mats)
    err, sw = np_residuals(kind, prob, Mats)
    x = np.abs(sw * err)
    wts = (np.where(x < HUBER, 1.0, HUBER / np.maximum(x, 1e-300)) * sw ** 2).ravel()
    h = 1e-6
    J = np.zeros((err.size, 7 * (n - 1)))
    for k in range(1, n):
        for a in range(7):
            d = np.zeros(7)
            d[a] = h
            Mp, Mm = list(Mats), list(Mats)
            Mp[k] = expm7(d) @ Mats[k]
            Mm[k] = expm7(-d) @ Mats[k]
            diff = np_residuals(kind, prob, Mp)[0] - np_residuals(kind, prob, Mm)[0]
            J[:, 7 * (k - 1) + a] = (diff / (2 * h)).ravel()
    A = J.T @ (wts[:, None] * J)
    b = J.T @ (wts * err.ravel())
    dx_ref = -np.linalg.solve(A, b)

    t = torch_inputs(prob, start, dtype=torch.float64)
    p = dict(PARAMS[kind])
    if kind == "calib":
        p["K"] = torch.tensor(K_NP)
    fn = {"rays": gn_torch.gn_blocks_rays_torch, "calib": gn_torch.gn_blocks_calib_torch,
          "points": gn_torch.gn_blocks_points_torch}[kind]
    args = dict(Xs=t["Xs"], Cs=t["Cs"], ii=t["ii"], jj=t["jj"], idx=t["idx"], valid=t["valid"], Q=t["Q"], C_thresh=1.0,
                Q_thresh=1.5, **p)
    Twc = t["Twc"].clone()
    res = gn_torch.gn_solve(Twc, t["ii"], t["jj"], lambda T: fn(T, **args), 1, 0.0)
    assert res.ok and res.iterations == 1 and "damping" not in res.message
    dx = res.dx.double().numpy().ravel()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5 * np.abs(dx_ref).max())
    # and the poses moved by the left retraction Exp(dx)·T
    for k in range(1, n):
        M_new = expm7(dx_ref[7 * (k - 1):7 * k]) @ Mats[k]
        np.testing.assert_allclose(data_to_mat(Twc[k].numpy()), M_new, atol=1e-5)


def test_gn_reports_failure_instead_of_silent_zero_step():
    prob = make_identity_problem(seed=9)
    start = perturbed_start(prob["Ms"], np.random.default_rng(0))
    prob_nan = dict(prob, Xs=prob["Xs"].copy())
    prob_nan["Xs"][2, 5] = np.nan  # a NaN point is dropped (guard), the solve still works
    res, _ = run_public("points", prob_nan, start, max_iter=2)
    assert res.ok
    # no valid residual at all: the system is singular -> ok=False with a message, poses untouched
    prob_none = dict(prob, valid=np.zeros_like(prob["valid"]))
    res, final = run_public("rays", prob_none, start, max_iter=3)
    assert not res.ok and res.message and res.iterations == 1
    np.testing.assert_array_equal(final, start.astype(np.float32))
    # an isolated keyframe (no edge touches it): held fixed (reported), the others are still solved
    prob_iso = dict(prob)
    keep = (prob["ii"] != 3) & (prob["jj"] != 3)
    for key in ("ii", "jj", "idx", "valid", "Q"):
        prob_iso[key] = prob[key][keep]
    res, final = run_public("rays", prob_iso, start, max_iter=10)
    assert res.ok and "held fixed" in res.message and "[3]" in res.message
    np.testing.assert_array_equal(final[3], start[3].astype(np.float32))
    ang, dt, ds = pose_errors(final[1], mat_to_data(prob["Ms"][1]))
    assert ang < 3e-3 and dt < 1e-2 and ds < 3e-3


def test_gn_trivial_cases_and_bad_input():
    prob = make_identity_problem(seed=1)
    start = perturbed_start(prob["Ms"], np.random.default_rng(0))
    t = torch_inputs(prob, start)
    one = kernels.gauss_newton_points(t["Twc"][:1].contiguous(), t["Xs"][:1], t["Cs"][:1], t["ii"][:0], t["jj"][:0],
                                      t["idx"][:0], t["valid"][:0], t["Q"][:0], 0.05, 1.0, 1.5, 10, 1e-8)
    assert one.ok and one.iterations == 0 and one.dx.shape == (0, 7)
    with pytest.raises(ValueError):  # ii out of range
        kernels.gauss_newton_rays(t["Twc"], t["Xs"], t["Cs"], t["ii"] + 4, t["jj"], t["idx"], t["valid"], t["Q"],
                                  0.003, 10.0, 1.0, 1.5, 10, 1e-8)
    with pytest.raises(TypeError):  # float64 poses
        kernels.gauss_newton_rays(t["Twc"].double(), t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"], t["Q"],
                                  0.003, 10.0, 1.0, 1.5, 10, 1e-8)
    with pytest.raises(ValueError):  # wrong idx shape
        kernels.gauss_newton_points(t["Twc"], t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"][:, :5], t["valid"], t["Q"],
                                    0.05, 1.0, 1.5, 10, 1e-8)
    with pytest.raises(ValueError):  # height*width != HW
        kernels.gauss_newton_calib(t["Twc"], t["Xs"], t["Cs"], torch.tensor(K_NP, dtype=torch.float32), t["ii"],
                                   t["jj"], t["idx"], t["valid"], t["Q"], H + 1, W, -10, 0.1, 1.0, 10.0, 1.0, 1.5, 10,
                                   1e-8)


def test_solve_damped_retry_on_rank_deficient_system():
    """A PSD system with an unobservable direction: plain Cholesky fails, the Levenberg retry solves the rest."""
    A = torch.diag(torch.tensor([4.0, 2.0, 1.0, 3.0, 0.0, 5.0, 1.0], dtype=torch.float64))
    b = torch.tensor([4.0, -2.0, 1.0, 3.0, 0.0, 5.0, 2.0], dtype=torch.float64)
    dx, note = gn_torch._solve(A, b)
    assert dx is not None and "damping" in note
    live = torch.tensor([0, 1, 2, 3, 5, 6])
    np.testing.assert_allclose(dx[live].numpy(), (-b[live] / A.diagonal()[live]).numpy(), rtol=1e-5)
    assert dx[4].item() == 0.0
    dx, note = gn_torch._solve(torch.full((7, 7), float("nan"), dtype=torch.float64), b)
    assert dx is None and "non-finite" in note
