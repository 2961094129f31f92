"""Helpers shared by the ``test_ros_*.py`` tests (not a test module).

Importing this module first sets the ROS environment every ROS test needs (spec ros_test_env.md §1-2):
``ROS_DOMAIN_ID`` unique per test run (unless already set), ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``,
``ROS_LOCALHOST_ONLY=1`` and ``ROS_PYTHON_CHECK_FIELDS=1`` (read when the message modules are imported, so this
module must be imported before any ``*_msgs`` module).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ["ROS_PYTHON_CHECK_FIELDS"] = "1"

import numpy as np  # noqa: E402

import rclpy  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DISCOVERY_TIMEOUT = 15.0


# ------------------------------------------------------------------------------------------------ fake system
class FakeSlamSystem:
    """Tiny stand-in with the ``SlamSystem`` API: frame i gets ``T_WC = (t = [0.1 i, 0.02 i, 0], yaw 2 i deg)``,
    every third frame is a keyframe; ``backend_step`` "moves" the keyframes once by a known offset.
    ``delay`` (seconds) makes ``track`` slow (drop tests)."""

    def __init__(self, predictor=None, cfg=None, K=None, delay: float = 0.0, move_on_backend: bool = False):
        self.K, self.delay, self.move_on_backend = K, delay, move_on_backend
        self.reset_calls = 0
        self._init()

    def _init(self):
        self.frames: list[tuple[int, np.ndarray]] = []   # (stamp, data [8])
        self.kf: list[int] = []
        self.state = 0
        self.map_version = 0
        self.offset = np.zeros(3)
        self.pending = 0
        self.last_stamp = None
        self.images: list[np.ndarray] = []

    @staticmethod
    def pose(i: int) -> np.ndarray:
        a = np.deg2rad(2.0 * i) / 2
        return np.array([0.1 * i, 0.02 * i, 0.0, 0.0, np.sin(a), 0.0, np.cos(a), 1.0])

    def track(self, rgb, stamp_ns):
        if self.last_stamp is not None and stamp_ns <= self.last_stamp:
            raise ValueError(f"stamp {stamp_ns} is not after {self.last_stamp}")
        if self.delay:
            time.sleep(self.delay)
        i = len(self.frames)
        d = self.pose(i)
        d[:3] += self.offset
        self.frames.append((stamp_ns, d))
        self.images.append(np.asarray(rgb))
        self.last_stamp = stamp_ns
        is_kf = i % 3 == 0
        if is_kf:
            self.kf.append(i)
            self.map_version += 1
            self.pending += 1
        self.state = 1
        return type("R", (), dict(stamp_ns=stamp_ns, T_WC=d.copy(), is_keyframe=is_kf, state=1, match_frac=1.0,
                                  frame_id=i))()

    def backend_step(self):
        if self.pending and self.move_on_backend:
            self.pending = 0
            delta = np.array([0.0, 0.0, 0.5])
            self.offset += delta
            self.frames = [(s, np.concatenate([d[:3] + delta, d[3:]])) for s, d in self.frames]
            self.map_version += 1
            return True
        self.pending = 0
        return False

    def trajectory(self):
        return [(s, d.copy()) for s, d in self.frames]

    def keyframe_trajectory(self):
        return [(self.frames[i][0], self.frames[i][1].copy()) for i in self.kf]

    def keyframes(self):
        return list(self.kf)

    def map_points(self, conf_threshold=1.5, voxel_size=0.0):
        rng = np.random.default_rng(len(self.kf))
        n = 50 * len(self.kf)
        return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3)).astype(np.uint8)

    def reset(self):
        self.reset_calls += 1
        self._init()
        self.map_version = 1000 + self.reset_calls


# ------------------------------------------------------------------------------------------------- collector
@dataclass
class Received:
    odometry: list = field(default_factory=list)
    pose: list = field(default_factory=list)
    path: list = field(default_factory=list)
    map: list = field(default_factory=list)
    keyframes: list = field(default_factory=list)
    markers: list = field(default_factory=list)
    tf: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)


class Collector(Node):
    """Subscribes to every output of a node named ``node_name`` (in namespace ``ns``) and stores the messages."""

    def __init__(self, node_name: str = "mast3r_slam", ns: str = "", name: str = "collector", **node_kwargs):
        super().__init__(name, **node_kwargs)
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseArray, PoseStamped
        from nav_msgs.msg import Odometry, Path as PathMsg
        from sensor_msgs.msg import PointCloud2
        from tf2_msgs.msg import TFMessage
        from visualization_msgs.msg import MarkerArray

        base = f"{ns.rstrip('/')}/{node_name}"
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.rx = Received()
        self.topics = {
            "odometry": (Odometry, f"{base}/odometry", 100), "pose": (PoseStamped, f"{base}/pose", 100),
            "path": (PathMsg, f"{base}/path", latched), "map": (PointCloud2, f"{base}/map", latched),
            "keyframes": (PoseArray, f"{base}/keyframes", latched),
            "markers": (MarkerArray, f"{base}/keyframes/markers", latched),
            "tf": (TFMessage, "/tf", 100), "diagnostics": (DiagnosticArray, "/diagnostics", 100),
        }
        for key, (typ, topic, qos) in self.topics.items():
            self.create_subscription(typ, topic, lambda m, k=key: getattr(self.rx, k).append(m), qos)


def spin_until(executor, predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.02) -> bool:
    """Spin ``executor`` until ``predicate()`` is true or ``timeout`` seconds passed; return the predicate."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step)
    return bool(predicate())


def wait_for_subscribers(executor, pub, n: int = 1, timeout: float = DISCOVERY_TIMEOUT) -> None:
    ok = spin_until(executor, lambda: pub.get_subscription_count() >= n, timeout)
    assert ok, f"no subscriber on {pub.topic_name} after {timeout} s (discovery)"


def call_trigger(executor, node: Node, service: str, timeout: float = DISCOVERY_TIMEOUT):
    """Call a std_srvs/Trigger service and return the response (asserts it answered)."""
    from std_srvs.srv import Trigger

    cli = node.create_client(Trigger, service)
    assert spin_until(executor, cli.service_is_ready, timeout), f"service {service} not available"
    fut = cli.call_async(Trigger.Request())
    assert spin_until(executor, fut.done, timeout), f"service {service} did not answer"
    node.destroy_client(cli)
    return fut.result()


def image_stream(n: int, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``n`` random-texture RGB uint8 images ``[h, w, 3]``."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def kv(diag_msg, key: str) -> str:
    for st in diag_msg.status:
        for v in st.values:
            if v.key == key:
                return v.value
    raise KeyError(key)


def ros_child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child python of the same venv: the ROS test variables, bootstrapper state cleared so the
    child re-runs the ros_wheels_bootstrapper (spec ros_test_env.md §1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("_ROS_WHEELS_BOOTSTRAP_COMPLETE",)}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def start_process(args: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python args...`` (this interpreter) with the ROS env; stdout+stderr go to ``log_path``."""
    f = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by stop_process
    proc = subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=ros_child_env(extra_env),
                            cwd=str(REPO))
    proc._log_file = f  # type: ignore[attr-defined]
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGINT, wait, return the exit code (kills after ``timeout`` and fails)."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.args} did not exit within {timeout} s of SIGINT")
    finally:
        proc._log_file.close()  # type: ignore[attr-defined]
    return rc


def rclpy_context():
    """A fresh rclpy Context (init'ed); caller shuts it down."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    return ctx


def any_of(*a: Any) -> Any:
    return next((x for x in a if x is not None), None)


def image_qos_for_test(depth: int = 100) -> QoSProfile:
    """Reliable publisher QoS for test inputs (compatible with the node's reliable or best-effort subscription)."""
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
