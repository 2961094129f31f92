"""OraclePredictor: Predictor API shapes, frame identification, pointmap consistency with the ground truth, descriptor
correspondence, confidence rules and the noise model (docs/interfaces.md, spec upstream_algorithm.md §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mast3r_slam_ros.geometry import preprocess_image
from mast3r_slam_ros.testing import OracleNoise, OraclePredictor, render_poses, render_sequence, sequence_poses


@pytest.fixture(scope="module")
def loop_seq():
    return render_sequence("loop", n_frames=60, size=(224, 224))


def _net(u8: np.ndarray) -> torch.Tensor:
    """Independent of the oracle: the spec §2 normalization of an identity-sized image, [1,3,H,W]."""
    x = (u8.astype(np.float32) / 255.0 - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


def _pair(orc: OraclePredictor, seq, i: int, j: int):
    fi, pi = orc.encode(_net(seq.images[i]), torch.tensor([[224, 224]]))
    fj, pj = orc.encode(_net(seq.images[j]), torch.tensor([[224, 224]]))
    return orc.decode(fi, pi, fj, pj, torch.tensor([[224, 224]]))


def _to_world(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    return X.reshape(-1, 3).astype(np.float64) @ T[:3, :3].T + T[:3, 3]


def test_api_shapes_and_value_ranges(loop_seq):
    orc = OraclePredictor(loop_seq)
    imgs = torch.cat([_net(loop_seq.images[k]) for k in (0, 5, 50)])
    feat, pos = orc.encode(imgs, torch.tensor([[224, 224]] * 3))
    assert feat.shape == (3, 196, 1024) and feat.dtype == torch.float32
    assert pos.shape == (3, 196, 2) and pos.dtype == torch.int64
    assert pos[0, 15].tolist() == [1, 1] and pos[0, -1].tolist() == [13, 13]  # (row, col) grid of 14x14 tokens
    r1, r2 = orc.decode(feat[:2], pos[:2], feat[1:], pos[1:], torch.tensor([[224, 224]] * 2))
    for r in (r1, r2):
        assert r.pts3d.shape == (2, 224, 224, 3) and r.conf.shape == (2, 224, 224)
        assert r.desc.shape == (2, 224, 224, 24) and r.desc_conf.shape == (2, 224, 224)
        assert all(t.dtype == torch.float32 for t in (r.pts3d, r.conf, r.desc, r.desc_conf))
        assert float(r.conf.min()) >= 1.0 and float(r.desc_conf.min()) >= 0.0
        torch.testing.assert_close(r.desc.norm(dim=-1), torch.ones(2, 224, 224), atol=1e-5, rtol=0)


def test_small_native_size_and_partial_decode():
    seq = render_sequence("rotation_heavy", n_frames=4, size=(128, 96))
    orc = OraclePredictor(seq, noise=OracleNoise.none())
    f, p = orc.encode(torch.cat([_net(seq.images[1]), _net(seq.images[2])]), torch.tensor([[96, 128]] * 2))
    assert f.shape == (2, 48, 1024)
    r1, r2 = orc.decode(f[:1], p[:1], f[1:], p[1:], torch.tensor([[96, 128]]))
    np.testing.assert_allclose(r1.pts3d[0, ..., 2].numpy(), seq.depths[1], rtol=1e-5)
    m1, m2 = orc.decode(f[:1], p[:1], f[1:], p[1:], torch.tensor([[96, 128]]), need_res2=False, need_desc=False)
    assert m2 is None and m1.desc is None and m1.desc_conf is None
    torch.testing.assert_close(m1.pts3d, r1.pts3d)
    torch.testing.assert_close(m1.conf, r1.conf)
    # a sequence from external ground truth (no scene, no face ids) works at its native size
    from mast3r_slam_ros.testing import SyntheticSequence

    ext = SyntheticSequence(seq.images, seq.depths, seq.T_WC_gt, seq.K, seq.stamps_ns)
    o2 = OraclePredictor(ext, noise=OracleNoise.none())
    f, p = o2.encode(torch.cat([_net(seq.images[0]), _net(seq.images[3])]), torch.tensor([[96, 128]] * 2))
    _, e2 = o2.decode(f[:1], p[:1], f[1:], p[1:], torch.tensor([[96, 128]]))
    np.testing.assert_allclose(_to_world(e2.pts3d[0].numpy(), seq.T_WC_gt[0]), seq.world_points(3).reshape(-1, 3),
                               atol=1e-4)


def test_identification_exact_noisy_and_foreign_images(loop_seq):
    orc = OraclePredictor(loop_seq)
    for k in (0, 17, 59):
        assert orc.identify(_net(loop_seq.images[k])[0]) == k
    noisy = np.clip(loop_seq.images[17].astype(int) + np.random.default_rng(0).integers(-2, 3, (224, 224, 3)), 0, 255)
    assert orc.identify(_net(noisy.astype(np.uint8))[0]) == 17
    with pytest.raises(ValueError, match="matches no frame"):
        orc.identify(_net(np.full((224, 224, 3), 7, np.uint8))[0])
    # decode recovers the frames from the tokens even after a cast to half precision
    f, p = orc.encode(torch.cat([_net(loop_seq.images[3]), _net(loop_seq.images[4])]), torch.tensor([[224, 224]] * 2))
    a1, a2 = orc.decode(f[:1].half(), p[:1], f[1:].half(), p[1:], torch.tensor([224, 224]))
    b1, b2 = orc.decode(f[:1], p[:1], f[1:], p[1:], torch.tensor([224, 224]))
    torch.testing.assert_close(a2.pts3d, b2.pts3d)
    with pytest.raises(ValueError, match="do not come from this oracle"):
        orc.decode(torch.randn_like(f[:1]), p[:1], f[1:], p[1:], torch.tensor([224, 224]))


def test_noise_free_pointmaps_equal_ground_truth(loop_seq):
    orc = OraclePredictor(loop_seq, noise=OracleNoise.none())
    i, j = 10, 12
    r1, r2 = _pair(orc, loop_seq, i, j)
    Ti = loop_seq.T_WC_gt[i]
    # X_11: z equals the rendered depth; X_21 mapped to the world equals frame j's world points
    np.testing.assert_allclose(r1.pts3d[0, ..., 2].numpy(), loop_seq.depths[i], rtol=1e-5)
    np.testing.assert_allclose(_to_world(r1.pts3d[0].numpy(), Ti), loop_seq.world_points(i).reshape(-1, 3), atol=1e-4)
    np.testing.assert_allclose(_to_world(r2.pts3d[0].numpy(), Ti), loop_seq.world_points(j).reshape(-1, 3), atol=1e-4)
    # pinhole: X_11 projects back onto its own pixel grid with K
    X = r1.pts3d[0].numpy().astype(np.float64)
    K = loop_seq.K
    u = K[0, 0] * X[..., 0] / X[..., 2] + K[0, 2]
    np.testing.assert_allclose(u, np.broadcast_to(np.arange(224.0), (224, 224)), atol=1e-3)


def test_descriptors_of_true_correspondences_are_closest(loop_seq):
    orc = OraclePredictor(loop_seq, noise=OracleNoise.none())
    i, j = 20, 21
    r1, r2 = _pair(orc, loop_seq, i, j)
    D1 = r1.desc[0].numpy()
    D2 = r2.desc[0].numpy().reshape(-1, 24)
    # independent correspondences: project frame j's world points into camera i, keep unoccluded in-view pixels
    Pw = loop_seq.world_points(j).reshape(-1, 3)
    Tinv = np.linalg.inv(loop_seq.T_WC_gt[i])
    Xc = Pw @ Tinv[:3, :3].T + Tinv[:3, 3]
    K = loop_seq.K
    u = np.rint(K[0, 0] * Xc[:, 0] / Xc[:, 2] + K[0, 2]).astype(int)
    v = np.rint(K[1, 1] * Xc[:, 1] / Xc[:, 2] + K[1, 2]).astype(int)
    ok = (u >= 0) & (u < 224) & (v >= 0) & (v < 224)
    ok[ok] &= np.abs(loop_seq.depths[i][v[ok], u[ok]] - Xc[ok, 2]) < 0.01 * Xc[ok, 2]
    assert ok.mean() > 0.5
    rng = np.random.default_rng(1)
    hits = 0
    sample = rng.choice(np.nonzero(ok)[0], 400, replace=False)
    for n in sample:
        u0, u1, v0, v1 = max(0, u[n] - 15), min(224, u[n] + 16), max(0, v[n] - 15), min(224, v[n] + 16)
        s = D1[v0:v1, u0:u1] @ D2[n]
        r, c = np.unravel_index(np.argmax(s), s.shape)
        hits += abs(r + v0 - v[n]) <= 1 and abs(c + u0 - u[n]) <= 1
    assert hits / len(sample) > 0.9
    # the same oracle's gt_matches agrees with the independent projection
    idx, valid = orc.gt_matches(i, j, (224, 224))
    both = valid & ok
    assert both.sum() > 0.9 * ok.sum()
    np.testing.assert_array_equal(idx[both], (u + 224 * v)[both])


def test_confidences_flag_plain_wall_and_non_covisible_pixels():
    seq = render_poses(sequence_poses("textureless", 15)[7:9], size=(224, 224))
    orc = OraclePredictor(seq)
    r1, r2 = _pair(orc, seq, 0, 1)  # frames 7, 8 of 15 (the middle): only the plain wall
    assert float((r1.desc_conf[0] > 1.5).float().mean()) < 0.02
    assert float(r1.conf[0].median()) < 1.5
    seq = render_poses(sequence_poses("loop", 40)[[0, 3]], size=(224, 224))
    orc = OraclePredictor(seq)
    i, j = 0, 1  # frames 0 and 3 of 40, large motion: part of frame j is outside view i
    r1, r2 = _pair(orc, seq, i, j)
    Q2 = r2.desc_conf[0].numpy().reshape(-1)
    C2 = r2.conf[0].numpy().reshape(-1)
    Tinv = np.linalg.inv(seq.T_WC_gt[i])
    Xc = seq.world_points(j).reshape(-1, 3) @ Tinv[:3, :3].T + Tinv[:3, 3]
    u = seq.K[0, 0] * Xc[:, 0] / Xc[:, 2] + seq.K[0, 2]
    v = seq.K[1, 1] * Xc[:, 1] / Xc[:, 2] + seq.K[1, 2]
    outside = (u < -1) | (u > 224) | (v < -1) | (v > 224) | (Xc[:, 2] <= 0)
    assert outside.mean() > 0.05
    assert np.all(Q2[outside] < 1.5)
    inside = ~outside
    assert np.mean(Q2[inside] > 1.5) > 0.5  # textured, co-visible pixels are usable matches
    assert np.median(C2[outside]) < np.median(C2[inside])


def test_noise_model_scale_depth_pose_and_determinism(loop_seq):
    # per-pair scale only: X = s * X_gt with one s per pair; log s ~ N(0, sigma)
    sigma = 0.2
    orc = OraclePredictor(loop_seq, noise=OracleNoise(scale_log_sigma=sigma, seed=5))
    ref = OraclePredictor(loop_seq, noise=OracleNoise.none())
    logs = []
    for k in range(25):
        i, j = 2 * k, 2 * k + 1
        a1, a2 = orc.pair_outputs(i, j, (224, 224), need_desc=False)
        b1, b2 = ref.pair_outputs(i, j, (224, 224), need_desc=False)
        r1 = a1["pts3d"][..., 2] / b1["pts3d"][..., 2]
        r2 = np.linalg.norm(a2["pts3d"], axis=-1) / np.linalg.norm(b2["pts3d"], axis=-1)
        assert np.ptp(r1) < 1e-4 * r1.mean() and abs(np.median(r2) / np.median(r1) - 1) < 1e-5
        logs.append(math.log(float(np.median(r1))))
    assert 0.6 * sigma < np.std(logs) < 1.5 * sigma
    # determinism per ordered pair, different for the reversed pair
    a1, _ = orc.pair_outputs(3, 5, (224, 224))
    c1, _ = orc.pair_outputs(3, 5, (224, 224))
    d1, _ = orc.pair_outputs(3, 7, (224, 224))
    np.testing.assert_array_equal(a1["pts3d"], c1["pts3d"])
    assert not np.allclose(a1["pts3d"], d1["pts3d"])
    # multiplicative depth noise: std of log(z / z_gt) on textured pixels equals depth_rel
    orc = OraclePredictor(loop_seq, noise=OracleNoise(depth_rel=0.02, scale_log_sigma=0.0, textureless_gain=0.0))
    a1, _ = orc.pair_outputs(30, 31, (224, 224), need_desc=False)
    lr = np.log(a1["pts3d"][..., 2] / loop_seq.depths[30])
    assert abs(lr.std() - 0.02) < 0.002 and abs(lr.mean()) < 0.001
    # relative-pose error: X_21 differs from the truth by a rigid motion whose angle follows rot_deg
    orc = OraclePredictor(loop_seq, noise=OracleNoise(rot_deg=1.0, scale_log_sigma=0.0))
    angles = []
    for k in range(12):
        _, a2 = orc.pair_outputs(k, k + 1, (224, 224), need_desc=False)
        _, b2 = ref.pair_outputs(k, k + 1, (224, 224), need_desc=False)
        A, B = a2["pts3d"].reshape(-1, 3).astype(np.float64), b2["pts3d"].reshape(-1, 3).astype(np.float64)
        Ac, Bc = A - A.mean(0), B - B.mean(0)
        U, _, Vt = np.linalg.svd(Bc.T @ Ac)
        R = (U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt).T  # Kabsch (independent of the oracle)
        angles.append(math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
    assert 0.4 < np.sqrt(np.mean(np.square(angles))) < 1.6
    # descriptor noise lowers the similarity of the true correspondence (1 - cos grows with desc_sigma)
    for s_lo, s_hi in ((0.0, 0.05), (0.05, 0.2)):
        sims = []
        for s in (s_lo, s_hi):
            o = OraclePredictor(loop_seq, noise=OracleNoise(desc_sigma=s, scale_log_sigma=0.0, textureless_gain=0.0))
            a1, a2 = o.pair_outputs(40, 40, (224, 224))
            sims.append(float(np.mean(np.sum(a1["desc"] * a2["desc"], axis=-1))))
        assert sims[1] < sims[0]


def test_tokens_respond_to_content_so_revisits_are_retrievable(loop_seq):
    """With 60 frames, frame q >= 54 retraces frame q - 53.3 (5 cm higher): a bag-of-tokens similarity of the
    oracle's tokens finds the revisited frame among the first 45."""
    orc = OraclePredictor(loop_seq, feat_dim=256)
    frames = list(range(45)) + [55, 57, 59]
    feats = {k: orc.encode(_net(loop_seq.images[k]), torch.tensor([[224, 224]]))[0][0].numpy() for k in frames}
    F = np.stack([feats[k] for k in frames])
    F = F - F.mean(axis=(0, 1))
    F /= np.linalg.norm(F, axis=-1, keepdims=True)
    db = F[:45].reshape(-1, F.shape[-1])
    for n, q in enumerate((55, 57, 59)):
        sims = (F[45 + n] @ db.T).reshape(196, 45, 196).max(axis=2).mean(axis=0)  # [45]
        assert abs(int(sims.argmax()) - (q - 60 * 240 / 270)) <= 1.0


def test_non_native_network_size_uses_preprocess_and_adjusted_intrinsics():
    """Sequence rendered at 160x120, network image 224x224 (resize + centre crop): the oracle's X_11 projects with
    its network K onto pixels whose colour is the scene colour at the GT surface point."""
    seq = render_sequence("slow_translation", n_frames=5, size=(160, 120))
    orc = OraclePredictor(seq, noise=OracleNoise.none())
    pre = preprocess_image(seq.images[2], size=224)
    assert tuple(pre.true_shape[0].tolist()) == (224, 224)
    feat, pos = orc.encode(pre.img, pre.true_shape)
    r1, _ = orc.decode(feat, pos, feat, pos, pre.true_shape)
    X = r1.pts3d[0].numpy().astype(np.float64)
    Pw = _to_world(X, seq.T_WC_gt[2])
    face = seq.scene.intersect(seq.T_WC_gt[2][:3, 3], Pw - seq.T_WC_gt[2][:3, 3])[1]
    col = seq.scene.colors(Pw, face).reshape(224, 224, 3)
    uimg = np.asarray(pre.uimg).astype(np.float64)
    err = np.median(np.abs(col - uimg))
    shifted = np.median(np.abs(col[:, 2:] - uimg[:, :-2]))
    assert err < 6.0 and shifted > 1.5 * err, (err, shifted)
