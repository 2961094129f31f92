"""The node in-process with the real SlamSystem and the oracle predictor, fed from a rosbag2 of a synthetic sequence.

Checks (issue 7 "Must show"): odometry, pose, path and TF arrive with the input stamps; path length = frames
processed; the map cloud has the declared fields and finite points in the map frame; TF poses equal the SlamSystem's
poses (reference: scipy rotations, not the node's conversion code); reset and save_map work; diagnostics report drops
under ``frame_policy: latest`` when images come faster than tracking.
"""

from __future__ import annotations

import ros_testlib as rt  # noqa: I001  (sets the ROS environment first)

import numpy as np
import pytest
import rclpy
import torch
from rclpy.parameter import Parameter
from scipy.spatial.transform import Rotation

from sensor_msgs.msg import CameraInfo, Image, PointField

from mast3r_slam_ros.io.export import read_tum
from mast3r_slam_ros.ros import conversions as conv
from mast3r_slam_ros.io.rosbag import write_image_bag
from mast3r_slam_ros.io.sources import CameraIntrinsics
from mast3r_slam_ros.ros.bagio import read_messages
from mast3r_slam_ros.ros.node import SlamNode, make_executor
from mast3r_slam_ros.slam.system import SlamSystem
from mast3r_slam_ros.testing import OraclePredictor, render_sequence

pytestmark = pytest.mark.ros

R_MAP_OPT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
N_FRAMES = 6


@pytest.fixture(scope="module")
def seq():
    return render_sequence("slow_translation", n_frames=N_FRAMES, size=(224, 224))


@pytest.fixture(scope="module")
def bag(seq, tmp_path_factory):
    cam = CameraIntrinsics(K=seq.K, dist=np.zeros(5), width=seq.size[0], height=seq.size[1])
    return write_image_bag(tmp_path_factory.mktemp("bag") / "synthetic", zip(seq.stamps_ns.tolist(), seq.images),
                           camera_info=cam, camera_info_topic="/camera/camera_info", frame_id="camera_optical_frame")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    p.write_text("matching:\n  radius: 0\n", encoding="utf-8")   # no descriptor refinement: fast on CPU
    return p


@pytest.fixture(scope="module", autouse=True)
def ros():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rclpy.init()
    yield
    rclpy.try_shutdown()
    torch.set_num_threads(threads)


class Recording:
    """Delegates to a SlamSystem and records every TrackResult (the poses the TF must equal)."""

    def __init__(self, system):
        self._s, self.results = system, []

    def track(self, rgb, stamp_ns):
        r = self._s.track(rgb, stamp_ns)
        self.results.append(r)
        return r

    def map_points(self, *a, **kw):
        self.last_map = self._s.map_points(*a, **kw)
        return self.last_map

    def __getattr__(self, name):
        return getattr(self._s, name)


def _make(seq, config_file, tmp_path, executor="single_threaded", **params):
    holder = {}

    def factory(pred, cfg, K):
        holder["K"], holder["cfg"] = K, cfg
        holder["sys"] = Recording(SlamSystem(pred, cfg, K))
        return holder["sys"]

    values = {"device": "cpu", "img_size": 224, "config_file": str(config_file), "image_qos": "reliable",
              "image_queue_size": 100, "frame_policy": "all", "sync_backend": True, "map_publish_period": 0.2,
              "diagnostics_period": 0.2, "output_dir": str(tmp_path / "out"), **params}
    node = SlamNode(predictor=OraclePredictor(seq), system_factory=factory,
                    parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
                    cli_args=["--ros-args", "-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"])
    col = rt.Collector()
    tester = rclpy.create_node("bag_player")
    qos = rt.image_qos_for_test()
    pubs = {"/camera/image_raw": tester.create_publisher(Image, "/camera/image_raw", qos),
            "/camera/camera_info": tester.create_publisher(CameraInfo, "/camera/camera_info", qos)}
    ex = make_executor(executor)
    for n in (node, col, tester):
        ex.add_node(n)
    rt.wait_for_subscribers(ex, pubs["/camera/image_raw"])
    assert rt.spin_until(ex, lambda: node.pub_odom.get_subscription_count() > 0, rt.DISCOVERY_TIMEOUT)
    return node, col, tester, pubs, ex, holder


def _close(ex, *nodes):
    ex.shutdown(timeout_sec=1.0)
    for n in nodes:
        n.destroy_node()


def _publish_bag(pubs, bag, count=None):
    """Publish the bag's stored CDR bytes (header stamps as recorded)."""
    n = 0
    for topic, _, raw in read_messages(bag, deserialize=False):
        if topic == "/camera/image_raw":
            if count is not None and n >= count:
                break
            n += 1
        pubs[topic].publish(raw)


def _rot_err(q_msg, q_ref):
    return (Rotation.from_quat(q_msg) * Rotation.from_quat(q_ref).inv()).magnitude()


def test_bag_of_synthetic_sequence_through_the_node(seq, bag, config_file, tmp_path):
    node, col, tester, pubs, ex, holder = _make(seq, config_file, tmp_path)
    try:
        stamps = [int(s) for s in seq.stamps_ns]
        _publish_bag(pubs, bag)
        rx = col.rx

        def done():
            tfs = {conv.stamp_to_ns(t.header.stamp) for m in rx.tf for t in m.transforms}
            return (len(rx.odometry) == N_FRAMES and len(rx.pose) == N_FRAMES and len(tfs) == N_FRAMES
                    and rx.path and len(rx.path[-1].poses) == N_FRAMES and rx.map)
        assert rt.spin_until(ex, done, 120.0), f"counters {node.counters}"
        system = holder["sys"]
        assert node.counters["processed"] == N_FRAMES and node.counters["dropped"] == 0
        # stamps: every output carries the input image stamp
        assert [conv.stamp_to_ns(m.header.stamp) for m in rx.odometry] == stamps
        assert [conv.stamp_to_ns(m.header.stamp) for m in rx.pose] == stamps
        assert all(m.header.frame_id == "map" and m.child_frame_id == "camera_optical_frame" for m in rx.odometry)
        # TF map -> camera optical frame equals the SlamSystem pose of that frame (rigid part, REP-103 map axes)
        tf = {conv.stamp_to_ns(t.header.stamp): t for m in rx.tf for t in m.transforms}
        assert sorted(tf) == stamps
        for r in system.results:
            d = r.T_WC.data.reshape(8).double().numpy()
            t = tf[r.stamp_ns]
            assert t.header.frame_id == "map" and t.child_frame_id == "camera_optical_frame"
            tr = t.transform
            np.testing.assert_allclose([tr.translation.x, tr.translation.y, tr.translation.z], R_MAP_OPT @ d[:3],
                                       atol=1e-6)
            q_ref = (Rotation.from_matrix(R_MAP_OPT) * Rotation.from_quat(d[3:7])).as_quat()
            assert _rot_err([tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w], q_ref) < 1e-5
        # path: one pose per processed frame, equal to the system's trajectory after the backend
        path = rx.path[-1]
        assert len(path.poses) == node.counters["processed"] == N_FRAMES
        assert [conv.stamp_to_ns(p.header.stamp) for p in path.poses] == stamps
        for (ns, T), p in zip(system.trajectory(), path.poses):
            d = T.data.reshape(8).double().numpy()
            np.testing.assert_allclose([p.pose.position.x, p.pose.position.y, p.pose.position.z], R_MAP_OPT @ d[:3],
                                       atol=1e-6)
        # map cloud: declared fields, map frame, finite points = the system's points in REP-103 map axes
        assert rt.spin_until(ex, lambda: node._map_version_published == (int(system.map_version), N_FRAMES), 30.0)
        assert rt.spin_until(ex, lambda: rx.map[-1].width == len(system.last_map[0]))   # delivered
        cloud = rx.map[-1]
        # stamped with the newest image stamp at publication time (published only when the map changed)
        assert cloud.header.frame_id == "map" and conv.stamp_to_ns(cloud.header.stamp) in stamps
        assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
            ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1),
            ("rgb", 12, PointField.FLOAT32, 1)]
        xyz, rgb = conv.cloud_to_xyzrgb(cloud)
        xyz_w, rgb_w = system.last_map    # what the node got from SlamSystem.map_points for this cloud
        assert len(xyz) == len(xyz_w) > 1000 and np.isfinite(xyz).all()
        np.testing.assert_allclose(xyz, xyz_w.astype(np.float64) @ R_MAP_OPT.T, atol=1e-5)
        np.testing.assert_array_equal(rgb, rgb_w)
        # keyframes: one pose per keyframe
        assert rt.spin_until(ex, lambda: rx.keyframes and len(rx.keyframes[-1].poses) == len(system.keyframes()))

        # services: save_map writes PLY + TUM equal to the system's outputs; reset starts a new map
        res = rt.call_trigger(ex, tester, "/mast3r_slam/save_map")
        assert res.success, res.message
        st, poses = read_tum(tmp_path / "out" / "trajectory.txt")
        traj = system.trajectory()
        np.testing.assert_allclose(st, [ns * 1e-9 for ns, _ in traj], rtol=0, atol=1e-6)  # float64 seconds
        np.testing.assert_allclose(np.asarray(poses)[:, :7],
                                   np.stack([T.data.reshape(8).double().numpy()[:7] for _, T in traj]), atol=1e-6)
        from plyfile import PlyData

        assert PlyData.read(str(tmp_path / "out" / "map.ply"))["vertex"].count == len(system.last_map[0])
        res = rt.call_trigger(ex, tester, "/mast3r_slam/reset")
        assert res.success and len(system.trajectory()) == 0
        assert rt.spin_until(ex, lambda: len(rx.path[-1].poses) == 0)
        _publish_bag(pubs, bag, count=2)
        assert rt.spin_until(ex, lambda: len(rx.path[-1].poses) == 2, 60.0)
        assert [conv.stamp_to_ns(p.header.stamp) for p in rx.path[-1].poses] == stamps[:2]
    finally:
        _close(ex, node, col, tester)


def test_latest_policy_reports_drops_when_images_come_faster_than_tracking(seq, bag, config_file, tmp_path):
    node, col, tester, pubs, ex, holder = _make(seq, config_file, tmp_path, frame_policy="latest",
                                                sync_backend=False)
    try:
        _publish_bag(pubs, bag)   # 6 images at once; tracking one takes far longer than publishing all
        c = node.counters
        assert rt.spin_until(ex, lambda: c["received"] == N_FRAMES and c["processed"] + c["dropped"] == N_FRAMES,
                             120.0), f"counters {c}"

        def diag():
            return col.rx.diagnostics and rt.kv(col.rx.diagnostics[-1], "frames_received") == str(N_FRAMES)
        assert rt.spin_until(ex, diag, 30.0)
        d = col.rx.diagnostics[-1]
        dropped, processed = int(rt.kv(d, "frames_dropped")), int(rt.kv(d, "frames_processed"))
        assert dropped > 0 and processed + dropped == N_FRAMES
        assert rt.spin_until(ex, lambda: col.rx.path and len(col.rx.path[-1].poses) == processed)
        # the processed frames are a subsequence of the input ending with the newest
        out = [conv.stamp_to_ns(p.header.stamp) for p in col.rx.path[-1].poses]
        assert out[-1] == int(seq.stamps_ns[-1]) and set(out) <= {int(s) for s in seq.stamps_ns}
    finally:
        _close(ex, node, col, tester)


def test_multi_threaded_executor_with_concurrent_backend(seq, bag, config_file, tmp_path):
    """Tracking and backend_step run on two threads (MultiThreadedExecutor): every frame processed, no errors,
    the final path equals the system's trajectory."""
    node, col, tester, pubs, ex, holder = _make(seq, config_file, tmp_path, executor="multi_threaded",
                                                sync_backend=False, backend_period=0.01)
    try:
        _publish_bag(pubs, bag)
        rx = col.rx
        assert rt.spin_until(ex, lambda: node.counters["processed"] == N_FRAMES, 120.0), f"counters {node.counters}"
        system = holder["sys"]

        def path_matches():
            if not rx.path or len(rx.path[-1].poses) != N_FRAMES:
                return False
            got = np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in rx.path[-1].poses])
            ref = np.stack([R_MAP_OPT @ T.data.reshape(8).double().numpy()[:3] for _, T in system.trajectory()])
            return np.allclose(got, ref, atol=1e-6)
        assert rt.spin_until(ex, path_matches, 60.0)   # once the backend is done, the path equals the trajectory
        assert node.counters["errors"] == 0 and len(system.trajectory()) == N_FRAMES
        assert [conv.stamp_to_ns(m.header.stamp) for m in rx.odometry] == [int(s) for s in seq.stamps_ns]
    finally:
        _close(ex, node, col, tester)


def test_calibrated_mode_with_camera_info_from_the_bag(seq, bag, config_file, tmp_path):
    """use_calib: the real SlamSystem is built from the bag's CameraInfo K and tracks in calibrated mode."""
    node, col, tester, pubs, ex, holder = _make(seq, config_file, tmp_path, use_calib=True)
    try:
        assert node.system is None
        _publish_bag(pubs, bag, count=3)
        c = node.counters   # an image may arrive before the first camera_info: skipped as waiting_for_calib
        assert rt.spin_until(ex, lambda: c["processed"] + c["waiting_for_calib"] == 3
                             and len(col.rx.odometry) == c["processed"] >= 2, 120.0), f"counters {c}"
        system = holder["sys"]
        np.testing.assert_allclose(holder["K"], seq.K)   # K of the (undistorted) input images
        assert holder["cfg"].use_calib and c["errors"] == 0 and system is not None
        assert [conv.stamp_to_ns(m.header.stamp) for m in col.rx.odometry] == \
            [int(s) for s in seq.stamps_ns[3 - c["processed"]:3]]
    finally:
        _close(ex, node, col, tester)
