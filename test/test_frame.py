"""Frame, pointmap fusion (every filtering mode of spec §5.6) and the growable KeyframeStore."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.frame import Frame, Mode
from mast3r_slam_ros.slam.fusion import FILTERING_MODES
from mast3r_slam_ros.slam.keyframes import KeyframeCapacityError, KeyframeStore

H, W = 4, 6
HW = H * W


def make_frame(fid: int = 0, X=None, C=None) -> Frame:
    f = Frame(frame_id=fid, stamp_ns=fid * 10, img=torch.zeros(1, 3, H, W), true_shape=torch.tensor([[H, W]],
              dtype=torch.int32), uimg=torch.zeros(H, W, 3, dtype=torch.uint8), T_WC=Sim3.identity(1))
    if X is not None:
        f.update_pointmap(X, C)
    return f


def rand_obs(seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(HW, 3, generator=g) + torch.tensor([0.0, 0.0, 3.0])
    C = 1.0 + 5.0 * torch.rand(HW, 1, generator=g)
    return X, C


def test_mode_values():
    assert [int(m) for m in (Mode.INIT, Mode.TRACKING, Mode.RELOC, Mode.TERMINATED)] == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", FILTERING_MODES)
def test_first_update_takes_observation(mode):
    X, C = rand_obs(0)
    f = make_frame()
    f.update_pointmap(X, C, mode)
    assert f.N == 1 and f.N_updates == 1
    assert torch.equal(f.X_canon, X) and torch.equal(f.C, C)
    assert torch.allclose(f.average_conf(), C)


def test_weighted_pointmap_matches_numpy_weighted_mean():
    obs = [rand_obs(s) for s in range(3)]
    f = make_frame()
    for X, C in obs:
        f.update_pointmap(X, C, "weighted_pointmap")
    Xs = np.stack([o[0].numpy() for o in obs]).astype(np.float64)
    Cs = np.stack([o[1].numpy() for o in obs]).astype(np.float64)
    ref = (Cs * Xs).sum(0) / Cs.sum(0)
    np.testing.assert_allclose(f.X_canon.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f.C.numpy(), Cs.sum(0), rtol=1e-6)
    assert f.N == 3 and f.N_updates == 3
    np.testing.assert_allclose(f.average_conf().numpy(), Cs.mean(0), rtol=1e-6)


def test_weighted_spherical_averages_radius_along_a_shared_direction():
    d = torch.nn.functional.normalize(torch.randn(HW, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    d[:, 2] = d[:, 2].abs() + 0.1
    d = torch.nn.functional.normalize(d, dim=-1)
    r1, r2 = torch.full((HW, 1), 2.0), torch.full((HW, 1), 5.0)
    C1, C2 = torch.full((HW, 1), 1.0), torch.full((HW, 1), 3.0)
    f = make_frame()
    f.update_pointmap(d * r1, C1, "weighted_spherical")
    f.update_pointmap(d * r2, C2, "weighted_spherical")
    r_ref = (1.0 * 2.0 + 3.0 * 5.0) / 4.0
    torch.testing.assert_close(f.X_canon, d * r_ref, rtol=1e-5, atol=1e-5)
    assert f.N == 2 and torch.allclose(f.C, C1 + C2)


def test_recent_first_best_score_indep_conf():
    (X1, C1), (X2, C2), (X3, C3) = rand_obs(1), rand_obs(2), rand_obs(3)
    f = make_frame()
    for X, C in ((X1, C1), (X2, C2), (X3, C3)):
        f.update_pointmap(X, C, "recent")
    assert torch.equal(f.X_canon, X3) and f.N == 1 and f.N_updates == 3

    f = make_frame()
    for X, C in ((X1, C1), (X2, C2), (X3, C3)):
        f.update_pointmap(X, C, "first")
    assert torch.equal(f.X_canon, X2)  # replaced at the 2nd call only
    assert f.N == 1

    lo, hi = torch.full((HW, 1), 2.0), torch.full((HW, 1), 4.0)
    for score in ("median", "mean"):
        f = make_frame()
        f.update_pointmap(X1, lo, "best_score", score)
        f.update_pointmap(X2, hi, "best_score", score)   # better score: replace
        f.update_pointmap(X3, lo, "best_score", score)   # worse: keep
        assert torch.equal(f.X_canon, X2) and torch.equal(f.C, hi) and f.N == 1

    f = make_frame()
    f.update_pointmap(X1, C1, "indep_conf")
    f.update_pointmap(X2, C2, "indep_conf")
    take2 = (C2 > C1)[:, 0]
    assert torch.equal(f.X_canon[take2], X2[take2]) and torch.equal(f.X_canon[~take2], X1[~take2])
    assert torch.equal(f.C, torch.maximum(C1, C2))


def test_update_pointmap_errors():
    X, C = rand_obs(0)
    f = make_frame()
    with pytest.raises(ValueError, match="filtering_mode"):
        f.update_pointmap(X, C, "bogus")
    with pytest.raises(ValueError, match="H\\*W"):
        f.update_pointmap(X[:5], C[:5])
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        f.update_pointmap(Xn, C)
    with pytest.raises(RuntimeError):
        f.average_conf()
    assert f.N == 0 and f.X_canon is None


def test_update_pointmap_check_finite_false_skips_the_finiteness_test():
    """``check_finite=False`` (the tracker checked finiteness itself) fuses without the host-sync test."""
    X, C = rand_obs(0)
    f = make_frame()
    f.update_pointmap(X, C, check_finite=False)
    assert torch.equal(f.X_canon, X) and f.N == 1
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    g = make_frame()
    g.update_pointmap(Xn, C, "recent", check_finite=False)   # no raise: the caller owns the check
    assert torch.isnan(g.X_canon[0, 0]) and torch.equal(g.X_canon[1:], X[1:]) and g.N_updates == 1
    with pytest.raises(ValueError, match="H\\*W"):               # shape checks still run
        g.update_pointmap(X[:5], C[:5], check_finite=False)


def test_keyframe_store_grows_caps_and_tracks_dirty():
    store = KeyframeStore(max_keyframes=3)
    assert isinstance(store.lock, type(threading.RLock()))
    frames = [make_frame(i, *rand_obs(i)) for i in range(4)]
    for i in range(3):
        assert store.append(frames[i]) == i
    with pytest.raises(KeyframeCapacityError, match="max_keyframes"):
        store.append(frames[3])
    assert len(store) == 3 and store.last() is frames[2]
    assert store.dirty() == [0, 1, 2] and store.dirty() == []

    X, C = store.stack_points([2, 0])
    assert X.shape == (2, HW, 3) and C.shape == (2, HW, 1)
    assert torch.equal(X[0], frames[2].X_canon) and torch.equal(C[1], frames[0].average_conf())

    xi = torch.tensor([[0.1, -0.2, 0.3, 0.01, 0.02, -0.03, 0.05], [0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.0]])
    T = Sim3.exp(xi)
    v0 = store.version
    store.set_poses([1, 2], T)
    assert store.version > v0
    assert store.dirty() == [1, 2]
    torch.testing.assert_close(store.stack_poses([1, 2]).data, T.data)
    torch.testing.assert_close(store[1].T_WC.data[0], T.data[0])
    with pytest.raises(ValueError):
        store.set_poses([1], T)
    with pytest.raises(IndexError):
        store[5]
    assert store.pop_last() is frames[2] and len(store) == 2
    with pytest.raises(ValueError, match="no pointmap"):
        store.append(make_frame(9))
    with pytest.raises(ValueError):
        KeyframeStore(0)


def test_keyframe_store_lock_is_reentrant_across_calls():
    store = KeyframeStore(10)
    store.append(make_frame(0, *rand_obs(0)))
    with store.lock:
        with store.lock:
            assert len(store) == 1 and store.stack_poses().shape[0] == 1


# ------------------------------------------------------------------------------------------- token window (issue 8)
def _encoded_frame(device: str, i: int = 0) -> Frame:
    f = Frame(frame_id=i, stamp_ns=i, img=None, true_shape=torch.tensor([[4, 6]], dtype=torch.int32),
              uimg=torch.zeros(4, 6, 3, dtype=torch.uint8), T_WC=Sim3.identity(1, device=device))
    f.feat = torch.randn(1, 3, 8, device=device).to(torch.bfloat16)
    f.pos = torch.zeros(1, 3, 2, dtype=torch.int64, device=device)
    f.X_canon = torch.zeros(24, 3, device=device)
    f.C = torch.ones(24, 1, device=device)
    f.N = 1
    return f


def test_offload_feat_is_a_no_op_on_the_cpu():
    f = _encoded_frame("cpu")
    feat = f.feat
    assert not f.offload_feat() and f.feat is feat and not f.feat_on_host()
    assert f.device_feat() is feat and f.device.type == "cpu"


@pytest.mark.cuda
def test_offload_feat_moves_tokens_to_pinned_host_memory_and_back():
    from mast3r_slam_ros.network.inference import ensure_encoded
    from mast3r_slam_ros.slam.keyframes import KeyframeStore

    f = _encoded_frame("cuda")
    ref = f.feat.clone()
    assert f.offload_feat() and f.feat_on_host()
    assert f.feat.device.type == "cpu" and f.feat.is_pinned() and f.feat.dtype == torch.bfloat16
    assert f.device.type == "cuda"  # the frame's device is not the tokens' host
    back = f.device_feat()
    assert back.device.type == "cuda" and torch.equal(back, ref)
    feat, pos = ensure_encoded(None, f)  # cached: no encode; tokens come back on the device of pos
    assert feat.device == pos.device and torch.equal(feat, ref)
    # the store keeps the newest feat_window keyframes' tokens on the device and accounts the rest as host bytes
    store = KeyframeStore(feat_window=3, feat_dtype=torch.bfloat16)
    for i in range(7):
        store.append(_encoded_frame("cuda", i))
        store.compact(i)
    on_host = [f.feat_on_host() for f in store]
    assert on_host == [True] * 4 + [False] * 3
    rep = store.memory_report()
    assert rep["feat_on_host"] == 4 and rep["feat_host_bytes"] == 4 * 3 * 8 * 2
    assert rep["device_total"] == sum(t.nbytes for f in store for t in (f.pos, f.X_canon, f.C, f.T_WC.data)) \
        + 3 * 3 * 8 * 2
    assert KeyframeStore(feat_window=None).offload_old_feat() == 0


def test_store_offloads_only_compacted_tokens_outside_the_window(monkeypatch):
    """Which keyframes KeyframeStore.compact hands to Frame.offload_feat (the move itself needs CUDA, see above):
    every keyframe older than the newest feat_window whose tokens are already in the storage dtype."""
    moved = []
    monkeypatch.setattr(Frame, "offload_feat", lambda self: moved.append(self.frame_id) or True)
    store = KeyframeStore(feat_window=2, feat_dtype=torch.bfloat16)
    for i in range(5):
        f = _encoded_frame("cpu", i)
        f.feat = f.feat.float()  # as encoded: float32 until compacted
        store.append(f)
    assert store.offload_old_feat() == 0  # nothing compacted yet: the retrieval may still read the float32 tokens
    store.compact(1)
    assert moved == [1]
    moved.clear()
    store.compact(0)
    assert sorted(moved) == [0, 1]
    with pytest.raises(ValueError):
        KeyframeStore(feat_window=1)
