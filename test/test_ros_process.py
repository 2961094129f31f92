"""The node in a separate process (as ``ros2 run`` would start it), fed by the ``replay`` sub-command.

1. Synthetic sequence + oracle (test entry script ``test/ros_oracle_node.py``, real SlamSystem): bag -> ``mast3r-slam-ros
   replay --record`` -> node; the recorded bag (read back with the Humble typestore of ``rosbags``) holds odometry,
   pose, path and TF with the input stamps, a path of one pose per frame, a finite map cloud in the map frame;
   ``~/save_map`` writes the trajectory the path shows; SIGINT gives exit code 0 and ``save_on_exit`` writes files.
2. Real input: the ViSP ``cube`` camera sequence (Debian visp-images-data) in a bag, the real node module with a small
   random checkpoint from ``mast3r-slam-ros make-test-checkpoint``: runs to the end, one pose per processed frame;
   malformed images are logged and skipped while the node keeps running.
"""

from __future__ import annotations

import ros_testlib as rt  # noqa: I001  (sets the ROS environment first)

import subprocess
import sys

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor

from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from mast3r_slam_ros.io.export import read_tum
from mast3r_slam_ros.io.rosbag import write_image_bag
from mast3r_slam_ros.io.sources import CameraIntrinsics
from mast3r_slam_ros.ros import conversions as conv
from mast3r_slam_ros.ros.bagio import read_messages

pytestmark = pytest.mark.ros

R_MAP_OPT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
STARTUP_TIMEOUT = 90.0   # python + torch import + model load on a loaded 2-core machine, then discovery


@pytest.fixture()
def ros_ctx():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("process_tester", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    yield node, ex
    ex.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.try_shutdown(context=ctx)


def _wait_node_up(node, ex, proc, log):
    ok = rt.spin_until(ex, lambda: proc.poll() is not None or node.count_publishers("/mast3r_slam/odometry") > 0,
                       STARTUP_TIMEOUT)
    assert proc.poll() is None, f"node exited with {proc.returncode}:\n{log.read_text(encoding='utf-8')[-3000:]}"
    assert ok, f"node not discovered:\n{log.read_text(encoding='utf-8')[-3000:]}"
    # its subscription on the image topic is discovered too
    assert rt.spin_until(ex, lambda: node.count_subscribers("/camera/image_raw") > 0, rt.DISCOVERY_TIMEOUT)


def _run_replay(node, ex, args, log):
    """Run ``mast3r-slam-ros replay`` as a subprocess while spinning the tester; return its exit code."""
    proc = rt.start_process(["-m", "mast3r_slam_ros.cli", "replay", *args], log)
    rt.spin_until(ex, lambda: proc.poll() is not None, 300.0)
    rc = proc.wait(timeout=30)
    proc._log_file.close()
    return rc


def test_oracle_node_process_replay_and_record(ros_ctx, tmp_path):
    from mast3r_slam_ros.testing import render_sequence

    node, ex = ros_ctx
    n = 6
    seq = render_sequence("slow_translation", n_frames=n, size=(224, 224))
    stamps = [int(s) for s in seq.stamps_ns]
    bag = write_image_bag(tmp_path / "in_bag", zip(stamps, seq.images), camera_info_topic="/camera/camera_info",
                          camera_info=CameraIntrinsics(K=seq.K, dist=np.zeros(5), width=224, height=224),
                          frame_id="camera_optical_frame")
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("matching:\n  radius: 0\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    log = tmp_path / "node.log"
    proc = rt.start_process([
        "test/ros_oracle_node.py", "--sequence", "slow_translation", "--frames", str(n), "--size", "224",
        "--ros-args", "--params-file", "config/mast3r_slam.yaml", "-p", "device:=cpu", "-p", "img_size:=224",
        "-p", f"config_file:={cfg}", "-p", "frame_policy:=all", "-p", "image_qos:=reliable",
        "-p", "image_queue_size:=100", "-p", "sync_backend:=true", "-p", "map_publish_period:=0.2",
        "-p", f"output_dir:={out_dir}", "-p", "save_on_exit:=true",
        "-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"], log)
    try:
        _wait_node_up(node, ex, proc, log)
        rec = tmp_path / "out_bag"
        rc = _run_replay(node, ex, [str(bag), "--rate", "2.0", "--record", str(rec), "--linger", "120",
                                    "--idle", "8", "--wait-for-subscribers", "15"], tmp_path / "replay.log")
        assert rc == 0, (tmp_path / "replay.log").read_text(encoding="utf-8")
        # recorded outputs, decoded with the ROS 2 Humble typestore
        msgs: dict[str, list] = {}
        for topic, _, m in read_messages(rec):
            msgs.setdefault(topic, []).append(m)
        st = lambda m: int(m.header.stamp.sec) * 1_000_000_000 + int(m.header.stamp.nanosec)  # noqa: E731
        assert [st(m) for m in msgs["/mast3r_slam/odometry"]] == stamps
        assert [st(m) for m in msgs["/mast3r_slam/pose"]] == stamps
        tf = {st(t): t for m in msgs["/tf"] for t in m.transforms if t.child_frame_id == "camera_optical_frame"}
        assert sorted(tf) == stamps and all(t.header.frame_id == "map" for t in tf.values())
        for o in msgs["/mast3r_slam/odometry"]:   # TF and odometry carry the same pose
            t = tf[st(o)].transform
            np.testing.assert_allclose([t.translation.x, t.translation.y, t.translation.z],
                                       [o.pose.pose.position.x, o.pose.pose.position.y, o.pose.pose.position.z])
        path = msgs["/mast3r_slam/path"][-1]
        assert len(path.poses) == n and [st(p) for p in path.poses] == stamps
        diag = msgs["/diagnostics"][-1]
        values = {v.key: v.value for s in diag.status for v in s.values}
        assert values["frames_processed"] == str(n) == values["frames_received"]
        cloud = msgs["/mast3r_slam/map"][-1]
        assert cloud.header.frame_id == "map" and [f.name for f in cloud.fields] == ["x", "y", "z", "rgb"]
        assert all(f.datatype == 7 and f.count == 1 for f in cloud.fields) and cloud.point_step == 16
        xyz = np.frombuffer(bytes(cloud.data), "<f4").reshape(-1, 4)[:, :3]
        assert len(xyz) == cloud.width > 1000 and np.isfinite(xyz).all()

        # save_map: the TUM trajectory is the path the node published (SLAM world = optical axes)
        res = rt.call_trigger(ex, node, "/mast3r_slam/save_map")
        assert res.success, res.message
        t_s, poses = read_tum(out_dir / "trajectory.txt")
        np.testing.assert_allclose(t_s, np.array(stamps) * 1e-9, atol=1e-6)
        p_map = np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in path.poses])
        np.testing.assert_allclose(p_map, np.asarray(poses)[:, :3] @ R_MAP_OPT.T, atol=1e-5)
        (out_dir / "trajectory.txt").unlink()
    finally:
        rc = rt.stop_process(proc)
    assert rc == 0, log.read_text(encoding="utf-8")[-3000:]
    assert len(read_tum(out_dir / "trajectory.txt")[0]) == n   # save_on_exit
    assert "saved on exit" in log.read_text(encoding="utf-8")


def _malformed(stamp_sec: int) -> list[Image]:
    hdr = Header(stamp=Time(sec=stamp_sec), frame_id="camera_optical_frame")
    wide = Image(header=hdr, height=4, width=4, encoding="mono16", step=8)
    wide.data = bytes(32)
    short = Image(header=hdr, height=4, width=4, encoding="rgb8", step=12)
    short.data = bytes(7)
    zero = Image(header=hdr, height=0, width=0, encoding="rgb8", step=0)
    return [wide, short, zero]


def test_visp_cube_real_sequence_random_checkpoint(ros_ctx, tmp_path):
    from mast3r_slam_ros.cli import main as cli_main
    from mast3r_slam_ros.testing.visp import load_visp_cube

    node, ex = ros_ctx
    ckpt = tmp_path / "tiny.pth"
    assert cli_main(["make-test-checkpoint", "--out", str(ckpt)]) == 0
    frames, K = load_visp_cube()
    stamps = [1_600_000_000_000_000_000 + i * 33_333_333 for i in range(len(frames))]
    rgb = [np.repeat(f[:, :, None], 3, axis=2) for f in frames]
    bag = write_image_bag(tmp_path / "visp_bag", zip(stamps, rgb), encoding="mono8", frame_id="camera_optical_frame",
                          camera_info=CameraIntrinsics(K=K, dist=np.zeros(5), width=384, height=288),
                          camera_info_topic="/camera/camera_info")
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("matching:\n  radius: 0\n", encoding="utf-8")
    log = tmp_path / "node.log"
    proc = rt.start_process([
        "-m", "mast3r_slam_ros.ros.node", "--ros-args", "--params-file", "config/mast3r_slam.yaml",
        "-p", f"checkpoint:={ckpt}", "-p", "device:=cpu", "-p", "img_size:=224", "-p", f"config_file:={cfg}",
        "-p", "frame_policy:=latest", "-p", "image_qos:=reliable", "-p", "diagnostics_period:=0.5",
        "-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"], log,
        extra_env={"OMP_NUM_THREADS": "1"})
    col = rt.Collector(name="visp_collector", context=node.context)
    ex.add_node(col)
    try:
        _wait_node_up(node, ex, proc, log)
        rc = _run_replay(node, ex, [str(bag), "--rate", "1.0", "--wait-for-subscribers", "15"],
                         tmp_path / "replay.log")
        assert rc == 0, (tmp_path / "replay.log").read_text(encoding="utf-8")

        def idle():   # every received image either processed or dropped, and the last one processed
            if not col.rx.diagnostics or not col.rx.odometry:
                return False
            v = {kv.key: int(kv.value) for kv in col.rx.diagnostics[-1].status[0].values
                 if kv.key.startswith("frames_")}
            last = conv.stamp_to_ns(col.rx.odometry[-1].header.stamp)
            return (v["frames_processed"] + v["frames_dropped"] == v["frames_received"] and last == stamps[-1]
                    and v["frames_processed"] == len(col.rx.odometry))
        assert rt.spin_until(ex, idle, 240.0), log.read_text(encoding="utf-8")[-3000:]
        assert proc.poll() is None
        v = {kv.key: kv.value for kv in col.rx.diagnostics[-1].status[0].values}
        processed = int(v["frames_processed"])
        assert processed >= 2 and v["frames_malformed"] == "0" and v["errors"] == "0"
        out = [conv.stamp_to_ns(m.header.stamp) for m in col.rx.odometry]
        assert len(out) == processed and set(out) <= set(stamps) and out == sorted(out)
        assert rt.spin_until(ex, lambda: col.rx.path and len(col.rx.path[-1].poses) == processed)
        assert [conv.stamp_to_ns(p.header.stamp) for p in col.rx.path[-1].poses] == out

        # malformed input: logged and skipped, node alive and still tracking
        pub = node.create_publisher(Image, "/camera/image_raw", rt.image_qos_for_test())
        rt.wait_for_subscribers(ex, pub)
        for m in _malformed(1_700_000_000):
            pub.publish(m)
            rt.spin_until(ex, lambda: False, 0.3)   # one at a time, so frame_policy latest does not drain them
        good = conv.rgb_to_image(frames[-1], "mono8", Header(stamp=Time(sec=1_700_000_001),
                                                             frame_id="camera_optical_frame"))
        pub.publish(good)
        assert rt.spin_until(ex, lambda: len(col.rx.odometry) == processed + 1, 240.0), log.read_text(encoding="utf-8")[-3000:]
        assert conv.stamp_to_ns(col.rx.odometry[-1].header.stamp) == 1_700_000_001_000_000_000
        assert rt.spin_until(ex, lambda: {kv.key: kv.value for kv in col.rx.diagnostics[-1].status[0].values}
                             ["frames_malformed"] == "3")
        assert proc.poll() is None
    finally:
        ex.remove_node(col)
        col.destroy_node()
        rc = rt.stop_process(proc)
    text = log.read_text(encoding="utf-8")
    assert rc == 0, text[-3000:]
    assert "skipping malformed image" in text and "mono16" in text


def test_missing_checkpoint_exits_with_clear_error(tmp_path):
    """The real node module without a usable model: exit code 1 and a message naming the parameter and path."""
    missing = tmp_path / "nope" / "model.pth"
    proc = subprocess.run([sys.executable, "-m", "mast3r_slam_ros.ros.node", "--ros-args", "-p",
                           f"checkpoint:={missing}"], env=rt.ros_child_env(), capture_output=True, text=True,
                          timeout=120, cwd=str(rt.REPO))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"checkpoint '{missing}' does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mast3r_slam_ros.ros.node"], env=rt.ros_child_env(),
                          capture_output=True, text=True, timeout=120, cwd=str(rt.REPO))
    assert proc.returncode == 1 and "parameter 'checkpoint' is empty" in proc.stderr


def test_replay_cli_errors(tmp_path, capsys):
    from mast3r_slam_ros.cli import main as cli_main

    assert cli_main(["replay", str(tmp_path / "missing_bag")]) == 2
    assert "not a rosbag2" in capsys.readouterr().err
    frames = [np.zeros((8, 8, 3), np.uint8)] * 2
    bag = write_image_bag(tmp_path / "b", zip([1, 2], frames))
    assert cli_main(["replay", str(bag), "--rate", "0"]) == 2
    assert "--rate must be > 0" in capsys.readouterr().err
    assert cli_main(["replay", str(bag), "--topics", "/nope"]) == 2
    assert "not in" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli_main(["replay", str(bag), "--record", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
