"""Exports (io/export.py): TUM and PLY round trips through independent readers, atomicity, input validation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData
from scipy.spatial.transform import Rotation

from mast3r_slam_ros.io import export
from mast3r_slam_ros.io.export import read_tum, save_keyframe_images, voxel_downsample, write_ply, write_tum
from mast3r_slam_ros.lie import Sim3


def _random_sim3_data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.normal(scale=3.0, size=(n, 3))
    q = Rotation.random(n, random_state=seed).as_quat()  # (x, y, z, w)
    s = rng.uniform(0.2, 5.0, size=(n, 1))
    return np.concatenate([t, q, s], axis=1)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------------ TUM
@pytest.mark.parametrize("as_type", ["sim3", "sim3_list", "tensor", "numpy"])
def test_tum_round_trip_with_evo_and_plain_parser(tmp_path, as_type):
    n = 25
    data = _random_sim3_data(n, seed=1)
    stamps = np.array([1_305_031_102_175_304_000 + 33_333_333 * i + (i % 7) for i in range(n)], dtype=np.int64)
    poses = {
        "sim3": Sim3(torch.from_numpy(data)),
        "sim3_list": [Sim3(torch.from_numpy(data[i : i + 1]).float()) for i in range(n)],
        "tensor": torch.from_numpy(data),
        "numpy": data,
    }[as_type]
    path = write_tum(tmp_path / "traj.txt", stamps, poses)
    tol = 1e-6 if as_type == "sim3_list" else 1e-9  # float32 input in the list case

    # plain text: exact nanosecond stamps with 9 decimals, 8 columns
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    assert len(lines) == n
    for ln, s in zip(lines, stamps):
        sec, frac = ln.split()[0].split(".")
        assert len(frac) == 9 and int(sec) * 1_000_000_000 + int(frac) == int(s)

    # independent reader: evo
    from evo.tools import file_interface

    traj = file_interface.read_tum_trajectory_file(str(path))
    np.testing.assert_allclose(traj.positions_xyz, data[:, :3], atol=tol * 10)
    # evo stores quaternions (w, x, y, z); the sign is arbitrary, so compare rotations
    R_evo = Rotation.from_quat(traj.orientations_quat_wxyz[:, [1, 2, 3, 0]]).as_matrix()
    R_ref = Rotation.from_quat(data[:, 3:7]).as_matrix()
    np.testing.assert_allclose(R_evo, R_ref, atol=tol * 10)

    # our reader agrees (and the scale was dropped: 7 columns only)
    st, p7 = read_tum(path)
    assert p7.shape == (n, 7)
    np.testing.assert_allclose(st, stamps / 1e9, rtol=0, atol=1e-6)
    assert np.all(p7[:, 6] >= 0)


def test_tum_drops_scale_but_keeps_camera_centre(tmp_path):
    """The camera centre of T_WC = (t, q, s) is t whatever s is: T_WC * 0 = t."""
    data = _random_sim3_data(4, seed=2)
    T = Sim3(torch.from_numpy(data))
    centres = T.act(torch.zeros(4, 3, dtype=torch.float64)).numpy()
    _, p7 = read_tum(write_tum(tmp_path / "t.txt", np.arange(4), T))
    np.testing.assert_allclose(p7[:, :3], centres, atol=1e-9)


def test_tum_validation(tmp_path):
    data = _random_sim3_data(3, seed=3)
    with pytest.raises(ValueError, match="3 stamps but 2 poses"):
        write_tum(tmp_path / "a.txt", [0, 1, 2], data[:2])
    bad = data.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        write_tum(tmp_path / "a.txt", [0, 1, 2], bad)
    with pytest.raises(ValueError, match=r"\[T,8\]"):
        write_tum(tmp_path / "a.txt", [0, 1, 2], data[:, :7])
    with pytest.raises(ValueError, match="negative"):
        write_tum(tmp_path / "a.txt", [-1, 1, 2], data)
    with pytest.raises(ValueError, match="integer"):
        write_tum(tmp_path / "a.txt", [0.5, 1, 2], data)
    assert not (tmp_path / "a.txt").exists() and _no_temp_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_tum(tmp_path / "missing.txt")


def test_tum_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "traj.txt"
    write_tum(path, [1, 2], _random_sim3_data(2, seed=4))
    before = path.read_bytes()

    def failing_fsync(fd):  # data is in the temp file, the disk "fails" before the rename
        raise OSError("simulated disk failure")

    monkeypatch.setattr(export.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        write_tum(path, [5, 6, 7], _random_sim3_data(3, seed=5))
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------------------ PLY
def test_ply_round_trip_binary_little_endian(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(500, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(500, 3), dtype=np.uint8)
    res = write_ply(tmp_path / "map.ply", torch.from_numpy(xyz), rgb)
    assert res.n_written == 500 and res.n_dropped_nonfinite == 0
    assert (tmp_path / "map.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    v = PlyData.read(str(tmp_path / "map.ply"))["vertex"].data
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), xyz)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), rgb)


def test_ply_drops_nonfinite_and_reports(tmp_path, caplog):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(100, 3))
    rgb = rng.integers(0, 256, size=(100, 3), dtype=np.uint8)
    xyz[[3, 50], 1] = np.nan
    xyz[70, 2] = np.inf
    with caplog.at_level(logging.WARNING, logger="mast3r_slam_ros.io.export"):
        res = write_ply(tmp_path / "m.ply", xyz, rgb)
    assert (res.n_written, res.n_dropped_nonfinite, res.n_input) == (97, 3, 100)
    assert "dropped 3 of 100" in caplog.text
    keep = np.ones(100, bool)
    keep[[3, 50, 70]] = False
    v = PlyData.read(str(tmp_path / "m.ply"))["vertex"].data
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), xyz[keep].astype(np.float32))
    np.testing.assert_array_equal(v["red"], rgb[keep, 0])


def test_ply_without_colour(tmp_path):
    xyz = np.arange(30, dtype=np.float64).reshape(10, 3)
    write_ply(tmp_path / "g.ply", xyz)
    v = PlyData.read(str(tmp_path / "g.ply"))["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z"]
    np.testing.assert_array_equal(v.data["z"], xyz[:, 2].astype(np.float32))


def test_voxel_downsample_against_bruteforce():
    rng = np.random.default_rng(2)
    xyz = rng.uniform(-1, 1, size=(2000, 3))
    rgb = rng.integers(0, 256, size=(2000, 3), dtype=np.uint8)
    vs = 0.25
    out_xyz, out_rgb = voxel_downsample(xyz, rgb, vs)
    # brute force: dictionary of voxel -> members
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(xyz):
        groups.setdefault(tuple(int(np.floor(c / vs)) for c in p), []).append(i)
    assert len(out_xyz) == len(groups)
    ref = {k: (xyz[idx].mean(0), np.rint(rgb[idx].astype(float).mean(0))) for k, idx in groups.items()}
    for p, c in zip(out_xyz, out_rgb):
        key = tuple(int(np.floor(v / vs)) for v in p.astype(np.float64))
        np.testing.assert_allclose(p, ref[key][0], atol=1e-6)
        np.testing.assert_array_equal(c, ref[key][1])
    # voxel_size 0 leaves the cloud unchanged
    same_xyz, same_rgb = voxel_downsample(xyz, rgb, 0.0)
    np.testing.assert_array_equal(same_rgb, rgb)
    np.testing.assert_array_equal(same_xyz, xyz.astype(np.float32))


def test_ply_voxel_option_and_validation(tmp_path):
    xyz = np.array([[0.01, 0.01, 0.01], [0.02, 0.02, 0.02], [1.5, 1.5, 1.5]])
    rgb = np.array([[10, 20, 30], [30, 40, 50], [1, 2, 3]], dtype=np.uint8)
    res = write_ply(tmp_path / "v.ply", xyz, rgb, voxel_size=1.0)
    assert res.n_written == 2
    v = PlyData.read(str(tmp_path / "v.ply"))["vertex"].data
    np.testing.assert_allclose(v["x"], [0.015, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(v["red"], [20, 1])
    with pytest.raises(ValueError, match=r"\[N,3\]"):
        write_ply(tmp_path / "x.ply", xyz[:, :2])
    with pytest.raises(ValueError, match="3 points but 2 colours"):
        write_ply(tmp_path / "x.ply", xyz, rgb[:2])
    with pytest.raises(TypeError, match="uint8"):
        write_ply(tmp_path / "x.ply", xyz, rgb.astype(np.float32))
    with pytest.raises(ValueError, match="voxel_size"):
        write_ply(tmp_path / "x.ply", xyz, rgb, voxel_size=-1.0)
    assert not (tmp_path / "x.ply").exists() and _no_temp_files(tmp_path)


def test_ply_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "map.ply"
    rng = np.random.default_rng(3)
    write_ply(path, rng.normal(size=(50, 3)), rng.integers(0, 256, (50, 3), dtype=np.uint8))
    before = path.read_bytes()
    real_write = PlyData.write

    def crash_midway(self, stream):  # write part of the file, then fail
        real_write(self, stream)
        stream.seek(len(before) // 3)
        stream.truncate()
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(PlyData, "write", crash_midway)
    with pytest.raises(OSError, match="mid-write"):
        write_ply(path, rng.normal(size=(80, 3)), rng.integers(0, 256, (80, 3), dtype=np.uint8))
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)
    assert PlyData.read(str(path))["vertex"].count == 50


def test_atomic_write_keeps_old_file_on_exception_in_body(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with export.atomic_write(path, "w") as fh:
            fh.write("new partial")
            raise RuntimeError("boom")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert _no_temp_files(tmp_path)
    with export.atomic_write(tmp_path / "sub" / "g.bin") as fh:  # folder created
        fh.write(b"\x00\x01")
    assert (tmp_path / "sub" / "g.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with export.atomic_write(path, "a"):
            pass


# ------------------------------------------------------------------------------------------------ keyframe images
def test_save_keyframe_images_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8) for _ in range(3)]
    imgs[1] = torch.from_numpy(imgs[1])  # tensors are accepted too
    paths = save_keyframe_images(tmp_path / "kf", imgs, frame_ids=[0, 7, 12], stamps_ns=[10, 20, 30])
    assert [p.name for p in paths] == ["kf_000000.png", "kf_000007.png", "kf_000012.png"]
    for p, ref in zip(paths, imgs):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), np.asarray(ref))
    index = (tmp_path / "kf" / "keyframes.txt").read_text(encoding="utf-8").splitlines()
    assert index[1:] == ["0 10 kf_000000.png", "7 20 kf_000007.png", "12 30 kf_000012.png"]
    assert _no_temp_files(tmp_path / "kf")
    with pytest.raises(TypeError, match="uint8"):
        save_keyframe_images(tmp_path / "kf2", [np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="frame ids"):
        save_keyframe_images(tmp_path / "kf2", imgs, frame_ids=[1, 2])
    with pytest.raises(ValueError, match="duplicate"):
        save_keyframe_images(tmp_path / "kf2", imgs, frame_ids=[1, 1, 2])


def test_empty_map_and_trajectory_are_valid_files(tmp_path):
    """A run that produced nothing still writes readable (empty) files instead of failing."""
    res = write_ply(tmp_path / "e.ply", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), voxel_size=0.1)
    assert res.n_written == 0 and PlyData.read(str(tmp_path / "e.ply"))["vertex"].count == 0
    write_tum(tmp_path / "e.txt", [], [])
    st, p7 = read_tum(tmp_path / "e.txt")
    assert st.shape == (0,) and p7.shape == (0, 7)
