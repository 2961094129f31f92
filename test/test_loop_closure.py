"""Loop closure through the backend (retrieval + factor graph + global solve) on the rendered ``loop`` sequence.

Keyframes are taken every few frames of the loop (whose last frames revisit its first ones), with MASt3R-like oracle
pointmaps that carry realistic noise (per-keyframe scale, smooth depth bias, pixel noise), and fed one by one to
:class:`~mast3r_slam_ros.slam.backend.Backend` exactly as ``SlamSystem`` does (``queue_keyframe`` + ``step``). Initial
poses are the GT relative motions with a random-walk error (stand-in for tracking). Independent references: the
rendered GT poses (ATE after Sim(3) Umeyama alignment, computed here with numpy) and the GT geometry of the revisit
(camera centres / viewing directions) to check that the retrieved loop edge is a true revisit. Nothing about the loop
is given to the backend: the edge must come from ASMK retrieval + the two-way match test.

Small network images (96x64) and 3 Gauss-Newton iterations per keyframe in the online backend (config
``local_opt.max_iters``; the with/without comparison uses solves run to convergence) keep this file fast on a CPU; the
full-system comparison at 224x224 is the ``mast3r-slam-ros bench-synthetic`` table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mast3r_slam_ros.config import load_config
from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.backend import Backend
from mast3r_slam_ros.slam.frame import Frame
from mast3r_slam_ros.slam.keyframes import KeyframeStore
from mast3r_slam_ros.slam.matching import ensure_encoded, mono_inference
from mast3r_slam_ros.testing.oracle import OracleNoise, OraclePredictor
from mast3r_slam_ros.testing.scenes import render_sequence

SIZE = (96, 64)
N_FRAMES = 64
KF_STEP = 5


def _mat_to_sim3(T: np.ndarray) -> Sim3:
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(T[:3, :3]).as_quat()  # x, y, z, w
    return Sim3(torch.tensor([*T[:3, 3], *q, 1.0], dtype=torch.float32).reshape(1, 8))


def umeyama_ate(est: np.ndarray, gt: np.ndarray) -> float:
    """ATE RMSE after Sim(3) Umeyama alignment of est [N,3] onto gt [N,3] (independent numpy reference)."""
    mx, my = est.mean(0), gt.mean(0)
    xc, yc = est - mx, gt - my
    U, D, Vt = np.linalg.svd(yc.T @ xc / len(est))
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1
    R = U @ E @ Vt
    s = np.trace(np.diag(D) @ E) / (xc ** 2).sum(1).mean()
    t = my - s * R @ mx
    return float(np.sqrt((np.linalg.norm((s * (R @ est.T)).T + t - gt, axis=1) ** 2).mean()))


@pytest.fixture(scope="module")
def loop_data():
    seq = render_sequence("loop", n_frames=N_FRAMES, size=SIZE)
    kf_frames = list(range(0, N_FRAMES, KF_STEP)) + ([N_FRAMES - 1] if (N_FRAMES - 1) % KF_STEP else [])
    return seq, kf_frames


def run_backend(seq, kf_frames, loop_closure: bool, seed: int = 0):
    """Feed keyframes to a Backend; returns (store, backend, ATE of the keyframes, initial poses Sim3 [n])."""
    torch.manual_seed(seed)
    pred = OraclePredictor(seq, noise=OracleNoise.realistic(seed=seed), feat_dim=256)
    cfg = load_config(None, {"runtime.device": "cpu", "runtime.kernel_backend": "torch", "matching.radius": 0,
                             "runtime.loop_closure": loop_closure, "local_opt.max_iters": 3})
    store = KeyframeStore()
    backend = Backend(store, pred, cfg)
    rng = np.random.default_rng(seed + 100)
    T0inv = np.linalg.inv(seq.T_WC_gt[kf_frames[0]])
    T_init = np.eye(4)
    H, W = SIZE[1], SIZE[0]
    init = []
    for n, f in enumerate(kf_frames):
        if n > 0:  # GT relative motion with a random-walk error (what tracking would hand over)
            d = np.linalg.inv(seq.T_WC_gt[kf_frames[n - 1]]) @ seq.T_WC_gt[f]
            from scipy.spatial.transform import Rotation

            noise = np.eye(4)
            noise[:3, :3] = Rotation.from_rotvec(rng.normal(0, math.radians(2.0), 3)).as_matrix()
            noise[:3, 3] = rng.normal(0, 0.03, 3)
            T_init = T_init @ d @ noise
        else:
            T_init = T0inv @ seq.T_WC_gt[f]
        img = torch.from_numpy(seq.images[f]).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        fr = Frame(frame_id=f, stamp_ns=int(seq.stamps_ns[f]), img=img,
                   true_shape=torch.tensor([[H, W]], dtype=torch.int32), uimg=torch.from_numpy(seq.images[f]),
                   T_WC=_mat_to_sim3(T_init))
        ensure_encoded(pred, fr)
        X, C = mono_inference(pred, fr)
        fr.update_pointmap(X, C)
        idx = store.append(fr)
        init.append(fr.T_WC.data.clone())
        backend.queue_keyframe(idx)
        while backend.has_work():
            assert backend.step()
            assert backend.last_result is None or backend.last_result.ok, backend.last_result.message
    init_poses = Sim3(torch.cat(init))
    return store, backend, _ate(store, seq, kf_frames), init_poses


def _ate(store, seq, kf_frames) -> float:
    est = np.stack([store[k].T_WC.translation().reshape(3).double().numpy() for k in range(len(store))])
    gt = np.stack([seq.T_WC_gt[f][:3, 3] for f in kf_frames])
    return umeyama_ate(est, gt)


def test_loop_closure_found_by_retrieval_and_lowers_ate(loop_data):
    """The backend (loop closure on) finds loop edges by retrieval; with them the trajectory error is clearly lower.

    The comparison without loop closure uses the same graph minus its loop edges (the edges a backend with
    ``runtime.loop_closure = False`` builds: matching does not depend on the poses and retrieval is deterministic),
    both solved to convergence from the same initial poses.
    """
    seq, kf_frames = loop_data
    store, be, ate_online, init = run_backend(seq, kf_frames, loop_closure=True)
    assert be.loop_closures >= 1 and be.loop_edges, "no loop edge was retrieved"
    for i, j in be.loop_edges:  # every retrieved loop edge is a true revisit in the ground truth
        Ti, Tj = seq.T_WC_gt[kf_frames[i]], seq.T_WC_gt[kf_frames[j]]
        dist = np.linalg.norm(Ti[:3, 3] - Tj[:3, 3])
        ang = math.degrees(math.acos(np.clip(Ti[:3, 2] @ Tj[:3, 2], -1, 1)))
        assert dist < 1.5 and ang < 60.0, (i, j, dist, ang)
        assert (i, j) in be.graph.edges() and j - i >= be.loop_min_gap
    loops = set(be.loop_edges)
    no_loop = be.graph.subgraph(lambda i, j: (i, j) not in loops)
    assert len(no_loop) == len(be.graph) - len(loops)

    def batch(graph):
        store.set_poses(list(range(len(store))), init)
        for _ in range(7):  # 7 x 3 iterations
            res = graph.solve()
            assert res.ok, res.message
        return _ate(store, seq, kf_frames)

    ate_off = batch(no_loop)
    ate_lc = batch(be.graph)
    print(f"\nloop sequence, {len(kf_frames)} keyframes, loop edges {be.loop_edges}: ATE with loop closure "
          f"{ate_lc:.4f} m (online backend {ate_online:.4f} m), without loop closure {ate_off:.4f} m")
    assert ate_lc < 0.7 * ate_off, (ate_lc, ate_off)
