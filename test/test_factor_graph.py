"""Tests of the factor graph (mast3r_slam_ros.slam.factor_graph), spec/upstream_algorithm.md §6.

Independent references: synthetic keyframe graphs built from known world points and known Sim(3) poses (the GT poses
are the exact minimizer of the ray cost when every match is exact), perturbed initial poses, and the §6.2 acceptance
rules evaluated by hand on matches with a known number of valid pixels. The GPU path is the same function with CUDA
tensors (``cuda`` marker; run on a GPU machine).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pytest
import torch

from mast3r_slam_ros import kernels
from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.factor_graph import FactorGraph
from mast3r_slam_ros.slam.frame import Frame
from mast3r_slam_ros.slam.keyframes import KeyframeStore

H, W = 12, 16
HW = H * W
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@dataclass
class FakeMatch:
    """Duck-typed ``SymmetricMatch`` (only the fields the factor graph reads)."""

    idx_i2j: torch.Tensor
    idx_j2i: torch.Tensor
    valid_match_j: torch.Tensor
    valid_match_i: torch.Tensor
    Qj: torch.Tensor
    Qi: torch.Tensor


def _random_pose(g, rot=0.3, trans=0.5, log_s=0.2, dtype=torch.float64):
    xi = torch.cat([trans * torch.randn(3, generator=g, dtype=dtype), rot * torch.randn(3, generator=g, dtype=dtype),
                    log_s * torch.randn(1, generator=g, dtype=dtype)])
    return Sim3.exp(xi)


def _frame(i, T: Sim3, X: torch.Tensor, device, h=H, w=W) -> Frame:
    f = Frame(frame_id=i, stamp_ns=i, img=torch.zeros(1, 3, h, w, device=device),
              true_shape=torch.tensor([[h, w]], dtype=torch.int32), uimg=torch.zeros(h, w, 3, dtype=torch.uint8),
              T_WC=Sim3(T.data.reshape(1, 8).float().to(device)))
    f.X_canon = X.float().to(device)
    f.C = torch.full((h * w, 1), 2.0, device=device)
    f.N = 1
    return f


def _graph_scene(n=4, seed=0, device="cpu"):
    """n keyframes observing the same HW world points, each with its own pixel permutation."""
    g = torch.Generator().manual_seed(seed)
    Pw = torch.randn(HW, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64) \
        + torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    poses = [Sim3.identity(dtype=torch.float64)] + [_random_pose(g, 0.05, 0.2, 0.1) for _ in range(n - 1)]
    perms = [torch.randperm(HW, generator=g) for _ in range(n)]
    inv = [torch.argsort(p) for p in perms]
    store = KeyframeStore()
    for k in range(n):
        Xc = poses[k].inv().act(Pw)[perms[k]]  # pixel p of kf k sees world point perms[k][p]
        store.append(_frame(k, poses[k], Xc, device))

    def match(i, j, frac_valid=1.0):
        # for every pixel of j: the pixel of i seeing the same world point
        idx_i2j = inv[i][perms[j]]
        idx_j2i = inv[j][perms[i]]
        nval = int(round(frac_valid * HW))
        vj = torch.zeros(HW, 1, dtype=torch.bool)
        vj[:nval] = True
        return idx_i2j, idx_j2i, vj, vj.clone()

    return store, poses, match


def _fake(matches, device):
    cat = lambda k: torch.stack([m[k] for m in matches]).to(device)  # noqa: E731
    Q = torch.full((len(matches), matches[0][0].numel(), 1), 3.0, device=device)
    return FakeMatch(cat(0), cat(1), cat(2), cat(3), Q, Q.clone())


def _pose_errors(store, poses):
    out = []
    for k, Tgt in enumerate(poses):
        T = Sim3(store[k].T_WC.data.reshape(8).double().cpu())
        d = (Tgt.inv() * T).log()
        out.append((float(d[:3].norm()), float(d[3:6].norm()), abs(float(d[6]))))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_global_gn_rays_recovers_perturbed_poses(device):
    kernels.set_backend("auto")
    n = 5
    store, poses, match = _graph_scene(n, seed=1, device=device)
    fg = FactorGraph(store, predictor=None, cfg=None)
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 4)]
    fg.add_matches([e[0] for e in edges], [e[1] for e in edges], _fake([match(i, j) for i, j in edges], device), 0.1)
    assert len(fg) == 6
    g = torch.Generator().manual_seed(7)
    perturbed = [poses[0]] + [_random_pose(g, 0.03, 0.05, 0.03) * poses[k] for k in range(1, n)]
    store.set_poses(list(range(n)), Sim3(torch.stack([p.data for p in perturbed]).float().to(device)))
    before = _pose_errors(store, poses)
    assert max(e[0] for e in before) > 1e-2
    res, first = None, None
    for _ in range(3):  # 3 solves × 10 iterations (upstream runs one solve per new keyframe)
        res = fg.solve()
        assert res is not None and res.ok, res.message if res else "no result"
        first = first or res
    after = _pose_errors(store, poses)
    assert after[0] == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)  # first keyframe fixed (gauge)
    for t, r, s in after:
        assert t < 1e-3 and r < 1e-3 and s < 1e-3, after
    # the cost falls from the perturbed start; once converged (last solves) it only moves at round-off level
    assert res.cost < 1e-2 * first.cost_initial


def _plane_scene(seed=0, device="cpu", h=48, w=64, f=60.0, z=3.0):
    """Calibrated scene with exact integer-pixel matches: a fronto-parallel plane at depth ``z``; camera k has R = I,
    a translation of an integer number of pixels at that depth ``(dx·z/f, dy·z/f, 0)`` and its own Sim(3) scale
    ``s_k`` (its pointmap has depth ``z/s_k``). Pixel (u, v) of camera j then sees the point imaged exactly at pixel
    (u + dx_j − dx_i, v + dy_j − dy_i) of camera i, so the GT poses have zero pixel and log-depth residuals."""
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    shifts = [(0, 0), (3, -2), (-4, 2)]
    scales = [1.0] + [float(torch.exp(0.1 * torch.randn(1, generator=g, dtype=torch.float64))) for _ in shifts[1:]]
    poses = [Sim3(torch.tensor([dx * z / f, dy * z / f, 0.0, 0, 0, 0, 1, s], dtype=torch.float64))
             for (dx, dy), s in zip(shifts, scales)]
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    rays = torch.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, torch.ones_like(u)], -1).reshape(-1, 3)
    store = KeyframeStore()
    for k, s in enumerate(scales):
        store.append(_frame(k, poses[k], rays * (z / s), device, h, w))
    uu, vv = u.reshape(-1).long(), v.reshape(-1).long()

    def one(a, b):  # for each pixel of b: the pixel of a seeing the same world point
        ua = uu + shifts[b][0] - shifts[a][0]
        va = vv + shifts[b][1] - shifts[a][1]
        ok = (ua >= 0) & (ua < w) & (va >= 0) & (va < h)
        return (va.clamp(0, h - 1) * w + ua.clamp(0, w - 1)), ok[:, None]

    def match(i, j):
        a, va = one(i, j)
        b, vb = one(j, i)
        return a, b, va, vb

    return store, poses, match, K.float()


@pytest.mark.parametrize("device", DEVICES)
def test_global_gn_calib_recovers_perturbed_poses(device):
    kernels.set_backend("auto")
    store, poses, match, K = _plane_scene(seed=2, device=device)
    cfg = type("Cfg", (), {"use_calib": True})()
    fg = FactorGraph(store, predictor=None, cfg=cfg, K=K)
    edges = [(0, 1), (1, 2), (0, 2)]
    m = _fake([match(i, j) for i, j in edges], device)
    assert fg.add_matches([0, 1, 0], [1, 2, 2], m, 0.1)
    g = torch.Generator().manual_seed(3)
    perturbed = [poses[0]] + [_random_pose(g, 0.01, 0.03, 0.02) * poses[k] for k in (1, 2)]
    store.set_poses([0, 1, 2], Sim3(torch.stack([p.data for p in perturbed]).float().to(device)))
    before = _pose_errors(store, poses)
    assert max(e[0] for e in before) > 1e-2
    for _ in range(3):
        res = fg.solve()
        assert res.ok, res.message
    after = _pose_errors(store, poses)
    for k in (1, 2):
        assert after[k][0] < 1e-3 and after[k][1] < 1e-3 and after[k][2] < 1e-3, (before, after)


def test_edge_acceptance_rules():
    store, poses, match = _graph_scene(5, seed=3)
    fg = FactorGraph(store, predictor=None, cfg=None)
    # (3,4) consecutive with 2 % valid: kept; (0,4) with 5 %: dropped; (1,4) with 50 %: kept
    m = _fake([match(3, 4, 0.02), match(0, 4, 0.05), match(1, 4, 0.5)], "cpu")
    assert fg.add_matches([3, 0, 1], [4, 4, 4], m, min_match_frac=0.1)
    assert fg.edges() == [(3, 4), (1, 4)]
    rep = fg.last_report
    assert rep.accepted == [True, False, True]
    assert rep.match_frac[0] == pytest.approx(round(0.02 * HW) / HW)
    # Q below Q_conf counts as unmatched: 50 % valid but Q = 1.0 < 1.5 in one direction -> dropped
    m2 = _fake([match(2, 4, 0.5)], "cpu")
    m2.Qi[:] = 1.0
    assert not fg.add_matches([2], [4], m2, 0.1)
    assert len(fg) == 2


def test_reloc_mode_is_strict():
    store, poses, match = _graph_scene(4, seed=4)
    fg = FactorGraph(store, predictor=None, cfg=None)
    m = _fake([match(3, 0, 0.9), match(3, 1, 0.2)], "cpu")
    assert not fg.add_matches([3, 3], [0, 1], m, min_match_frac=0.3, is_reloc=True)
    assert len(fg) == 0 and fg.last_report.accepted == [False, False]
    m = _fake([match(3, 0, 0.9), match(3, 1, 0.4)], "cpu")
    assert fg.add_matches([3, 3], [0, 1], m, min_match_frac=0.3, is_reloc=True)
    assert fg.edges() == [(3, 0), (3, 1)]


def test_reindexing_with_sparse_keyframe_ids():
    """Graph over keyframes {1, 3, 4} only: kf 1 is the gauge, kf 0 and 2 are untouched."""
    store, poses, match = _graph_scene(5, seed=5)
    fg = FactorGraph(store, predictor=None, cfg=None)
    fg.add_matches([1, 3, 1], [3, 4, 4], _fake([match(1, 3), match(3, 4), match(1, 4)], "cpu"), 0.1)
    g = torch.Generator().manual_seed(9)
    pert = {k: _random_pose(g, 0.02, 0.05, 0.02) * poses[k] for k in range(5)}
    store.set_poses(list(range(5)), Sim3(torch.stack([pert[k].data for k in range(5)]).float()))
    untouched = {k: store[k].T_WC.data.clone() for k in (0, 1, 2)}
    for _ in range(3):
        assert fg.solve().ok
    for k in (0, 1, 2):
        assert torch.equal(store[k].T_WC.data, untouched[k])
    # relative poses of 3 and 4 w.r.t. the gauge kf 1 are recovered
    T1 = Sim3(store[1].T_WC.data.reshape(8).double())
    for k in (3, 4):
        Tk = Sim3(store[k].T_WC.data.reshape(8).double())
        rel_est = T1.inv() * Tk
        rel_gt = poses[1].inv() * poses[k]
        # GT relative pose up to the gauge's own perturbation: compare in the gauge-kf frame
        err = (rel_gt.inv() * rel_est).log()
        assert float(err.norm()) < 2e-3


def test_solve_without_edges_and_failure_logging(caplog):
    store, poses, match = _graph_scene(2, seed=6)
    fg = FactorGraph(store, predictor=None, cfg=None)
    assert fg.solve() is None
    # all matches invalid except the consecutive edge kept with 0 %: nothing constrains kf 1 -> singular system
    fg.add_matches([0], [1], _fake([match(0, 1, 0.0)], "cpu"), 0.1)
    assert len(fg) == 1
    with caplog.at_level(logging.ERROR, logger="mast3r_slam_ros.slam.factor_graph"):
        res = fg.solve()
    assert res is not None
    assert torch.isfinite(store[1].T_WC.data).all()
    if not res.ok:
        assert any("failed" in r.message for r in caplog.records)


def test_bad_arguments():
    store, poses, match = _graph_scene(3, seed=7)
    fg = FactorGraph(store, predictor=None, cfg=None)
    with pytest.raises(ValueError):
        fg.add_matches([0], [0], _fake([match(0, 1)], "cpu"), 0.1)
    with pytest.raises(ValueError):
        fg.add_matches([0, 1], [1], _fake([match(0, 1)], "cpu"), 0.1)
    with pytest.raises(ValueError):
        FactorGraph(store, None, type("Cfg", (), {"use_calib": True})(), K=None)


# ------------------------------------------------------------------------------------------- compact storage (issue 8)
def _noisy_scene(n=5, seed=11, device="cpu", calib=False):
    """The ray scene with pointmap noise, random per-pixel Q in [1, 40] (some just above Q_conf = 1.5, where float16
    rounds to <= 1.5) and partial validity, so the weights and the valid set matter; returns store, graph inputs."""
    store, poses, match = _graph_scene(n, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(n):
        store[k].X_canon = store[k].X_canon + 0.01 * torch.randn(HW, 3, generator=g).to(device)
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 4), (0, 4)]
    ms = [match(i, j, 0.8) for i, j in edges]
    m = _fake(ms, device)
    B = len(edges)
    m.Qj = (1.0 + 39.0 * torch.rand(B, HW, 1, generator=g)).to(device)
    m.Qi = (1.0 + 39.0 * torch.rand(B, HW, 1, generator=g)).to(device)
    m.Qj[:, :10] = 1.5004  # float16(1.5004) == 1.5: must still count (the Q test is done in float32 when stored)
    pert = [poses[0]] + [_random_pose(g, 0.02, 0.05, 0.02) * poses[k] for k in range(1, n)]
    store.set_poses(list(range(n)), Sim3(torch.stack([p.data for p in pert]).float().to(device)))
    return store, edges, m


def _reference_rays_solve(store, edges, m):
    """The pre-compaction solve: int64 indices, bool masks, float32 Q and the kernel's own Q test."""
    p = FactorGraph(store, None).params
    n = len(store)
    T = store.stack_poses(list(range(n))).data.reshape(-1, 8).float().contiguous()
    Xs, Cs = store.stack_points(list(range(n)))
    ii = torch.tensor([e[0] for e in edges] + [e[1] for e in edges], device=T.device)
    jj = torch.tensor([e[1] for e in edges] + [e[0] for e in edges], device=T.device)
    idx = torch.cat([m.idx_i2j, m.idx_j2i]).contiguous()
    valid = torch.cat([m.valid_match_j, m.valid_match_i]).contiguous()
    Q = torch.cat([m.Qj, m.Qi]).float().contiguous()
    res = kernels.gauss_newton_rays(T, Xs.contiguous(), Cs.contiguous(), ii, jj, idx, valid, Q, p.sigma_ray,
                                    p.sigma_dist, p.C_conf, p.Q_conf, p.max_iters, p.delta_norm)
    assert res.ok, res.message
    return T


def _solved_poses(store, edges, m, **kw):
    fg = FactorGraph(store, None, **kw)
    assert fg.add_matches([e[0] for e in edges], [e[1] for e in edges], m, 0.1)
    res = fg.solve()
    assert res is not None and res.ok, res.message
    return store.stack_poses(list(range(len(store)))).data.reshape(-1, 8), fg


@pytest.mark.parametrize("device", DEVICES)
def test_compact_storage_matches_float32_solve(device):
    """int32 indices with the valid/Q test folded in and float16 Q give the pre-compaction solve to float16 weight
    precision (float32 Q: to float32 round-off); the packed int32 (index + 14..16-bit log Q) layout, the default, too:
    poses within 1e-4 of the float32-Q storage, relative to the pose magnitude."""
    kernels.set_backend("auto")
    store, edges, m = _noisy_scene(device=device)
    T0 = store.stack_poses(list(range(len(store)))).data.clone()
    ref = _reference_rays_solve(store, edges, m)
    out = {}
    for q_dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-4), (None, 1e-4)):
        store.set_poses(list(range(len(store))), Sim3(T0.clone()))
        T, fg = _solved_poses(store, edges, m, q_dtype=q_dtype)
        assert fg.last_solve_chunks == 1
        assert (fg.layout is not None) == (q_dtype is None)
        moved = (ref - T0.reshape(-1, 8)).abs().max()
        assert moved > 1e-2  # the solve did something
        torch.testing.assert_close(T, ref, rtol=0, atol=tol)
        out[q_dtype] = T
    rel = (out[None] - out[torch.float32]).abs().max() / out[torch.float32].abs().max()
    assert rel < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_solve_equals_one_shot_solve(device):
    """The chunked solve (one edge per chunk) computes the same per-edge blocks as the one-shot kernel call."""
    kernels.set_backend("auto")
    store, edges, m = _noisy_scene(device=device, seed=21)
    T0 = store.stack_poses(list(range(len(store)))).data.clone()
    T_one, fg1 = _solved_poses(store, edges, m)
    store.set_poses(list(range(len(store))), Sim3(T0.clone()))
    T_chunk, fg2 = _solved_poses(store, edges, m, solve_chunk_bytes=0)
    assert fg1.last_solve_chunks == 1 and fg2.last_solve_chunks == len(edges)
    assert fg1.last_result.iterations == fg2.last_result.iterations
    torch.testing.assert_close(T_chunk, T_one, rtol=0, atol=1e-6)
    # the one-shot CUDA path forms the relative poses T_ij on the host in float64, the chunked path on the device in
    # float32: the same blocks up to float32 rounding of T_ij (measured on an H100: 4e-9 relative on the cost)
    assert fg2.last_result.cost == pytest.approx(fg1.last_result.cost, rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_calib_solve_equals_one_shot_solve(device):
    kernels.set_backend("auto")
    cfg = type("Cfg", (), {"use_calib": True})()
    out = []
    for chunk_bytes in (2**30, 0):
        store, poses, match, K = _plane_scene(seed=2, device=device)
        g = torch.Generator().manual_seed(3)
        pert = [poses[0]] + [_random_pose(g, 0.01, 0.03, 0.02) * poses[k] for k in (1, 2)]
        store.set_poses([0, 1, 2], Sim3(torch.stack([p.data for p in pert]).float().to(device)))
        fg = FactorGraph(store, None, cfg, K=K, solve_chunk_bytes=chunk_bytes)
        edges = [(0, 1), (1, 2), (0, 2)]
        assert fg.add_matches([0, 1, 0], [1, 2, 2], _fake([match(i, j) for i, j in edges], device), 0.1)
        res = fg.solve()
        assert res.ok, res.message
        out.append((store.stack_poses([0, 1, 2]).data.reshape(-1, 8), fg.last_solve_chunks))
    assert out[0][1] == 1 and out[1][1] == 3
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-6)


def test_memory_report_accounts_every_stored_byte():
    store, poses, match = _graph_scene(4, seed=8)
    fg = FactorGraph(store, predictor=None, cfg=None, q_dtype=torch.float16)
    assert fg.memory_report() == {"edges": 0, "total": 0, "per_edge": 0, "idx": 0, "Q": 0, "q_bits": 0}
    fg.add_matches([0, 1], [1, 2], _fake([match(0, 1), match(1, 2)], "cpu"), 0.1)
    fg.add_matches([0], [3], _fake([match(0, 3)], "cpu"), 0.1)
    rep = fg.memory_report()
    tensors = [t for e in range(len(fg)) for t in fg.edge_tensors(e).values()]
    assert rep["edges"] == 3 and rep["total"] == sum(t.nbytes for t in tensors) == fg.nbytes()
    assert rep["per_edge"] == 2 * (4 + 2) * HW  # int32 index + float16 Q per direction
    for e in range(3):
        d = fg.edge_tensors(e)
        assert d["idx_ii2jj"].dtype == torch.int32 and d["Q_ii2jj"].dtype == torch.float16
    # the unused pixels are folded into the index (-1); the kept ones are the original matches
    idx_i2j = match(0, 1)[0]
    assert torch.equal(fg.edge_tensors(0)["idx_ii2jj"].long(), idx_i2j)
    fg.add_matches([1], [3], _fake([match(1, 3, 0.5)], "cpu"), 0.1)
    packed = fg.edge_tensors(3)["idx_ii2jj"]
    n_valid = round(0.5 * HW)
    assert (packed[n_valid:] == -1).all() and torch.equal(packed[:n_valid].long(), match(1, 3)[0][:n_valid])
    sub = fg.subgraph(lambda i, j: j != 3)
    assert sub.edges() == [(0, 1), (1, 2)] and sub.edge_tensors(1)["Q_jj2ii"] is fg.edge_tensors(1)["Q_jj2ii"]


def test_pack_unpack_direction_roundtrip():
    from mast3r_slam_ros.slam.factor_graph import pack_direction, unpack_direction

    idx = torch.tensor([[3, 1, 0, 2]])
    valid = torch.tensor([[[True], [True], [False], [True]]])
    Q = torch.tensor([[[2.0], [1.0], [9.0], [1e6]]])
    idx32, q = pack_direction(idx, valid, Q, Q_conf=1.5)
    assert idx32.tolist() == [[3, -1, -1, 2]] and q.dtype == torch.float16
    assert q[0, 3].item() == 65504.0  # saturated, finite
    i64, v, Qf = unpack_direction(idx32, q)
    assert i64.tolist() == [[3, 0, 0, 2]] and v[..., 0].tolist() == [[True, False, False, True]]
    assert Qf.dtype == torch.float32 and Qf.shape == (1, 4, 1)


def test_packed_layout_roundtrip_and_memory():
    """The default packed layout: one int32 per pixel and direction; indices exact, unused pixels -1 -> invalid,
    decoded Q within the layout's stated relative error (half a log step) of the float32 Q, saturated at 65504."""
    from mast3r_slam_ros.slam.factor_graph import PackedLayout, pack_edges, unpack_edges

    lay = PackedLayout.for_pixels(384 * 512, 1.5)
    assert (lay.idx_bits, lay.q_bits) == (18, 14) and lay.max_rel_error < 3.3e-4
    assert PackedLayout.for_pixels(2 ** 20, 1.5) is None  # < 12 bits left for Q: stored apart instead
    g = torch.Generator().manual_seed(4)
    n = 384 * 512
    idx = torch.randint(0, n, (2, n), generator=g)
    idx[0, :4] = torch.tensor([0, n - 1, 5, 7])
    Q = 1.5 * torch.exp(torch.rand(2, n, 1, generator=g) * 11.0)  # 1.5 .. 9e4 (above the float16 maximum too)
    valid = torch.rand(2, n, 1, generator=g) < 0.7
    Q[0, 2] = 1.5  # not > Q_conf: unused
    Q[0, 3] = float("nan")
    packed = pack_edges(idx, valid, Q, 1.5, lay)
    assert packed.dtype == torch.int32 and packed.shape == (2, n)
    i64, v, Qd = unpack_edges(packed, lay)
    use = valid[..., 0] & (Q[..., 0] > 1.5)
    assert torch.equal(v[..., 0], use) and torch.equal(packed == -1, ~use)
    assert torch.equal(i64[use], idx[use]) and (i64[~use] == 0).all() and i64.dtype == torch.int64
    Qc = Q[..., 0].clamp(max=65504.0)
    rel = ((Qd[..., 0] - Qc).abs() / Qc)[use]
    assert float(rel.max()) <= lay.max_rel_error + 5e-6  # + float32 round-off of log/exp at |ln Q| <= 11.1
    # float16 for comparison: the packed code is the finer one on this range
    rel16 = ((Qc.half().float() - Qc).abs() / Qc)[use]
    assert float(rel.max()) < float(rel16.max())
    # Q_conf <= 0: the scale starts at 2^-14
    lay0 = PackedLayout.for_pixels(100, 0.0)
    assert lay0.idx_bits == 7 and lay0.q_bits == 25 and abs(math.exp(lay0.log_lo) - 2.0 ** -14) < 1e-12


def test_packed_memory_report_and_decoded_edges():
    store, poses, match = _graph_scene(4, seed=8)
    fg = FactorGraph(store, predictor=None, cfg=None)  # default: packed
    fg.add_matches([0, 1], [1, 2], _fake([match(0, 1), match(1, 2, 0.5)], "cpu"), 0.1)
    rep = fg.memory_report()
    assert rep["per_edge"] == 2 * 4 * HW and rep["Q"] == 0 and rep["q_bits"] == 32 - HW.bit_length()
    tensors = [t for e in range(len(fg)) for t in fg.edge_tensors(e).values()]
    assert len(tensors) == 4 and rep["total"] == sum(t.nbytes for t in tensors) == fg.nbytes()
    d = fg.edge_matches(1)
    n_valid = round(0.5 * HW)
    assert d["valid_ii2jj"][:n_valid].all() and not d["valid_ii2jj"][n_valid:].any()
    assert torch.equal(d["idx_ii2jj"][:n_valid], match(1, 2)[0][:n_valid])
    sub = fg.subgraph(lambda i, j: j != 2)
    assert sub.layout == fg.layout and sub.edges() == [(0, 1)]


class _CountingPredictor:
    """Stands in for the network in :meth:`FactorGraph.match`: records the batch of every symmetric match call."""

    max_decode_batch = 2

    def __init__(self):
        self.batches = []


def test_match_splits_pairs_into_decode_batches(monkeypatch):
    """match() decodes/matches ``max_decode_batch // 2`` pairs at a time and concatenates the per-pair results in
    order; offloaded (host) tokens reach the matcher on the device of ``pos``."""
    from mast3r_slam_ros.slam import matching

    store, poses, _ = _graph_scene(4, seed=8)
    for k, f in enumerate(store):
        f.feat = torch.full((1, 3, 4), float(k))
        f.pos = torch.zeros(1, 3, 2, dtype=torch.int64)
    pred = _CountingPredictor()

    def fake_match_symmetric(predictor, feat_i, pos_i, feat_j, pos_j, true_shape, params):
        predictor.batches.append((feat_i[:, 0, 0].tolist(), feat_j[:, 0, 0].tolist()))
        b = feat_i.shape[0]
        v = feat_i[:, :1, :1].reshape(b, 1).expand(b, HW)
        return matching.SymmetricMatch(*(v.clone() for _ in range(10)))

    monkeypatch.setattr(matching, "match_symmetric", fake_match_symmetric)
    fg = FactorGraph(store, pred)
    m = fg.match([store[0], store[1], store[2]], [store[3], store[3], store[3]])
    assert pred.batches == [([0.0], [3.0]), ([1.0], [3.0]), ([2.0], [3.0])]
    assert m.idx_i2j.shape == (3, HW) and m.Qi[:, 0].tolist() == [0.0, 1.0, 2.0]
    pred.batches.clear()
    FactorGraph(store, pred, match_batch=2).match([store[0], store[1], store[2]], [store[3]] * 3)
    assert [len(b[0]) for b in pred.batches] == [2, 1]
    with pytest.raises(ValueError):
        FactorGraph(store, pred, match_batch=0)
