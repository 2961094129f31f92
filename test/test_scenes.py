"""Synthetic room renderer: exact depth against closed forms, photometric consistency of images + depth + poses,
texture rules and the suite's trajectory properties (spec test_data.md §2)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from mast3r_slam_ros.testing.scenes import (
    ROOM_MAX,
    build_room,
    intrinsics_for,
    look_at,
    render_poses,
    render_sequence,
    sequence_poses,
)


def _rot_angle(R: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)))


def test_depth_matches_closed_form_fronto_parallel_wall_and_floor():
    # camera at height 1.3 looking north (+y) at the wall y = 2 from y = -1.5, beside the table
    size = (96, 64)
    K = intrinsics_for(size)
    T = look_at(np.array([1.5, -1.5, 1.3]), np.array([0.0, 1.0, 0.0]))
    seq = render_poses(T[None], size=size, K=K)
    depth, face = seq.depths[0].astype(np.float64), seq.faces[0]
    north = face == 3  # room face +y
    assert north.mean() > 0.3
    np.testing.assert_allclose(depth[north], 2.0 + 1.5, rtol=1e-6)
    # floor: a pixel ray with camera y-component yc (down) hits z = 0 at depth 1.3 / yc
    floor = face == 4
    assert floor.any()
    rows = np.nonzero(floor)[0]
    yc = (rows - K[1, 2]) / K[1, 1]
    np.testing.assert_allclose(depth[floor], 1.3 / yc, rtol=1e-6)
    # ceiling pixels: z = 2.6 reached at depth 1.3 / (-yc)
    ceil = face == 5
    rows = np.nonzero(ceil)[0]
    np.testing.assert_allclose(depth[ceil], (ROOM_MAX[2] - 1.3) / (-(rows - K[1, 2]) / K[1, 1]), rtol=1e-6)


def test_depth_of_table_top_seen_from_above():
    # camera 1 m above the table top (z = 0.75), looking down with a small tilt so "up" is defined
    size = (64, 64)
    T = look_at(np.array([0.4, 0.0, 1.75]), np.array([0.0, 1e-3, -1.0]))
    seq = render_poses(T[None], size=size)
    face = seq.faces[0]
    table_top = face == 6 * 1 + 5  # box 1 (table), +z face
    assert table_top.mean() > 0.2
    # optical axis is (almost) vertical: z-depth of the horizontal plane is 1.0 up to the tiny tilt
    np.testing.assert_allclose(seq.depths[0][table_top], 1.0, rtol=2e-3)


def test_photometric_consistency_with_gt_pose_and_depth():
    """Warp frame j into frame i with GT depth + poses: small residual; a 4 cm pose error makes it clearly larger."""
    seq = render_sequence("loop", n_frames=40, size=(128, 96))
    i, j = 0, 2
    K = seq.K

    def residual(T_j: np.ndarray) -> float:
        Pw = seq.world_points(i).reshape(-1, 3)
        Tinv = np.linalg.inv(T_j)
        Xc = Pw @ Tinv[:3, :3].T + Tinv[:3, 3]
        u = K[0, 0] * Xc[:, 0] / Xc[:, 2] + K[0, 2]
        v = K[1, 1] * Xc[:, 1] / Xc[:, 2] + K[1, 2]
        H, W = seq.depths.shape[1:]
        ok = (u > 1) & (u < W - 2) & (v > 1) & (v < H - 2)
        # occlusion test with the true pose only (same mask for the perturbed pose)
        ui, vi = np.clip(np.rint(u), 0, W - 1).astype(int), np.clip(np.rint(v), 0, H - 1).astype(int)
        ok &= np.abs(seq.depths[j][vi, ui] - Xc[:, 2]) < 0.02 * Xc[:, 2]
        mapx = u.reshape(H, W).astype(np.float32)
        mapy = v.reshape(H, W).astype(np.float32)
        warped = cv2.remap(seq.images[j], mapx, mapy, cv2.INTER_LINEAR).reshape(-1, 3).astype(np.float64)
        ref = seq.images[i].reshape(-1, 3).astype(np.float64)
        return float(np.median(np.abs(warped[ok] - ref[ok])))

    good = residual(seq.T_WC_gt[j])
    T_bad = seq.T_WC_gt[j].copy()
    T_bad[:3, 3] += np.array([0.04, 0.0, 0.0])
    bad = residual(T_bad)
    assert good < 4.0, good
    assert bad > 3.0 * good, (good, bad)


def test_textures_are_distinct_crops_and_textured():
    room = build_room(128.0, 0)
    src = [s for s, p in zip(room.tile_source, room.tile_plain) if not p]
    assert len(src) == len(set(src)), "a photo crop is used twice"
    assert len(src) >= 40
    # every textured tile of the atlas has texture: mean gradient magnitude well above the plain tiles'
    grads = []
    for r, plain in zip(room.tile_rect, room.tile_plain):
        x0, y0, w, h = (int(v) for v in r)
        g = cv2.cvtColor(room.atlas[y0:y0 + h, x0:x0 + w], cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) / 8.0
        grads.append((plain, float(mag.mean())))
    assert all(m < 1e-6 for p, m in grads if p)
    assert min(m for p, m in grads if not p) > 1.0


def test_suite_trajectories_match_the_spec_table():
    lengths = {}
    for name in ("slow_translation", "rotation_heavy", "loop", "textureless"):
        T = sequence_poses(name)
        c = T[:, :3, 3]
        lengths[name] = float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum())
        rot = sum(_rot_angle(T[k, :3, :3].T @ T[k + 1, :3, :3]) for k in range(len(T) - 1))
        lengths[name + "_rot"] = rot
        # rotations are proper, OpenCV camera y axis points down (roll stays small)
        dets = np.linalg.det(T[:, :3, :3])
        np.testing.assert_allclose(dets, 1.0, atol=1e-9)
        assert np.all(T[:, 2, 1] < 0)  # camera y (down) has a negative world-z component
    assert abs(lengths["slow_translation"] - 2.63) < 0.15
    assert abs(lengths["rotation_heavy"] - 0.63) < 0.05 and lengths["rotation_heavy_rot"] > 360
    assert abs(lengths["loop"] - 9.84) < 0.4 and lengths["loop_rot"] > 390
    assert abs(lengths["textureless"] - 3.2) < 0.05
    # loop: frames 240..269 revisit frames 0..29 (5.3 cm higher, within 2 deg), frames in between are far away
    T = sequence_poses("loop")
    for k in range(30):
        assert np.linalg.norm(T[240 + k, :3, 3] - T[k, :3, 3]) < 0.06
        assert _rot_angle(T[240 + k, :3, :3].T @ T[k, :3, :3]) < 2.0
    assert np.linalg.norm(T[120, :3, 3] - T[0, :3, 3]) > 3.0
    # static: every pose identical
    T = sequence_poses("static", 5)
    assert np.allclose(T, T[0])


def test_textureless_sequence_middle_frames_see_only_paint():
    seq = render_sequence("textureless", n_frames=15, size=(64, 64))
    flat = []
    for img in seq.images:
        g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) / 8.0
        flat.append(float(np.mean(mag < 1.0)))
    flat = np.array(flat)
    assert np.all(flat[6:9] > 0.99), flat  # the middle frames: only plain paint
    assert flat[0] < 0.9 and flat[-1] < 0.9, flat  # the ends see textured tiles


def test_render_is_deterministic_and_sized():
    a = render_sequence("rotation_heavy", n_frames=3, size=(48, 32), seed=3)
    b = render_sequence("rotation_heavy", n_frames=3, size=(48, 32), seed=3)
    assert a.images.shape == (3, 32, 48, 3) and a.images.dtype == np.uint8
    assert a.depths.shape == (3, 32, 48) and a.depths.dtype == np.float32
    assert a.T_WC_gt.shape == (3, 4, 4) and a.stamps_ns.dtype == np.int64
    assert np.array_equal(a.images, b.images)
    assert np.all(np.abs(np.diff(a.stamps_ns) - 1e9 / 30) <= 1)
    assert np.all(a.depths > 0) and np.all(np.isfinite(a.depths))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown synthetic sequence"):
        render_sequence("nope")
    with pytest.raises(ValueError, match="outside the room"):
        render_poses(look_at(np.array([9.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]))[None], size=(16, 16))
    with pytest.raises(ValueError, match="inside the box 'table'"):
        render_poses(look_at(np.array([0.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.0]))[None], size=(16, 16))
    with pytest.raises(ValueError, match="n_frames"):
        sequence_poses("loop", 0)


def test_sensor_like_variants_stay_close_to_the_clean_render():
    clean = render_sequence("loop", n_frames=2, size=(64, 64))
    jpg = render_sequence("loop", n_frames=2, size=(64, 64), jpeg_quality=70)
    noisy = render_sequence("loop", n_frames=2, size=(64, 64), image_noise=3.0)
    d_jpg = np.abs(jpg.images.astype(float) - clean.images).mean()
    d_noise = np.abs(noisy.images.astype(float) - clean.images)
    assert 0.2 < d_jpg < 8.0
    assert abs(d_noise.mean() - 3.0 * math.sqrt(2 / math.pi)) < 0.3  # E|N(0, 3)| (little clipping)
    np.testing.assert_array_equal(jpg.depths, clean.depths)
