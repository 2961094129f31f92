"""Host Gauss–Newton loop (``gn_torch._gn_solve_host``) vs the device loop (``_gn_solve_device``): same poses, steps,
costs, iteration counts and messages (float64 CPU tensors: to ~1e-10), including keyframes held fixed, failed
solves, Levenberg-damped solves, the batched retraction (> HOST_RETR_LOOP_MAX poses) and the ``tij_blocks`` path
(relative poses computed on the host). The CUDA test at the end compares both loops on GPU tensors through the
public ``kernels.gauss_newton_*`` API with the compiled extension.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mast3r_slam_ros import kernels, lie
from mast3r_slam_ros.kernels import gn_torch
from mast3r_slam_ros.lie import Sim3

H, W = 12, 16
HW = H * W
K_NP = np.array([[14.0, 0, (W - 1) / 2], [0, 14.0, (H - 1) / 2], [0, 0, 1]])
PARAMS = {
    "rays": dict(sigma_ray=0.003, sigma_dist=10.0),
    "calib": dict(height=H, width=W, pixel_border=-10, z_eps=0.1, sigma_pixel=1.0, sigma_depth=0.05),
    "points": dict(sigma_point=0.05),
}
BLOCKS = {"rays": gn_torch.gn_blocks_rays_torch, "calib": gn_torch.gn_blocks_calib_torch,
          "points": gn_torch.gn_blocks_points_torch}


def make_problem(seed: int, n: int = 5, dtype=torch.float64, pairs=None):
    """Keyframes observing a bumpy plane with identity pixel correspondences (idx = k), perturbed poses.

    Returns a dict of tensors: Twc ``[n,8]`` (perturbed start), Xs ``[n,HW,3]``, Cs, ii/jj ``[2E]``, idx, valid, Q.
    """
    g = torch.Generator().manual_seed(seed)
    xi = torch.cat([(torch.rand(n, 3, generator=g) - 0.5) * 0.6, (torch.rand(n, 3, generator=g) - 0.5) * 0.16,
                    (torch.rand(n, 1, generator=g) - 0.5) * 0.4], 1).double()
    xi[0] = 0
    T_gt = Sim3.exp(xi)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    rays = torch.stack([(u - K_NP[0, 2]) / K_NP[0, 0], (v - K_NP[1, 2]) / K_NP[1, 1], torch.ones_like(u)], -1)
    depth = 2.0 + 0.2 * torch.sin(u / 3.0) * torch.cos(v / 4.0)
    Pw = (rays * depth.unsqueeze(-1)).reshape(HW, 3)  # world = camera 0
    Xs = torch.stack([T_gt[k].inv().act(Pw) for k in range(n)]) + 1e-3 * torch.randn(n, HW, 3, generator=g).double()
    pairs = pairs if pairs is not None else [(k, k + 1) for k in range(n - 1)] + [(k, k + 2) for k in range(n - 2)]
    ii = torch.tensor([a for a, b in pairs] + [b for a, b in pairs])
    jj = torch.tensor([b for a, b in pairs] + [a for a, b in pairs])
    E2 = ii.numel()
    pert = (torch.rand(n, 7, generator=g).double() - 0.5) * 0.04
    pert[0] = 0
    Twc = Sim3.exp(pert).__mul__(T_gt).data.contiguous()
    return dict(Twc=Twc.to(dtype), Xs=Xs.to(dtype), Cs=(1.5 + torch.rand(n, HW, 1, generator=g)).to(dtype),
                ii=ii, jj=jj, idx=torch.arange(HW).repeat(E2, 1),
                valid=torch.rand(E2, HW, 1, generator=g) < 0.9, Q=(1.6 + torch.rand(E2, HW, 1, generator=g)).to(dtype))


def blocks_fn(kind: str, p):
    args = dict(Xs=p["Xs"], Cs=p["Cs"], ii=p["ii"], jj=p["jj"], idx=p["idx"], valid=p["valid"], Q=p["Q"],
                C_thresh=1.0, Q_thresh=1.5, **PARAMS[kind])
    if kind == "calib":
        args["K"] = torch.tensor(K_NP, dtype=p["Xs"].dtype)
    return lambda T: BLOCKS[kind](T, **args)


def both(Twc0: torch.Tensor, ii, jj, blocks, max_iter=6, delta=0.0, **kw):
    """Run the host loop and the device loop from the same start -> ((res, Twc) host, (res, Twc) device)."""
    Th, Td = Twc0.clone(), Twc0.clone()
    rh = gn_torch.gn_solve(Th, ii, jj, blocks, max_iter, delta, host_max_kf=10 ** 6, **kw)
    rd = gn_torch.gn_solve(Td, ii, jj, blocks, max_iter, delta, host_max_kf=-1)
    return (rh, Th), (rd, Td)


def assert_same(h, d, tol=1e-10):
    (rh, Th), (rd, Td) = h, d
    assert (rh.iterations, rh.converged, rh.ok, rh.message) == (rd.iterations, rd.converged, rd.ok, rd.message)
    assert rh.dx.dtype == torch.float32 and rh.dx.shape == rd.dx.shape and rh.dx.device == rd.dx.device
    np.testing.assert_allclose(Th.numpy(), Td.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(rh.dx.numpy(), rd.dx.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([rh.cost, rh.cost_initial], [rd.cost, rd.cost_initial], rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kind", ["rays", "calib", "points"])
def test_host_loop_matches_device_loop(kind):
    p = make_problem(seed={"rays": 1, "calib": 2, "points": 3}[kind])
    h, d = both(p["Twc"], p["ii"], p["jj"], blocks_fn(kind, p))
    assert h[0].ok and h[0].iterations == 6 and h[0].cost < h[0].cost_initial
    assert not torch.equal(h[1], p["Twc"])  # the poses moved
    assert torch.equal(h[1][0], p["Twc"][0])  # gauge row untouched
    assert_same(h, d)
    # with a convergence threshold: same stopping iteration
    h, d = both(p["Twc"], p["ii"], p["jj"], blocks_fn(kind, p), max_iter=12, delta=1e-3)
    assert h[0].converged
    assert_same(h, d)


def test_keyframe_without_valid_residual_is_held_fixed_in_both_loops():
    p = make_problem(seed=4)
    touches = (p["ii"] == 2) | (p["jj"] == 2)
    p["valid"][touches] = False  # keyframe row 2 has no valid residual
    h, d = both(p["Twc"], p["ii"], p["jj"], blocks_fn("rays", p))
    assert h[0].ok and "held fixed" in h[0].message and "[2]" in h[0].message
    assert torch.equal(h[1][2], p["Twc"][2])
    assert_same(h, d)


def test_failures_and_damping_give_the_same_results_and_messages():
    p = make_problem(seed=5)
    p["valid"][:] = False  # nothing valid at all
    h, d = both(p["Twc"], p["ii"], p["jj"], blocks_fn("points", p))
    assert not h[0].ok and "no valid residual in the whole graph" in h[0].message
    assert torch.equal(h[1], p["Twc"])
    assert_same(h, d)

    n, ii, jj = 4, torch.tensor([0, 1, 2, 1, 2, 3]), torch.tensor([1, 2, 3, 0, 1, 2])
    Twc0 = make_problem(seed=6, n=n)["Twc"]
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 7, 7, generator=g, dtype=torch.float64)
    spd = M @ M.transpose(-1, -2) + 0.1 * torch.eye(7, dtype=torch.float64)
    gr = torch.randn(6, 7, generator=g, dtype=torch.float64)
    cost = torch.rand(6, generator=g, dtype=torch.float64)

    def const(Hr, grad):
        return lambda T: (Hr.clone(), grad + 1e-3 * T[ii, :7].to(torch.float64), cost.clone())

    cases = [
        (const(-spd, gr), "Cholesky failed even with Levenberg damping"),  # negative definite
        (const(spd, gr * float("nan")), "non-finite normal equations"),
    ]
    for blocks, text in cases:
        h, d = both(Twc0, ii, jj, blocks)
        assert not h[0].ok and text in h[0].message and h[0].iterations == 1
        assert torch.equal(h[1], Twc0)
        assert_same(h, d)
    # rank deficient: one directed edge from the (identity) gauge keyframe whose last tangent direction is
    # unobservable -> plain Cholesky fails, the damped solve succeeds, reported in the notes
    Hd = spd[:1].clone()
    Hd[:, 6, :] = 0
    Hd[:, :, 6] = 0
    grd = gr[:1].clone()
    grd[:, 6] = 0
    i1, j1 = torch.tensor([0]), torch.tensor([1])
    T2 = Twc0[:2].clone()
    assert torch.equal(T2[0], Sim3.identity(dtype=torch.float64).data)
    h, d = both(T2, i1, j1, lambda T: (Hd.clone(), grd.clone(), cost[:1].clone()), max_iter=3)
    assert h[0].ok and "Levenberg damping" in h[0].message
    assert_same(h, d)


def test_batched_host_retraction_on_a_long_chain():
    """More free keyframes than HOST_RETR_LOOP_MAX: the host retraction runs batched (Sim3.retr on CPU tensors)."""
    n = gn_torch.HOST_RETR_LOOP_MAX + 6
    p = make_problem(seed=7, n=n)
    h, d = both(p["Twc"], p["ii"], p["jj"], blocks_fn("points", p), max_iter=3)
    assert h[0].ok
    assert_same(h, d)


def test_tij_blocks_path_matches_blocks_path():
    """``tij_blocks`` (T_ij computed on the host, packed [2E,36] sums) gives what ``blocks`` (T_ij from Twc) gives."""
    p = make_problem(seed=8, dtype=torch.float32)
    args = dict(Xs=p["Xs"], Cs=p["Cs"], idx=p["idx"], valid=p["valid"], Q=p["Q"], C_thresh=1.0, Q_thresh=1.5,
                **PARAMS["points"])
    ii, jj = p["ii"], p["jj"]
    E2 = ii.numel()
    tri = torch.triu_indices(7, 7)

    def from_tij(Tij: torch.Tensor) -> torch.Tensor:
        """Points blocks at given T_ij [2E,8] (one pseudo-keyframe pair per edge), packed like the CUDA kernels."""
        n = p["Xs"].shape[0]
        Hr = torch.empty(E2, 7, 7, dtype=torch.float64)
        gr = torch.empty(E2, 7, dtype=torch.float64)
        c = torch.empty(E2, dtype=torch.float64)
        for e in range(E2):
            T2 = torch.stack((Sim3.identity(dtype=torch.float32).data, Tij[e]))
            sl = slice(e, e + 1)
            h, g_, c_ = gn_torch.gn_blocks_points_torch(
                T2, Xs=p["Xs"][[int(ii[e]), int(jj[e])]], Cs=p["Cs"][[int(ii[e]), int(jj[e])]],
                ii=torch.tensor([0]), jj=torch.tensor([1]), idx=p["idx"][sl], valid=p["valid"][sl], Q=p["Q"][sl],
                sigma_point=args["sigma_point"], C_thresh=1.0, Q_thresh=1.5)
            Hr[e], gr[e], c[e] = h[0], g_[0], c_[0]
        assert n > 1
        return torch.cat((Hr[:, tri[0], tri[1]], gr, c[:, None]), 1)

    def blocks(T):
        return gn_torch.unpack_sums(from_tij(gn_torch.relative_poses(T, ii, jj).data.to(torch.float32)))

    Th, Td = p["Twc"].clone(), p["Twc"].clone()
    rh = gn_torch.gn_solve(Th, ii, jj, blocks, 4, 0.0, tij_blocks=from_tij, host_max_kf=10 ** 6)
    rd = gn_torch.gn_solve(Td, ii, jj, blocks, 4, 0.0, host_max_kf=-1)
    assert rh.ok and rd.ok and rh.iterations == rd.iterations == 4 and rh.message == rd.message
    assert not torch.equal(Th, p["Twc"])
    # float32 T_ij from float64 host math vs float32 device math: equal to float32 rounding
    np.testing.assert_allclose(Th.numpy(), Td.numpy(), atol=2e-5)
    np.testing.assert_allclose(rh.cost, rd.cost, rtol=1e-4)


def test_numpy_sim3_helpers_match_lie():
    g = torch.Generator().manual_seed(3)
    A = Sim3.exp(torch.randn(9, 7, generator=g, dtype=torch.float64) * 0.7)
    B = Sim3.exp(torch.randn(9, 7, generator=g, dtype=torch.float64) * 0.7)
    np.testing.assert_allclose(lie.host_inv(A.data.numpy()), A.inv().data.numpy(), atol=1e-13)
    np.testing.assert_allclose(lie.host_mul(A.data.numpy(), B.data.numpy()), (A * B).data.numpy(),
                               atol=1e-13)
    np.testing.assert_allclose(lie.host_adjoint(A.data.numpy()), A.adjoint().numpy(), atol=1e-13)


def test_public_api_index_checks_without_int64_temporaries():
    p = make_problem(seed=9, dtype=torch.float32)
    args = (p["Xs"], p["Cs"], p["ii"], p["jj"])
    idx = p["idx"].clone()
    idx[1, 5] = HW  # out of range at a matched pixel
    valid = p["valid"].clone()
    valid[1, 5] = True
    with pytest.raises(ValueError, match="out of range"):
        kernels.gauss_newton_points(p["Twc"].clone(), *args, idx, valid, p["Q"], 0.05, 1.0, 1.5, 3, 0.0)
    valid[1, 5] = False  # unmatched pixels may hold anything
    Twc = p["Twc"].clone()
    res = kernels.gauss_newton_points(Twc, *args, idx, valid, p["Q"], 0.05, 1.0, 1.5, 3, 0.0)
    assert res.ok
    with pytest.raises(ValueError, match="itself"):
        kernels.gauss_newton_points(p["Twc"].clone(), p["Xs"], p["Cs"], p["ii"], p["ii"], idx, valid, p["Q"], 0.05,
                                    1.0, 1.5, 3, 0.0)


# ----------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["rays", "calib", "points"])
def test_cuda_host_loop_matches_device_loop(kind, monkeypatch):
    """On GPU tensors with the CUDA extension: host loop (T_ij uploaded) == device loop (T_ij from Twc on the GPU)."""
    assert kernels.cuda_available(), "CUDA extension mast3r_slam_ros._cuda not available"
    kernels.set_backend("cuda")
    try:
        p = make_problem(seed=11, n=6, dtype=torch.float32)
        t = {k: v.cuda() for k, v in p.items()}

        def run():
            Twc = t["Twc"].clone()
            common = dict(C_thresh=1.0, Q_thresh=1.5, max_iter=5, delta_thresh=0.0)
            if kind == "rays":
                r = kernels.gauss_newton_rays(Twc, t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"], t["Q"],
                                              **PARAMS["rays"], **common)
            elif kind == "calib":
                r = kernels.gauss_newton_calib(Twc, t["Xs"], t["Cs"], torch.tensor(K_NP, dtype=torch.float32).cuda(),
                                               t["ii"], t["jj"], t["idx"], t["valid"], t["Q"], **PARAMS["calib"],
                                               **common)
            else:
                r = kernels.gauss_newton_points(Twc, t["Xs"], t["Cs"], t["ii"], t["jj"], t["idx"], t["valid"],
                                                t["Q"], **PARAMS["points"], **common)
            torch.cuda.synchronize()
            return r, Twc

        rh, Th = run()
        monkeypatch.setattr(gn_torch, "HOST_MAX_KF", -1)
        rd, Td = run()
        assert rh.ok and rd.ok and rh.iterations == rd.iterations == 5 and rh.message == rd.message
        assert rh.dx.is_cuda and Th.is_cuda
        assert not torch.equal(Th, t["Twc"]) and torch.equal(Th[0], t["Twc"][0])
        np.testing.assert_allclose(Th.cpu().numpy(), Td.cpu().numpy(), atol=2e-5)
        np.testing.assert_allclose([rh.cost, rh.cost_initial], [rd.cost, rd.cost_initial], rtol=1e-4)
        # bad matched index: ValueError after the first blocks (deferred check), poses untouched
        monkeypatch.setattr(gn_torch, "HOST_MAX_KF", 256)
        idx = t["idx"].clone()
        idx[0, 3] = -5
        valid = t["valid"].clone()
        valid[0, 3] = True
        Twc = t["Twc"].clone()
        with pytest.raises(ValueError, match="out of range"):
            kernels.gauss_newton_points(Twc, t["Xs"], t["Cs"], t["ii"], t["jj"], idx, valid, t["Q"], 0.05, 1.0, 1.5,
                                        3, 0.0)
        assert torch.equal(Twc, t["Twc"])
    finally:
        kernels.set_backend("auto")
