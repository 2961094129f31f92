"""``mast3r-slam-ros eval`` (apps/evaluate.py): ATE after Umeyama alignment, checked against an independent numpy
Umeyama (Umeyama, PAMI 1991, eqs. 38-42) on a ground truth and a Sim(3)-transformed noisy copy of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from mast3r_slam_ros import cli
from mast3r_slam_ros.apps.evaluate import ate_from_poses, compute_ate
from mast3r_slam_ros.io.export import write_tum


def umeyama_numpy(src: np.ndarray, dst: np.ndarray, with_scale: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares (s, R, t) with dst ≈ s R src + t; src, dst [n,3] (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    var_s = (xs**2).sum() / len(src)
    s = float(np.trace(np.diag(D) @ S) / var_s) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return R, t, s


def _make_pair(n=300, noise=0.01, seed=0):
    """GT: a smooth 3-D loop (metres); estimate: noisy GT mapped by a random Sim(3) (the SLAM frame)."""
    rng = np.random.default_rng(seed)
    u = np.linspace(0, 2 * np.pi, n)
    gt_xyz = np.stack([2.0 * np.cos(u), 1.5 * np.sin(u), 0.3 * np.sin(3 * u)], 1)
    gt_q = Rotation.from_rotvec(np.stack([0.1 * np.sin(u), u, 0.05 * np.cos(2 * u)], 1)).as_quat()
    stamps_gt = 100.0 + np.arange(n) * 0.05
    # estimate = inverse of a Sim(3) applied to the noisy GT: est = (R^T (gt + e - t)) / s
    s_true, R_true = 0.37, Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
    t_true = rng.normal(scale=2.0, size=3)
    noisy = gt_xyz + rng.normal(scale=noise, size=gt_xyz.shape)
    est_xyz = ((noisy - t_true) @ R_true) / s_true
    est_q = (Rotation.from_matrix(R_true.T) * Rotation.from_quat(gt_q)).as_quat()
    stamps_est = stamps_gt + rng.uniform(-0.004, 0.004, size=n)  # within the default max_diff
    return (stamps_gt, np.hstack([gt_xyz, gt_q]), stamps_est, np.hstack([est_xyz, est_q]), s_true)


def _write(tmp_path, stamps, poses7, name):
    data8 = np.hstack([poses7, np.ones((len(poses7), 1))])
    return write_tum(tmp_path / name, np.round(stamps * 1e9).astype(np.int64), data8)


def test_ate_equals_independent_umeyama_and_noise_level(tmp_path):
    noise = 0.01
    st_gt, gt, st_est, est, s_true = _make_pair(noise=noise)
    res = compute_ate(_write(tmp_path, st_est, est, "est.txt"), _write(tmp_path, st_gt, gt, "gt.txt"))
    assert res.n_pairs == len(gt) and res.correct_scale
    R, t, s = umeyama_numpy(est[:, :3], gt[:, :3], with_scale=True)
    aligned = s * est[:, :3] @ R.T + t
    err = np.linalg.norm(gt[:, :3] - aligned, axis=1)
    np.testing.assert_allclose(res.rmse, np.sqrt(np.mean(err**2)), rtol=1e-6)
    np.testing.assert_allclose(res.max, err.max(), rtol=1e-6)
    np.testing.assert_allclose(res.median, np.median(err), rtol=1e-6)
    np.testing.assert_allclose(res.scale, s, rtol=1e-6)
    np.testing.assert_allclose(res.scale, s_true, rtol=0.01)  # recovers the applied scale
    # ATE ≈ noise level: E||e||² = 3σ² for isotropic noise (alignment absorbs a tiny part of it)
    assert 0.85 * noise * np.sqrt(3) < res.rmse < 1.15 * noise * np.sqrt(3)


def test_no_scale_matches_se3_umeyama_and_is_worse_for_scaled_estimate():
    st_gt, gt, st_est, est, _ = _make_pair(noise=0.005, seed=1)
    res_se3 = ate_from_poses(st_est, est, st_gt, gt, correct_scale=False)
    R, t, _ = umeyama_numpy(est[:, :3], gt[:, :3], with_scale=False)
    err = np.linalg.norm(gt[:, :3] - (est[:, :3] @ R.T + t), axis=1)
    np.testing.assert_allclose(res_se3.rmse, np.sqrt(np.mean(err**2)), rtol=1e-6)
    assert res_se3.scale == pytest.approx(1.0)
    res_sim3 = ate_from_poses(st_est, est, st_gt, gt, correct_scale=True)
    assert res_sim3.rmse < 0.2 * res_se3.rmse  # the estimate is at scale 1/0.37


def test_association_uses_max_diff_and_subsets():
    st_gt, gt, st_est, est, _ = _make_pair(n=200, noise=0.002, seed=2)
    keep = np.arange(0, 200, 3)  # keyframe-like subset of the estimate
    res = ate_from_poses(st_est[keep], est[keep], st_gt, gt)
    assert res.n_pairs == len(keep) and res.n_gt == 200
    R, t, s = umeyama_numpy(est[keep, :3], gt[keep, :3], with_scale=True)
    err = np.linalg.norm(gt[keep, :3] - (s * est[keep, :3] @ R.T + t), axis=1)
    np.testing.assert_allclose(res.rmse, np.sqrt(np.mean(err**2)), rtol=1e-6)
    with pytest.raises(ValueError, match="associated|max_diff"):
        ate_from_poses(st_est + 1000.0, est, st_gt, gt)  # no overlap in time


def test_cli_eval_prints_table_writes_plot_and_json(tmp_path, capsys):
    st_gt, gt, st_est, est, _ = _make_pair(n=120, noise=0.01, seed=3)
    e, g = _write(tmp_path, st_est, est, "est.txt"), _write(tmp_path, st_gt, gt, "gt.txt")
    png, js = tmp_path / "plot.png", tmp_path / "ate.json"
    rc = cli.main(["eval", str(e), str(g), "--plot", str(png), "--json", str(js), "--max-diff", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0
    ref = compute_ate(e, g)
    rmse_line = next(ln for ln in out.splitlines() if ln.strip().startswith("rmse"))
    assert float(rmse_line.split()[1]) == pytest.approx(ref.rmse, abs=1e-6)
    assert "pairs" in out and "120" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200
        assert np.asarray(im.convert("L")).std() > 1.0  # not a blank canvas
    stats = json.loads(js.read_text(encoding="utf-8"))
    assert stats["rmse"] == pytest.approx(ref.rmse) and stats["n_pairs"] == 120
    rc_ns = cli.main(["eval", str(e), str(g), "--no-scale"])
    assert rc_ns == 0 and "SE(3)" in capsys.readouterr().out


def test_cli_eval_bad_input(tmp_path, capsys):
    st_gt, gt, st_est, est, _ = _make_pair(n=20, seed=4)
    g = _write(tmp_path, st_gt, gt, "gt.txt")
    assert cli.main(["eval", str(tmp_path / "missing.txt"), str(g)]) == 2
    assert "not found" in capsys.readouterr().err
    e = _write(tmp_path, st_est + 50.0, est, "est.txt")
    assert cli.main(["eval", str(e), str(g), "--max-diff", "0.001"]) == 2
    assert "max_diff" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2 3\n1 2 3 4\n", encoding="utf-8")
    assert cli.main(["eval", str(bad), str(g)]) == 2
