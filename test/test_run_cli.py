"""``mast3r-slam-ros run``: the offline main job on a real image sequence (ViSP ``cube``, fetched from Debian's
``visp-images-data`` at test time) with a small random checkpoint, plus its error handling.

The random tiny network's outputs are meaningless, so only the plumbing is checked here (every frame gets a pose, all
outputs are written and consistent with each other); accuracy is tested with the oracle in ``test_system.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mast3r_slam_ros import cli
from mast3r_slam_ros.io.export import read_tum


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small tensors: one intra-op thread is faster than oversubscribing the shared CPU cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    assert cli.main(["make-test-checkpoint", "--out", str(out), "--size", "tiny"]) == 0
    return out


@pytest.fixture(scope="module")
def cube_folder(tmp_path_factory) -> Path:
    """The first 6 frames of ViSP ``cube`` (real 384x288 grey images, stored as .pgm like upstream)."""
    from mast3r_slam_ros.testing.visp import visp_cube_dir

    src = visp_cube_dir()
    files = sorted(src.glob("image.*.pgm"))[:6]
    assert len(files) == 6
    dst = tmp_path_factory.mktemp("cube")
    for f in files:
        shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """A user config over the defaults: smaller descriptor-refinement window (CPU test budget)."""
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text("matching:\n  radius: 1\n  dilation_max: 2\n", encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return cli.main(["run", *args])


BASE = ("--device", "cpu", "--kernel-backend", "torch", "--img-size", "224", "--no-progress")


def test_run_on_visp_cube_writes_all_outputs(cube_folder, checkpoint, small_config, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(str(cube_folder), "--checkpoint", str(checkpoint), "--out", str(out), "--max-frames", "4",
                 "--config", str(small_config), *BASE)
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["frames"] == 4 and summary["kernel_backend"] == "torch" and summary["device"] == "cpu"
    assert summary["keyframes"] >= 1 and summary["final_state"] in ("TRACKING", "RELOC")
    t_all, p_all = read_tum(out / "trajectory.txt")
    t_kf, p_kf = read_tum(out / "keyframes.txt")
    assert len(t_all) == 4 and len(t_kf) == summary["keyframes"]
    assert np.all(np.diff(t_all) > 0) and np.all(np.isfinite(p_all))
    assert set(np.round(t_kf, 6)) <= set(np.round(t_all, 6))  # keyframes are frames of the run
    # folder source: stamps are frame index / 30 Hz
    np.testing.assert_allclose(t_all, np.arange(4) / 30.0, atol=1e-6)
    from plyfile import PlyData

    ply = PlyData.read(str(out / "map.ply"))
    assert ply["vertex"].count == summary["map_points"]
    assert {"x", "y", "z", "red", "green", "blue"} <= set(ply["vertex"].data.dtype.names)
    assert len(list((out / "keyframes").glob("kf_*.png"))) == summary["keyframes"]


def test_missing_checkpoint_is_a_clear_error(cube_folder, tmp_path, capsys):
    rc = run_cli(str(cube_folder), "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"), *BASE)
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint not found" in err and "nope.pth" in err


def test_empty_folder_is_a_clear_error(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = run_cli(str(empty), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), *BASE)
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "no image" in err
    rc = run_cli(str(tmp_path / "missing"), "--checkpoint", str(checkpoint), *BASE)
    assert rc == 2 and "source not found" in capsys.readouterr().err


def test_corrupt_image_is_named_or_skipped(cube_folder, checkpoint, small_config, tmp_path, capsys):
    folder = tmp_path / "cube_bad"
    shutil.copytree(cube_folder, folder)
    bad = sorted(folder.glob("image.*.pgm"))[0]
    bad.write_bytes(b"P5\n384 288\n255\nthis is not image data")
    rc = run_cli(str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o1"), "--max-frames", "2",
                 "--config", str(small_config), *BASE)
    err = capsys.readouterr().err
    assert rc == 2 and bad.name in err and "--skip-corrupt" in err
    out = tmp_path / "o2"
    rc = run_cli(str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--max-frames", "1",
                 "--skip-corrupt", "--config", str(small_config), *BASE)
    assert rc == 0
    t_all, _ = read_tum(out / "trajectory.txt")
    np.testing.assert_allclose(t_all, [1 / 30.0], atol=1e-6)  # frame 0 (the corrupt one) was dropped


def test_bad_config_is_a_clear_error(cube_folder, checkpoint, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tracking:\n  no_such_key: 1\n", encoding="utf-8")
    rc = run_cli(str(cube_folder), "--checkpoint", str(checkpoint), "--config", str(cfg), *BASE)
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_key" in err


def test_bad_calibration_file(cube_folder, checkpoint, tmp_path, capsys):
    calib = tmp_path / "intrinsics.yaml"
    calib.write_text("width: 384\nheight: 288\ncalibration: [600.0, 600.0]\n", encoding="utf-8")
    rc = run_cli(str(cube_folder), "--checkpoint", str(checkpoint), "--calib", str(calib), *BASE)
    assert rc == 2 and "calibration" in capsys.readouterr().err
