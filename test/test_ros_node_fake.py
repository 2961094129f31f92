"""The node in-process with a fake SLAM system: topics, stamps, TF, frames, map cloud, services, drops, malformed input.

The fake (``ros_testlib.FakeSlamSystem``) has known poses, so every published pose is checked against an independent
reference computed here with scipy's rotations (not with the node's own conversion code).
"""

from __future__ import annotations

import ros_testlib as rt  # noqa: I001  (sets the ROS environment before any message import)

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from scipy.spatial.transform import Rotation

from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointField
from std_msgs.msg import Header

from mast3r_slam_ros.ros import conversions as conv
from mast3r_slam_ros.ros.node import SlamNode, make_executor

pytestmark = pytest.mark.ros

R_MAP_OPT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # REP-103 <- optical axes


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


class Harness:
    def __init__(self, fake=None, executor="single_threaded", params=None, compressed_pub=False):
        self.fake = fake if fake is not None else rt.FakeSlamSystem()
        self.factory_calls = []

        def factory(pred, cfg, K):
            self.factory_calls.append(K)
            return self.fake

        over = [Parameter(k, value=v) for k, v in {"image_qos": "reliable", "image_queue_size": 100,
                                                    "frame_policy": "all", "map_publish_period": 0.1,
                                                    "diagnostics_period": 0.1, **(params or {})}.items()]
        self.node = SlamNode(predictor=object(), system_factory=factory, config_factory=lambda p: None,
                             parameter_overrides=over)
        self.col = rt.Collector()
        self.tester = rclpy.create_node("tester")
        qos = rt.image_qos_for_test()
        self.pub = self.tester.create_publisher(Image, "image", qos)
        self.pub_c = self.tester.create_publisher(CompressedImage, "image/compressed", qos)
        self.pub_info = self.tester.create_publisher(CameraInfo, "camera_info", qos)
        self.ex = make_executor(executor)
        for n in (self.node, self.col, self.tester):
            self.ex.add_node(n)
        rt.wait_for_subscribers(self.ex, self.pub)
        rt.spin_until(self.ex, lambda: self.node.pub_odom.get_subscription_count() > 0
                      and self.node.pub_map.get_subscription_count() > 0, rt.DISCOVERY_TIMEOUT)

    def send(self, images, stamps_ns, frame_id="cam_opt", encoding="rgb8"):
        for img, s in zip(images, stamps_ns):
            hdr = Header(stamp=conv.ns_to_stamp(s), frame_id=frame_id)
            self.pub.publish(conv.rgb_to_image(img, encoding, hdr))

    def spin_until(self, pred, timeout=20.0):
        return rt.spin_until(self.ex, pred, timeout)

    def close(self):
        self.ex.shutdown(timeout_sec=1.0)
        for n in (self.node, self.col, self.tester):
            n.destroy_node()


def _tf_dict(rx, child):
    out = {}
    for m in rx.tf:
        for t in m.transforms:
            if t.child_frame_id == child:
                out[conv.stamp_to_ns(t.header.stamp)] = t
    return out


def _expected_map_cam(d):
    """Independent reference: pose of the camera optical frame in the REP-103 map for fake pose data ``d``."""
    R_wc = Rotation.from_quat(d[3:7]).as_matrix()
    return R_MAP_OPT @ d[:3], Rotation.from_matrix(R_MAP_OPT @ R_wc)


def _assert_pose(t_msg, q_msg, d):
    t_exp, r_exp = _expected_map_cam(d)
    np.testing.assert_allclose(t_msg, t_exp, atol=1e-9)
    ang = (Rotation.from_quat(q_msg) * r_exp.inv()).magnitude()
    assert ang < 1e-6


def test_outputs_stamped_with_input_and_match_system_poses():
    h = Harness()
    try:
        n = 7
        stamps = [1_700_000_000_000_000_000 + i * 33_333_333 for i in range(n)]
        h.send(rt.image_stream(n), stamps)
        assert h.spin_until(lambda: len(h.col.rx.odometry) >= n and len(h.col.rx.pose) >= n
                            and h.col.rx.path and len(h.col.rx.path[-1].poses) == n and h.col.rx.map
                            and len(_tf_dict(h.col.rx, "cam_opt")) == n)
        rx = h.col.rx
        assert [conv.stamp_to_ns(m.header.stamp) for m in rx.odometry] == stamps
        assert [conv.stamp_to_ns(m.header.stamp) for m in rx.pose] == stamps
        assert all(m.header.frame_id == "map" and m.child_frame_id == "cam_opt" for m in rx.odometry)
        # path: one pose per processed frame, each with its frame's stamp
        path = rx.path[-1]
        assert len(path.poses) == h.node.counters["processed"] == n
        assert [conv.stamp_to_ns(p.header.stamp) for p in path.poses] == stamps
        # TF map -> camera optical frame at every input stamp, equal to the system's poses
        tfs = _tf_dict(rx, "cam_opt")
        assert sorted(tfs) == stamps
        for (s, d), pose in zip(h.fake.trajectory(), rx.pose):
            tr = tfs[s].transform
            assert tfs[s].header.frame_id == "map"
            _assert_pose([tr.translation.x, tr.translation.y, tr.translation.z],
                         [tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w], d)
            p = pose.pose
            _assert_pose([p.position.x, p.position.y, p.position.z],
                         [p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w], d)
        # map cloud: declared fields, map frame, finite points = system points rotated into the map axes
        cloud = rx.map[-1]
        assert cloud.header.frame_id == "map"
        assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
            ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1),
            ("rgb", 12, PointField.FLOAT32, 1)]
        assert cloud.point_step == 16 and cloud.height == 1
        xyz_w, rgb = h.fake.map_points()
        raw = np.frombuffer(cloud.data, dtype=np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("c", "<u4")]))
        xyz = np.stack([raw["x"], raw["y"], raw["z"]], 1)
        assert np.isfinite(xyz).all() and len(xyz) == len(xyz_w) > 0
        np.testing.assert_allclose(xyz, xyz_w.astype(np.float64) @ R_MAP_OPT.T, atol=1e-5)
        np.testing.assert_array_equal(raw["c"], (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32)
                                                                                      << 8) | rgb[:, 2])
        assert conv.stamp_to_ns(cloud.header.stamp) == stamps[-1]
        # keyframes: one pose per keyframe
        assert h.spin_until(lambda: h.col.rx.keyframes and len(h.col.rx.keyframes[-1].poses) == len(h.fake.kf))
        # the images given to the system are the published ones
        for a, b in zip(h.fake.images, rt.image_stream(n)):
            np.testing.assert_array_equal(a, b)
    finally:
        h.close()


def test_path_republished_when_backend_moves_keyframes():
    h = Harness(fake=rt.FakeSlamSystem(move_on_backend=True), params={"backend_period": 0.02})
    try:
        stamps = [10_000_000_000 + i * 50_000_000 for i in range(4)]
        h.send(rt.image_stream(4), stamps)
        assert h.spin_until(lambda: h.node.counters["processed"] == 4 and h.fake.offset[2] >= 0.5
                            and h.col.rx.path and len(h.col.rx.path[-1].poses) == 4)
        # map x = optical z, which the backend moved by +0.5 per move (one or two moves, depending on timing)
        assert h.spin_until(lambda: abs(h.col.rx.path[-1].poses[0].pose.position.x - h.fake.offset[2]) < 1e-9)
        last = h.col.rx.path[-1]
        for (s, d), ps in zip(h.fake.trajectory(), last.poses):
            assert conv.stamp_to_ns(ps.header.stamp) == s
            p = ps.pose
            _assert_pose([p.position.x, p.position.y, p.position.z],
                         [p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w], d)
    finally:
        h.close()


def test_services_reset_save_pause_resume(tmp_path):
    h = Harness(params={"output_dir": str(tmp_path / "out")})
    try:
        h.send(rt.image_stream(3), [1_000, 2_000, 3_000])
        assert h.spin_until(lambda: h.node.counters["processed"] == 3)
        res = rt.call_trigger(h.ex, h.tester, "/mast3r_slam/save_map")
        assert res.success, res.message
        traj = np.loadtxt(tmp_path / "out" / "trajectory.txt", comments="#", ndmin=2)
        np.testing.assert_allclose(traj[:, 0], [1e-6, 2e-6, 3e-6], rtol=1e-9)
        np.testing.assert_allclose(traj[:, 1:], np.stack([d[:7] for _, d in h.fake.trajectory()]), atol=1e-7)
        from plyfile import PlyData

        ply = PlyData.read(str(tmp_path / "out" / "map.ply"))
        assert ply["vertex"].count == len(h.fake.map_points()[0])

        assert rt.call_trigger(h.ex, h.tester, "/mast3r_slam/pause").success
        h.send(rt.image_stream(2, seed=5), [4_000, 5_000])
        assert h.spin_until(lambda: h.node.counters["skipped_paused"] == 2)
        assert h.node.counters["processed"] == 3
        assert rt.call_trigger(h.ex, h.tester, "/mast3r_slam/resume").success

        res = rt.call_trigger(h.ex, h.tester, "/mast3r_slam/reset")
        assert res.success and h.fake.reset_calls == 1
        assert h.spin_until(lambda: h.col.rx.path and len(h.col.rx.path[-1].poses) == 0)
        h.send(rt.image_stream(2, seed=6), [6_000, 7_000])
        assert h.spin_until(lambda: h.col.rx.path and len(h.col.rx.path[-1].poses) == 2)
        assert [conv.stamp_to_ns(p.header.stamp) for p in h.col.rx.path[-1].poses] == [6_000, 7_000]
    finally:
        h.close()


@pytest.mark.parametrize("policy", ["latest", "all"])
def test_frame_policy_drops_reported_on_diagnostics(policy):
    h = Harness(fake=rt.FakeSlamSystem(delay=0.1), params={"frame_policy": policy})
    try:
        n = 12
        h.send(rt.image_stream(n, h=16, w=16), [1_000 + i for i in range(n)])
        c = h.node.counters
        assert h.spin_until(lambda: c["processed"] + c["dropped"] == n and c["received"] == n, 30.0)

        def diag_done():
            return h.col.rx.diagnostics and rt.kv(h.col.rx.diagnostics[-1], "frames_received") == str(n)
        assert h.spin_until(diag_done)
        d = h.col.rx.diagnostics[-1]
        assert int(rt.kv(d, "frames_processed")) + int(rt.kv(d, "frames_dropped")) == n
        if policy == "latest":
            assert int(rt.kv(d, "frames_dropped")) > 0
            assert int(rt.kv(d, "frames_processed")) < n
            # the newest image is always processed
            assert h.fake.frames[-1][0] == 1_000 + n - 1
        else:
            assert rt.kv(d, "frames_dropped") == "0" and rt.kv(d, "frames_processed") == str(n)
        assert rt.kv(d, "frame_policy") == policy
        assert rt.kv(d, "tracking_state") == "TRACKING"
        assert d.status[0].name.startswith("mast3r_slam")
    finally:
        h.close()


def test_malformed_images_are_skipped_and_node_keeps_running():
    h = Harness()
    try:
        good = rt.image_stream(2, h=8, w=8)
        bad16 = Image(header=Header(stamp=Time(sec=1)), height=8, width=8, encoding="16UC1", step=16)
        bad16.data = bytes(128)
        short = conv.rgb_to_image(good[0], "rgb8", Header(stamp=Time(sec=2)))
        short.data = bytes(10)
        zero = Image(header=Header(stamp=Time(sec=3)), height=0, width=0, encoding="rgb8", step=0)
        unknown = conv.rgb_to_image(good[0], "rgb8", Header(stamp=Time(sec=4)))
        unknown.encoding = "yuv422_yuy2"
        for m in (bad16, short, zero, unknown):
            h.pub.publish(m)
        h.send(good, [5_000_000_000, 6_000_000_000])
        assert h.spin_until(lambda: h.node.counters["processed"] == 2 and h.node.counters["malformed"] == 4
                            and len(h.col.rx.odometry) == 2)
        assert [conv.stamp_to_ns(m.header.stamp) for m in h.col.rx.odometry] == [5_000_000_000, 6_000_000_000]
        # non-increasing stamp: rejected by the system, counted, node alive
        h.send(good[:1], [6_000_000_000])
        h.send(good[1:], [7_000_000_000])
        assert h.spin_until(lambda: h.node.counters["processed"] == 3 and h.node.counters["out_of_order"] == 1)
    finally:
        h.close()


@pytest.mark.parametrize("encoding", ["bgr8", "rgba8", "bgra8", "mono8"])
def test_encodings_reach_the_system_as_rgb(encoding):
    h = Harness()
    try:
        img = rt.image_stream(1, h=6, w=10, seed=3)[0]
        if encoding == "mono8":
            img = np.repeat(img[:, :, :1], 3, axis=2)
            msg = conv.rgb_to_image(img[:, :, 0], "mono8", Header(stamp=Time(sec=1)))
        else:
            msg = conv.rgb_to_image(img, encoding, Header(stamp=Time(sec=1)))
        h.pub.publish(msg)
        assert h.spin_until(lambda: h.node.counters["processed"] == 1)
        np.testing.assert_array_equal(h.fake.images[0], img)
    finally:
        h.close()


def test_compressed_input():
    h = Harness(params={"subscribe_compressed": True})
    try:
        rt.wait_for_subscribers(h.ex, h.pub_c)
        img = np.zeros((16, 24, 3), np.uint8)
        img[:, :12] = (200, 30, 10)
        h.pub_c.publish(conv.rgb_to_compressed(img, "png", Header(stamp=Time(sec=3), frame_id="c")))
        assert h.spin_until(lambda: h.node.counters["processed"] == 1 and len(h.col.rx.odometry) == 1)
        np.testing.assert_array_equal(h.fake.images[0], img)   # PNG is lossless
        assert conv.stamp_to_ns(h.col.rx.odometry[0].header.stamp) == 3_000_000_000
    finally:
        h.close()


def test_calibrated_mode_waits_for_camera_info_and_undistorts():
    h = Harness(params={"use_calib": True})
    try:
        assert h.factory_calls == []
        img = rt.image_stream(1, h=20, w=30)[0]
        h.send([img], [1_000])
        assert h.spin_until(lambda: h.node.counters["waiting_for_calib"] == 1)
        K = [50.0, 0.0, 15.0, 0.0, 55.0, 10.0, 0.0, 0.0, 1.0]
        h.pub_info.publish(CameraInfo(height=20, width=30, k=K, distortion_model="plumb_bob",
                                      d=[-0.2, 0.05, 0.0, 0.0, 0.0]))
        assert h.spin_until(lambda: len(h.factory_calls) == 1)
        np.testing.assert_array_equal(h.factory_calls[0], np.array(K).reshape(3, 3))
        h.send([img], [2_000])
        assert h.spin_until(lambda: h.node.counters["processed"] == 1)
        import cv2

        expected = cv2.undistort(img, np.array(K).reshape(3, 3), np.array([-0.2, 0.05, 0.0, 0.0, 0.0]))
        diff = np.abs(h.fake.images[0].astype(int) - expected.astype(int))
        assert np.mean(diff) < 2.0 and not np.array_equal(h.fake.images[0], img)
    finally:
        h.close()


def test_rep105_map_odom_base_with_static_mount():
    mount = [0.1, 0.0, 0.3, -0.5, 0.5, -0.5, 0.5]   # optical frame 10 cm forward, 30 cm up, standard optical axes
    h = Harness(params={"base_frame": "base_link", "odom_frame": "odom", "camera_mount": mount})
    try:
        h.send(rt.image_stream(3), [1_000, 2_000, 3_000])
        assert h.spin_until(lambda: len(h.col.rx.odometry) == 3 and len(_tf_dict(h.col.rx, "base_link")) == 3)
        tf_base = _tf_dict(h.col.rx, "base_link")
        tf_odom = _tf_dict(h.col.rx, "odom")
        assert sorted(tf_base) == sorted(tf_odom) == [1_000, 2_000, 3_000]
        R_bc = Rotation.from_quat(mount[3:])
        for s, d in h.fake.trajectory():
            t_mc, r_mc = _expected_map_cam(d)
            r_mb = r_mc * R_bc.inv()
            t_mb = t_mc - r_mb.apply(mount[:3])
            o = tf_odom[s].transform
            assert tf_odom[s].header.frame_id == "map"
            np.testing.assert_allclose([o.translation.x, o.translation.y, o.translation.z, o.rotation.w],
                                       [0, 0, 0, 1], atol=1e-12)
            b = tf_base[s]
            assert b.header.frame_id == "odom"
            tr = b.transform
            np.testing.assert_allclose([tr.translation.x, tr.translation.y, tr.translation.z], t_mb, atol=1e-9)
            q = [tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w]
            assert (Rotation.from_quat(q) * r_mb.inv()).magnitude() < 1e-6
        assert all(m.child_frame_id == "base_link" and m.header.frame_id == "odom" for m in h.col.rx.odometry)
    finally:
        h.close()


def test_multi_threaded_executor_processes_all_frames():
    h = Harness(fake=rt.FakeSlamSystem(move_on_backend=True), executor="multi_threaded",
                params={"backend_period": 0.01})
    try:
        n = 9
        stamps = [5_000 + 10 * i for i in range(n)]
        h.send(rt.image_stream(n, h=8, w=8), stamps)
        assert h.spin_until(lambda: h.node.counters["processed"] == n and len(_tf_dict(h.col.rx, "cam_opt")) == n)
        assert h.spin_until(lambda: h.col.rx.path and len(h.col.rx.path[-1].poses) == n
                            and [conv.stamp_to_ns(p.header.stamp) for p in h.col.rx.path[-1].poses] == stamps)
        assert sorted(_tf_dict(h.col.rx, "cam_opt")) == stamps
    finally:
        h.close()


def test_invalid_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="frame_policy"):
        SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(), config_factory=lambda p: None,
                 parameter_overrides=[Parameter("frame_policy", value="newest")])
    with pytest.raises(ValueError, match="needs 'base_frame'"):
        SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(), config_factory=lambda p: None,
                 parameter_overrides=[Parameter("odom_frame", value="odom")])
    try:
        import tf2_ros  # noqa: F401
        has_tf2 = True
    except ImportError:
        has_tf2 = False
    if not has_tf2:   # pip-only environments (CI): external odometry needs tf2_ros, said clearly
        with pytest.raises(ValueError, match="needs tf2_ros"):
            SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(),
                     config_factory=lambda p: None,
                     parameter_overrides=[Parameter("odom_frame", value="odom"),
                                          Parameter("base_frame", value="base_link"),
                                          Parameter("publish_odom_tf", value=False)])
    with pytest.raises(ValueError, match="camera_mount"):
        SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(), config_factory=lambda p: None,
                 parameter_overrides=[Parameter("camera_mount", value=[0.0, 0.0, 0.0])])
    from mast3r_slam_ros.ros.node import ModelLoadError

    with pytest.raises(ModelLoadError, match="checkpoint"):
        SlamNode(system_factory=lambda *a: rt.FakeSlamSystem(), config_factory=lambda p: None)
    with pytest.raises(ModelLoadError, match="does not exist"):
        SlamNode(system_factory=lambda *a: rt.FakeSlamSystem(), config_factory=lambda p: None,
                 parameter_overrides=[Parameter("checkpoint", value="/nonexistent/model.pth")])
