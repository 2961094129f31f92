"""Message conversions (NumPy only) against independent references: hand-built messages, struct packing, scipy."""

from __future__ import annotations

import ros_testlib  # noqa: F401,I001  (ROS_PYTHON_CHECK_FIELDS=1 before the message modules load)

import struct

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, PointField
from std_msgs.msg import Header

from mast3r_slam_ros.ros import conversions as conv

pytestmark = pytest.mark.ros
RNG = np.random.default_rng(0)


def _msg(h, w, enc, step, data):
    m = Image(height=h, width=w, encoding=enc, step=step)
    m.data = bytes(data)
    return m


@pytest.mark.parametrize("enc,order,ch", [("rgb8", [0, 1, 2], 3), ("bgr8", [2, 1, 0], 3), ("rgba8", [0, 1, 2], 4),
                                          ("bgra8", [2, 1, 0], 4)])
def test_color_encodings_with_row_padding(enc, order, ch):
    h, w, pad = 5, 7, 3
    stored = RNG.integers(0, 256, (h, w, ch), dtype=np.uint8)       # channels as stored in the message
    rows = np.zeros((h, w * ch + pad), np.uint8)
    rows[:, : w * ch] = stored.reshape(h, -1)
    rows[:, w * ch:] = 77                                             # padding must be ignored
    out = conv.image_to_rgb(_msg(h, w, enc, w * ch + pad, rows.tobytes()))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, stored[:, :, order])


def test_mono8_replicated():
    g = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    out = conv.image_to_rgb(_msg(4, 6, "mono8", 8, np.pad(g, ((0, 0), (0, 2))).tobytes()))
    np.testing.assert_array_equal(out, np.stack([g, g, g], axis=2))


@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_rgb_to_image_round_trip_and_layout(enc):
    rgb = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    m = conv.rgb_to_image(rgb, enc, Header(stamp=Time(sec=3, nanosec=4), frame_id="f"))
    assert (m.encoding, m.height, m.width, m.step) == (enc, 3, 4, 4 * len(enc.replace("8", "")))
    assert m.header.frame_id == "f" and m.header.stamp.nanosec == 4
    first = bytes(m.data[: m.step // 4])
    expected = {"rgb8": rgb[0, 0], "bgr8": rgb[0, 0, ::-1], "rgba8": [*rgb[0, 0], 255],
                "bgra8": [*rgb[0, 0, ::-1], 255]}[enc]
    assert list(first) == [int(x) for x in expected]
    np.testing.assert_array_equal(conv.image_to_rgb(m), rgb)


@pytest.mark.parametrize("enc", ["mono16", "16UC1", "rgb16", "32FC1", "bgra16"])
def test_wide_encodings_rejected(enc):
    with pytest.raises(conv.ImageConversionError, match="more than 8 bits"):
        conv.image_to_rgb(_msg(2, 2, enc, 4, bytes(8)))


@pytest.mark.parametrize("h,w,enc,step,n,match", [
    (0, 4, "rgb8", 12, 0, "zero size"), (4, 0, "rgb8", 0, 0, "zero size"),
    (2, 2, "rgb8", 6, 11, "expected step"), (2, 2, "rgb8", 6, 13, "expected step"),
    (2, 2, "rgb8", 5, 10, "smaller than"), (2, 2, "yuv422", 4, 8, "unsupported encoding"),
])
def test_malformed_rejected(h, w, enc, step, n, match):
    with pytest.raises(conv.ImageConversionError, match=match):
        conv.image_to_rgb(_msg(h, w, enc, step, bytes(n)))


def test_compressed_png_exact_jpeg_close_and_errors():
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[:, :20] = (10, 200, 60)
    rgb[8:24, 25:35] = (250, 20, 5)
    np.testing.assert_array_equal(conv.compressed_to_rgb(conv.rgb_to_compressed(rgb, "png")), rgb)
    jpg = conv.compressed_to_rgb(conv.rgb_to_compressed(rgb, "jpeg", quality=95))
    assert jpg.shape == rgb.shape and np.abs(jpg.astype(int) - rgb).mean() < 8     # lossy, but RGB order kept:
    np.testing.assert_allclose(jpg[4:28, 2:16].reshape(-1, 3).mean(0), [10, 200, 60], atol=4)
    with pytest.raises(conv.ImageConversionError, match="no data"):
        conv.compressed_to_rgb(CompressedImage(format="jpeg"))
    bad = CompressedImage(format="jpeg")
    bad.data = bytes(range(50))
    with pytest.raises(conv.ImageConversionError, match="cannot decode"):
        conv.compressed_to_rgb(bad)
    import cv2

    ok, png16 = cv2.imencode(".png", np.full((4, 4), 1000, np.uint16))
    m16 = CompressedImage(format="png")
    m16.data = png16.tobytes()
    with pytest.raises(conv.ImageConversionError, match="8 bits"):
        conv.compressed_to_rgb(m16)


def test_pointcloud2_layout_matches_pcl_convention():
    xyz = np.array([[1.0, -2.0, 3.5], [0.25, 0.5, -0.75]])
    rgb = np.array([[255, 0, 128], [1, 2, 3]], np.uint8)
    m = conv.xyzrgb_to_cloud(xyz, rgb, Time(sec=7), "map")
    assert (m.height, m.width, m.point_step, m.row_step, m.is_bigendian, m.is_dense) == (1, 2, 16, 32, False, True)
    assert [(f.name, f.offset, f.datatype, f.count) for f in m.fields] == [
        ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1),
        ("rgb", 12, PointField.FLOAT32, 1)]
    expected = struct.pack("<fffI", 1.0, -2.0, 3.5, 0x00FF0080) + struct.pack("<fffI", 0.25, 0.5, -0.75, 0x00010203)
    assert bytes(m.data) == expected
    back_xyz, back_rgb = conv.cloud_to_xyzrgb(m)
    np.testing.assert_array_equal(back_xyz, xyz.astype(np.float32))
    np.testing.assert_array_equal(back_rgb, rgb)
    with pytest.raises(ValueError):
        conv.xyzrgb_to_cloud(xyz, rgb[:1], Time(), "map")


def test_sim3_to_rigid_and_composition_vs_scipy():
    q = Rotation.from_rotvec([0.3, -0.2, 0.9]).as_quat()
    data = np.array([1.0, 2.0, 3.0, *(2.0 * q), 1.7])     # unnormalised quaternion, scale 1.7 (dropped)
    t, qq = conv.sim3_to_rt(data)
    np.testing.assert_allclose(t, [1, 2, 3])
    assert (Rotation.from_quat(qq) * Rotation.from_quat(q).inv()).magnitude() < 1e-12
    import torch

    from mast3r_slam_ros.lie import Sim3

    t2, q2 = conv.sim3_to_rt(Sim3(torch.tensor(data[None], dtype=torch.float64)))
    np.testing.assert_allclose(t2, t)
    a = (np.array([0.1, 0.2, 0.3]), Rotation.from_rotvec([0.1, 0.5, -0.3]).as_quat())
    b = (np.array([-1.0, 0.5, 2.0]), Rotation.from_rotvec([-0.7, 0.2, 0.4]).as_quat())
    tc, qc = conv.compose(a, b)
    ra, rb = Rotation.from_quat(a[1]), Rotation.from_quat(b[1])
    np.testing.assert_allclose(tc, ra.apply(b[0]) + a[0], atol=1e-12)
    assert (Rotation.from_quat(qc) * (ra * rb).inv()).magnitude() < 1e-9
    ti, qi = conv.invert(a)
    np.testing.assert_allclose(ti, -ra.inv().apply(a[0]), atol=1e-12)
    assert (Rotation.from_quat(qi) * ra).magnitude() < 1e-9
    # REP-103 map axes: the optical z axis (forward) becomes map x, optical x (right) becomes map -y
    _, q_map = conv.map_from_world("rep103")
    np.testing.assert_allclose(Rotation.from_quat(q_map).apply([[0, 0, 1], [1, 0, 0], [0, 1, 0]]),
                               [[1, 0, 0], [0, -1, 0], [0, 0, -1]], atol=1e-12)
    with pytest.raises(ValueError):
        conv.map_from_world("enu")
    with pytest.raises(ValueError):
        conv.sim3_to_rt(np.zeros(7))


def test_messages_stamps_frames_and_frusta():
    rt_ = (np.array([1.0, 2.0, 3.0]), Rotation.from_rotvec([0, 0, np.pi / 2]).as_quat())
    st = conv.ns_to_stamp(1_234_567_890_123)
    assert (st.sec, st.nanosec) == (1234, 567_890_123) and conv.stamp_to_ns(st) == 1_234_567_890_123
    o = conv.odometry_msg(rt_, st, "map", "cam")
    assert (o.header.frame_id, o.child_frame_id, o.pose.pose.position.z) == ("map", "cam", 3.0)
    tf = conv.transform_msg(rt_, st, "map", "cam")
    assert tf.transform.rotation.w == pytest.approx(np.cos(np.pi / 4))
    p = conv.path_msg([(5, rt_), (9, rt_)], st, "map")
    assert [conv.stamp_to_ns(x.header.stamp) for x in p.poses] == [5, 9] and p.header.frame_id == "map"
    ma = conv.frusta_markers([rt_], st, "map", size=0.2, aspect=2.0)
    assert ma.markers[0].action == ma.markers[0].DELETEALL
    pts = np.array([[q.x, q.y, q.z] for q in ma.markers[1].points])
    assert len(pts) == 16
    np.testing.assert_allclose(pts[0], rt_[0])                           # apex at the camera centre
    corner = Rotation.from_quat(rt_[1]).apply([-0.2, -0.1, 0.2]) + rt_[0]  # top-left corner at depth 0.2
    np.testing.assert_allclose(pts[1], corner, atol=1e-12)
    with pytest.raises(ValueError):
        conv.ns_to_stamp(-1)
