"""The ``mast3r_slam`` ROS 2 node: images in, Sim(3) poses, path, map cloud, TF, diagnostics and services out.

Run it with ``ros2 run mast3r_slam_ros slam_node --ros-args --params-file config/mast3r_slam.yaml`` (colcon) or the
``slam_node`` console script (pip). Topics, parameters, frames and services: docs/ros.md.

Concurrency (docs/design.md "Concurrency"): two ``MutuallyExclusiveCallbackGroup``s, **frontend** (image
subscriptions -> ``SlamSystem.track``, camera_info, services) and **backend** (timers: ``backend_step``, map cloud,
diagnostics). ``executor: single_threaded`` serves both on one thread; ``multi_threaded`` runs them on two threads
(``SlamSystem`` guards its keyframe store with its lock; the node guards its own output state with one lock).

``frame_policy: latest``: when the image callback runs, every further image already waiting in the subscription's
queue is taken, the newest is processed and the others are counted as drops. Images that the middleware discarded
before they reached the node (history depth ``image_queue_size`` overflow) cannot be seen and are not counted.

The model is loaded once, in the constructor. Tests inject a predictor and/or a system factory (Python arguments
``predictor=`` and ``system_factory=``); the runtime has no test hook.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data,
                       qos_profile_system_default)
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseStamped
from nav_msgs.msg import Odometry, Path as PathMsg
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import MarkerArray

from mast3r_slam_ros.ros import conversions as conv
from mast3r_slam_ros.ros.params import PARAMETERS, NodeParams

__all__ = ["SlamNode", "ModelLoadError", "make_executor", "main", "build_slam_config"]

NODE_NAME = "mast3r_slam"
MODE_NAMES = {0: "INIT", 1: "TRACKING", 2: "RELOC", 3: "TERMINATED"}


class ModelLoadError(RuntimeError):
    """The checkpoint (parameter ``checkpoint``) cannot be loaded; the message names the path and device."""


# --------------------------------------------------------------------------------------------------- helpers
def _descriptor(spec) -> ParameterDescriptor:
    d = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.range is not None:
        if isinstance(spec.default, bool):
            pass
        elif isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]),
                                            step=int(spec.step))]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                         to_value=float(spec.range[1]), step=float(spec.step))]
    return d


def image_qos(name: str, depth: int) -> QoSProfile:
    """QoS of the input subscriptions from the ``image_qos`` parameter (REP-2003: sensor data by default)."""
    if name == "sensor_data":
        base = qos_profile_sensor_data
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=base.reliability,
                          durability=base.durability)
    if name == "reliable":
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    if name == "system_default":
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                          reliability=qos_profile_system_default.reliability,
                          durability=qos_profile_system_default.durability)
    raise ValueError(f"image_qos must be sensor_data, reliable or system_default, got '{name}'")


def build_slam_config(p: NodeParams) -> Any:
    """``SlamConfig`` from ``config_file`` with the node's parameters as overrides (docs/interfaces.md config)."""
    from mast3r_slam_ros.config import load_config

    overrides = {
        "use_calib": bool(p.use_calib),
        "runtime": {"device": p.device, "kernel_backend": p.kernel_backend, "precision": p.precision,
                    "head_precision": p.head_precision,
                    "max_keyframes": int(p.max_keyframes), "img_size": int(p.img_size),
                    "loop_closure": bool(p.loop_closure), "sync_backend": bool(p.sync_backend)},
    }
    return load_config(p.config_file or None, overrides)


def _default_system_factory(predictor: Any, cfg: Any, K: np.ndarray | None) -> Any:
    from mast3r_slam_ros.slam.system import SlamSystem

    return SlamSystem(predictor, cfg, K=K)


def _world_poses_to_map(data: np.ndarray, T_map_W: tuple[np.ndarray, np.ndarray]) -> list[tuple]:
    """Vectorized ``T_map_W * T_WC`` for ``data [N, 8]`` Sim(3) rows -> list of rigid ``(t, q)`` (scale dropped)."""
    R = conv.quat_to_matrix(T_map_W[1])
    t = data[:, :3] @ R.T + T_map_W[0]
    qa = T_map_W[1]
    q = data[:, 3:7] / np.linalg.norm(data[:, 3:7], axis=1, keepdims=True)
    ax, ay, az, aw = qa
    bx, by, bz, bw = q.T
    qo = np.stack([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                   aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz], axis=1)
    return [(t[i], qo[i]) for i in range(len(data))]


def _stack_sim3(items: list) -> np.ndarray:
    if not items:
        return np.zeros((0, 8))
    rows = []
    for T in items:
        d = getattr(T, "data", T)
        if hasattr(d, "detach"):
            d = d.detach().cpu().double().numpy()
        rows.append(np.asarray(d, np.float64).reshape(8))
    return np.stack(rows)


class _RateWindow:
    """Event rate over the last ``window`` seconds of monotonic time."""

    def __init__(self, window: float = 5.0):
        self.window, self.t = window, deque()

    def add(self, now: float) -> None:
        self.t.append(now)

    def rate(self, now: float) -> float:
        while self.t and now - self.t[0] > self.window:
            self.t.popleft()
        if len(self.t) < 2:
            return 0.0
        span = max(now - self.t[0], 1e-9)
        return (len(self.t) - 1) / span if span > 0 else 0.0


# ------------------------------------------------------------------------------------------------------ node
class SlamNode(Node):
    """ROS 2 node wrapping one ``SlamSystem`` (see module docstring and docs/ros.md).

    Args:
        predictor: an object with the Predictor API; ``None`` loads MASt3R from parameter ``checkpoint`` on
            ``device`` (once).
        system_factory: ``(predictor, cfg, K [3,3] float64 | None) -> system`` with the ``SlamSystem`` API; ``None``
            builds ``slam.system.SlamSystem``. In calibrated mode it is called when the first valid camera_info
            arrives, otherwise in the constructor.
        config_factory: ``NodeParams -> cfg`` passed to ``system_factory`` (default :func:`build_slam_config`).
        node_name / namespace / parameter_overrides / cli_args: as for ``rclpy.node.Node``.
    Raises:
        ModelLoadError: empty or missing checkpoint, or loading failed (message says which and why).
        ValueError: invalid parameter values (message names the parameter).
    """

    def __init__(self, predictor: Any = None, system_factory: Callable | None = None,
                 config_factory: Callable | None = None, *, node_name: str = NODE_NAME, **node_kwargs: Any):
        super().__init__(node_name, **node_kwargs)
        self.p = self._declare_and_read()
        self._validate()
        self.frontend_group = MutuallyExclusiveCallbackGroup()
        self.backend_group = MutuallyExclusiveCallbackGroup()
        self._lock = threading.RLock()

        # --- model, loaded once
        self.predictor = predictor if predictor is not None else self._load_model()
        self._system_factory = system_factory or _default_system_factory
        self._cfg = (config_factory or build_slam_config)(self.p)
        self.system: Any = None
        self.K: np.ndarray | None = None
        self._undistort_maps: tuple | None = None
        if not self.p.use_calib:
            self.system = self._system_factory(self.predictor, self._cfg, None)

        # --- state
        self.T_map_W = conv.map_from_world(self.p.map_orientation)
        mount = np.asarray(self.p.camera_mount, np.float64)
        self.T_base_cam = (mount[:3], mount[3:7] / np.linalg.norm(mount[3:7]))
        self.paused = False
        self.counters = {k: 0 for k in ("received", "processed", "dropped", "malformed", "out_of_order",
                                        "skipped_paused", "waiting_for_calib", "errors", "keyframes_added")}
        self._in_rate, self._proc_rate = _RateWindow(), _RateWindow()
        self._track_time = deque(maxlen=50)
        self._path: list[tuple[int, np.ndarray]] = []  # (stamp_ns, [tx,ty,tz,qx,qy,qz,qw]) per frame, map frame
        self._path_msgs: list[PoseStamped] = []        # the same as messages (built once per pose)
        self._path_dirty = False
        self._path_sent_at = -1e18
        self._last_stamp: Time | None = None
        self._last_stamp_ns: int | None = None
        self._last_result: Any = None
        self._path_version = -1
        self._map_version_published: tuple[int, int] | None = None
        self._kf_version_published = -1
        self._dirty_map = False
        self._warned: dict[str, float] = {}

        # --- publishers (outputs reliable; map transient-local, REP-2003)
        self.pub_odom = self.create_publisher(Odometry, "~/odometry", 10)
        self.pub_pose = self.create_publisher(PoseStamped, "~/pose", 10)
        self.pub_path = self.create_publisher(PathMsg, "~/path", QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_map = self.create_publisher(PointCloud2, "~/map", QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_kf = self.create_publisher(PoseArray, "~/keyframes", QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_kf_markers = self.create_publisher(MarkerArray, "~/keyframes/markers", QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_tf = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100))     # = tf2_ros broadcaster
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        # --- subscriptions (relative names: remappable, namespaced)
        qos = image_qos(self.p.image_qos, int(self.p.image_queue_size))
        self.sub_image = self.create_subscription(Image, "image", self._on_image, qos,
                                                  callback_group=self.frontend_group)
        self.sub_compressed = None
        if self.p.subscribe_compressed:
            self.sub_compressed = self.create_subscription(CompressedImage, "image/compressed",
                                                           self._on_compressed, qos,
                                                           callback_group=self.frontend_group)
        self.sub_info = self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos,
                                                 callback_group=self.frontend_group)

        # --- services (frontend group: never concurrent with tracking)
        self.create_service(Trigger, "~/reset", self._srv_reset, callback_group=self.frontend_group)
        self.create_service(Trigger, "~/save_map", self._srv_save_map, callback_group=self.frontend_group)
        self.create_service(Trigger, "~/pause", self._srv_pause, callback_group=self.frontend_group)
        self.create_service(Trigger, "~/resume", self._srv_resume, callback_group=self.frontend_group)

        # --- timers (backend group)
        self.create_timer(float(self.p.backend_period), self._on_backend_timer, callback_group=self.backend_group)
        self.create_timer(float(self.p.map_publish_period), self._on_map_timer, callback_group=self.backend_group)
        self.create_timer(float(self.p.diagnostics_period), self._on_diagnostics_timer,
                          callback_group=self.backend_group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f"ready: executor={self.p.executor} frame_policy={self.p.frame_policy} use_calib={self.p.use_calib} "
            f"image_qos={self.p.image_qos} map_frame={self.p.map_frame} "
            f"(subscribed to {self.sub_image.topic_name})")

    # ---------------------------------------------------------------------------------------------- parameters
    def _declare_and_read(self) -> NodeParams:
        values = {}
        for spec in PARAMETERS:
            default = spec.default
            self.declare_parameter(spec.name, default, _descriptor(spec))
            values[spec.name] = self.get_parameter(spec.name).value
        return NodeParams(values)

    def _validate(self) -> None:
        for spec in PARAMETERS:
            v = self.p.values[spec.name]
            if spec.choices and v not in spec.choices:
                raise ValueError(f"parameter '{spec.name}' = '{v}' is not one of {list(spec.choices)}")
            if spec.range is not None and not isinstance(v, bool) and not (spec.range[0] <= v <= spec.range[1]):
                raise ValueError(f"parameter '{spec.name}' = {v} is outside [{spec.range[0]}, {spec.range[1]}]")
        if self.p.img_size not in (224, 512):
            raise ValueError(f"parameter 'img_size' must be 224 or 512, got {self.p.img_size}")
        mount = list(self.p.camera_mount)
        if len(mount) != 7 or not all(math.isfinite(x) for x in mount) or np.linalg.norm(mount[3:]) < 1e-9:
            raise ValueError(f"parameter 'camera_mount' must be [x, y, z, qx, qy, qz, qw], got {mount}")
        if self.p.odom_frame and not self.p.base_frame:
            raise ValueError("parameter 'odom_frame' needs 'base_frame' (REP-105 map -> odom -> base_frame)")
        if self.p.base_frame and self.p.odom_frame and not self.p.publish_odom_tf:
            try:
                import tf2_ros  # noqa: F401
            except ImportError as exc:
                raise ValueError("publish_odom_tf:=false needs tf2_ros to look up odom -> base_frame, and tf2_ros "
                                 f"cannot be imported here ({exc})") from exc
            self._init_tf_listener()

    def _init_tf_listener(self) -> None:
        """tf2_ros Buffer + listener for external odometry (ROS installs only; not available from pip)."""
        import tf2_ros

        self._tf_buffer = tf2_ros.Buffer()
        self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for prm in params:
            spec = next((s for s in PARAMETERS if s.name == prm.name), None)
            if spec is None:
                continue
            if spec.choices and prm.value not in spec.choices:
                return SetParametersResult(successful=False, reason=f"{prm.name} must be one of {spec.choices}")
        for prm in params:
            if prm.name in self.p.values:
                self.p.values[prm.name] = prm.value
                if prm.name.startswith("map_"):
                    self._dirty_map = True
        return SetParametersResult(successful=True)

    # --------------------------------------------------------------------------------------------------- model
    def _load_model(self) -> Any:
        ckpt, device = str(self.p.checkpoint), str(self.p.device)
        if not ckpt:
            raise ModelLoadError("parameter 'checkpoint' is empty: set it to a MASt3R checkpoint file "
                                 "(e.g. -p checkpoint:=/path/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth)")
        looks_like_path = ckpt.endswith((".pth", ".pt", ".safetensors", ".bin")) or Path(ckpt).is_absolute() \
            or ckpt.startswith((".", "~"))
        if looks_like_path and not Path(ckpt).expanduser().exists():
            raise ModelLoadError(f"checkpoint '{ckpt}' does not exist (parameter 'checkpoint')")
        self.get_logger().info(f"loading MASt3R from '{ckpt}' on device '{device}' ({self.p.precision}, heads "
                               f"{self.p.head_precision})")
        t0 = time.monotonic()
        try:
            from mast3r_slam_ros.network import load_predictor  # CUDA-graph replay on CUDA, eager otherwise

            model = load_predictor(str(Path(ckpt).expanduser()) if looks_like_path else ckpt, device,
                                   self.p.precision, head_precision=self.p.head_precision)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ModelLoadError(f"cannot load checkpoint '{ckpt}' on device '{device}': "
                                 f"{type(exc).__name__}: {exc}") from exc
        self.get_logger().info(f"model loaded in {time.monotonic() - t0:.1f} s")
        return model

    # -------------------------------------------------------------------------------------------------- inputs
    def _warn_throttled(self, key: str, text: str, period: float = 2.0) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= period:
            self._warned[key] = now
            self.get_logger().warning(text)

    def _drain(self, sub, first):
        """``frame_policy: latest``: take every message already queued on ``sub``; return the newest."""
        newest = first
        handle = getattr(sub, "handle", None)
        if handle is None:
            return newest
        while True:
            try:
                with handle:
                    taken = handle.take_message(sub.msg_type, sub.raw)
            except Exception:  # noqa: BLE001 - rclpy internals differ between distros: then no draining
                return newest
            if taken is None:
                return newest
            msg = taken[0] if isinstance(taken, tuple) else taken
            if msg is None:
                return newest
            now = time.monotonic()
            with self._lock:
                self.counters["received"] += 1
                self.counters["dropped"] += 1
                self._in_rate.add(now)
            newest = msg

    def _on_image(self, msg: Image) -> None:
        self._on_input(msg, self.sub_image, conv.image_to_rgb)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._on_input(msg, self.sub_compressed, conv.compressed_to_rgb)

    def _on_input(self, msg, sub, decode: Callable) -> None:
        with self._lock:
            self.counters["received"] += 1
            self._in_rate.add(time.monotonic())
        if self.p.frame_policy == "latest":
            msg = self._drain(sub, msg)
        if self.paused:
            self.counters["skipped_paused"] += 1
            return
        try:
            rgb = decode(msg)
        except conv.ImageConversionError as exc:
            self.counters["malformed"] += 1
            self._warn_throttled(f"malformed:{str(exc)[:24]}", f"skipping malformed image (stamp "
                                 f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}): {exc}", 1.0)
            return
        if self.system is None:
            self.counters["waiting_for_calib"] += 1
            self._warn_throttled("calib", "use_calib is true and no valid camera_info has arrived yet on "
                                 f"'{self.sub_info.topic_name}': image skipped")
            return
        if self._undistort_maps is not None:
            rgb = self._undistort(rgb)
        self._process(rgb, msg.header)

    def _undistort(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        (h, w), m1, m2 = self._undistort_maps
        if rgb.shape[:2] != (h, w):
            self._warn_throttled("undist", f"image {rgb.shape[1]}x{rgb.shape[0]} does not match camera_info "
                                 f"{w}x{h}: not undistorted")
            return rgb
        return cv2.remap(rgb, m1, m2, interpolation=cv2.INTER_LINEAR)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        if not self.p.use_calib or self.system is not None:
            return
        K = np.asarray(msg.k, np.float64).reshape(3, 3)
        if not (np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0 and msg.width > 0 and msg.height > 0):
            self._warn_throttled("badK", f"ignoring camera_info with invalid K {K.ravel().tolist()} "
                                 f"({msg.width}x{msg.height})")
            return
        D = np.asarray(msg.d, np.float64)
        if D.size and np.any(D != 0):
            import cv2

            model = str(msg.distortion_model)
            if model in ("plumb_bob", "rational_polynomial", ""):
                m1, m2 = cv2.initUndistortRectifyMap(K, D, None, K, (int(msg.width), int(msg.height)),
                                                     cv2.CV_32FC1)
                self._undistort_maps = ((int(msg.height), int(msg.width)), m1, m2)
            elif model == "equidistant":
                m1, m2 = cv2.fisheye.initUndistortRectifyMap(K, D[:4], np.eye(3), K,
                                                             (int(msg.width), int(msg.height)), cv2.CV_32FC1)
                self._undistort_maps = ((int(msg.height), int(msg.width)), m1, m2)
            else:
                self.get_logger().warning(f"distortion model '{model}' not supported: images used as they are")
        self.K = K
        self.system = self._system_factory(self.predictor, self._cfg, K)
        self.get_logger().info(f"calibrated mode: K = {K.ravel().round(3).tolist()}, distortion "
                               f"{'removed' if self._undistort_maps else 'none'}")

    # ---------------------------------------------------------------------------------------------- tracking
    def _process(self, rgb: np.ndarray, header: Header) -> None:
        stamp_ns = conv.stamp_to_ns(header.stamp)
        if self._last_stamp_ns is not None and stamp_ns <= self._last_stamp_ns:
            self.counters["out_of_order"] += 1
            self._warn_throttled("out_of_order", f"frame skipped: stamp {stamp_ns} ns is not after the previous "
                                 f"frame's {self._last_stamp_ns} ns (call ~/reset after a bag restart)", 1.0)
            return
        t0 = time.monotonic()
        try:
            result = self.system.track(rgb, stamp_ns)
        except ValueError as exc:   # bad image or stamp for the SLAM core: system unchanged
            key = "out_of_order" if type(exc).__name__ == "StampOrderError" else "malformed"
            self.counters[key] += 1
            self._warn_throttled(key, f"frame skipped: {exc}", 1.0)
            return
        except Exception as exc:  # noqa: BLE001 - one bad frame must not kill the node
            self.counters["errors"] += 1
            self.get_logger().error(f"tracking failed on frame {stamp_ns} ns: {type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        self._track_time.append(now - t0)
        cam_frame = self.p.camera_frame or header.frame_id or "camera_optical_frame"
        stamp = header.stamp
        rt_map_cam = conv.compose(self.T_map_W, conv.sim3_to_rt(result.T_WC))
        with self._lock:
            self.counters["processed"] += 1
            self.counters["keyframes_added"] += int(bool(result.is_keyframe))
            self._proc_rate.add(now)
            self._last_stamp = stamp
            self._last_stamp_ns = stamp_ns
            self._last_result = result
            self._path.append((stamp_ns, np.concatenate(rt_map_cam)))
            self._path_msgs.append(conv.pose_stamped_msg(rt_map_cam, stamp, self.p.map_frame))
        self._publish_pose(rt_map_cam, stamp, cam_frame)
        if self.p.sync_backend:
            while self.system.backend_step():
                pass
        self._refresh_path_if_moved()
        self._publish_path(stamp)

    def _publish_pose(self, rt_map_cam: tuple, stamp: Time, cam_frame: str) -> None:
        p = self.p
        transforms = []
        if p.base_frame:
            rt_map_base = conv.compose(rt_map_cam, conv.invert(self.T_base_cam))
            if p.odom_frame:
                if p.publish_odom_tf:
                    rt_map_odom = (np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0]))
                else:
                    rt_map_odom = self._map_to_odom_from_tf(rt_map_base, stamp)
                    if rt_map_odom is None:
                        return
                rt_odom_base = conv.compose(conv.invert(rt_map_odom), rt_map_base)
                transforms.append(conv.transform_msg(rt_map_odom, stamp, p.map_frame, p.odom_frame))
                if p.publish_odom_tf:
                    transforms.append(conv.transform_msg(rt_odom_base, stamp, p.odom_frame, p.base_frame))
                self.pub_odom.publish(conv.odometry_msg(rt_odom_base, stamp, p.odom_frame, p.base_frame))
            else:
                transforms.append(conv.transform_msg(rt_map_base, stamp, p.map_frame, p.base_frame))
                self.pub_odom.publish(conv.odometry_msg(rt_map_base, stamp, p.map_frame, p.base_frame))
            self.pub_pose.publish(conv.pose_stamped_msg(rt_map_base, stamp, p.map_frame))
        else:
            transforms.append(conv.transform_msg(rt_map_cam, stamp, p.map_frame, cam_frame))
            self.pub_odom.publish(conv.odometry_msg(rt_map_cam, stamp, p.map_frame, cam_frame))
            self.pub_pose.publish(conv.pose_stamped_msg(rt_map_cam, stamp, p.map_frame))
        if p.publish_tf and transforms:
            self.pub_tf.publish(TFMessage(transforms=transforms))

    def _map_to_odom_from_tf(self, rt_map_base: tuple, stamp: Time):
        """External odometry: ``T_map_odom = T_map_base * inv(T_odom_base)`` with ``T_odom_base`` from tf2_ros."""
        try:
            tf = self._tf_buffer.lookup_transform(self.p.odom_frame, self.p.base_frame, rclpy.time.Time.from_msg(stamp),
                                                  timeout=rclpy.duration.Duration(seconds=0.05))
        except Exception as exc:  # noqa: BLE001 - tf2 exceptions
            self._warn_throttled("tf", f"no {self.p.odom_frame}->{self.p.base_frame} at the image stamp: {exc}")
            return None
        return conv.compose(rt_map_base, conv.invert(conv.transform_to_rt(tf.transform)))

    def _refresh_path_if_moved(self) -> None:
        """Rebuild the per-frame path from ``system.trajectory()`` when keyframes moved (map_version changed)."""
        if self.system is None:
            return
        version = int(self.system.map_version)
        if version == self._path_version:
            return
        traj = self.system.trajectory()
        new = np.array([np.concatenate(rt) for rt in _world_poses_to_map(_stack_sim3([T for _, T in traj]),
                                                                            self.T_map_W)]).reshape(-1, 7)
        stamps = [int(ns) for ns, _ in traj]
        with self._lock:
            n_old = len(self._path)
            k = min(len(stamps), n_old)
            if all(stamps[i] == self._path[i][0] for i in range(k)):
                # same frames: touch only the poses that moved (messages are costly to build). Only the first k
                # entries: with the multi-threaded executor the trajectory snapshot may hold frames the frontend has
                # not appended yet (it appends them itself, adding them here too duplicated them), or the frontend
                # may have appended frames after the snapshot (kept as they are).
                old = np.array([row for _, row in self._path[:k]]).reshape(-1, 7)
                moved = np.nonzero(np.any(new[:k] != old, axis=1))[0]
                for i in moved:
                    pose = self._path_msgs[i].pose
                    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in new[i, :3])
                    o = pose.orientation
                    o.x, o.y, o.z, o.w = (float(v) for v in new[i, 3:])
                self._path = [(stamps[i], new[i]) for i in range(k)] + self._path[k:]
            else:
                self._path_msgs = [conv.pose_stamped_msg((new[i, :3], new[i, 3:]), conv.ns_to_stamp(ns),
                                                         self.p.map_frame) for i, ns in enumerate(stamps)]
                self._path = [(ns, new[i]) for i, ns in enumerate(stamps)]
            self._path_version = version

    def _publish_path(self, stamp: Time, force: bool = False) -> None:
        """Publish ``~/path`` now if ``force`` or ``path_publish_period`` elapsed, else mark it pending."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._path_sent_at < float(self.p.path_publish_period):
                self._path_dirty = True
                return
            msg = PathMsg(header=Header(stamp=stamp, frame_id=self.p.map_frame), poses=list(self._path_msgs))
            self._path_dirty = False
            self._path_sent_at = now
            self.pub_path.publish(msg)   # serialized under the lock: the backend updates the pose messages in place

    # ------------------------------------------------------------------------------------------------ backend
    def _on_backend_timer(self) -> None:
        if self._path_dirty and self._last_stamp is not None:
            self._publish_path(self._last_stamp)
        if self.system is None or self.paused or self.p.sync_backend:
            return
        try:
            did = self.system.backend_step()
        except Exception as exc:  # noqa: BLE001 - keep the node alive, report
            self.counters["errors"] += 1
            self.get_logger().error(f"backend step failed: {type(exc).__name__}: {exc}")
            return
        if did:
            before = self._path_version
            self._refresh_path_if_moved()
            if self._path_version != before and self._last_stamp is not None:
                self._publish_path(self._last_stamp)

    def _on_map_timer(self) -> None:
        if self.system is None or self._last_stamp is None:
            return
        version = int(self.system.map_version)
        if version != self._kf_version_published:
            self._publish_keyframes()
            self._kf_version_published = version
        # tracked frames are fused into keyframe pointmaps: a new processed frame also counts as a change
        if self._map_key() == self._map_version_published and not self._dirty_map:
            return
        if self.pub_map.get_subscription_count() == 0:
            return  # computed when someone listens (the publisher is transient-local)
        self.publish_map()

    def publish_map(self) -> int:
        """Compute and publish ``~/map`` now; return the number of points."""
        version = self._map_key()
        xyz, rgb = self.system.map_points(float(self.p.map_conf_threshold), float(self.p.map_voxel_size))
        n_max = int(self.p.map_max_points)
        if n_max > 0 and len(xyz) > n_max:
            idx = np.linspace(0, len(xyz) - 1, n_max).astype(np.int64)
            xyz, rgb = xyz[idx], rgb[idx]
        R = conv.quat_to_matrix(self.T_map_W[1])
        xyz_map = (np.asarray(xyz, np.float64) @ R.T + self.T_map_W[0]).astype(np.float32)
        self.pub_map.publish(conv.xyzrgb_to_cloud(xyz_map, np.asarray(rgb, np.uint8), self._last_stamp,
                                                  self.p.map_frame))
        self._map_version_published = version
        self._dirty_map = False
        return len(xyz_map)

    def _map_key(self) -> tuple[int, int]:
        return int(self.system.map_version), int(self.counters["processed"])

    def _publish_keyframes(self) -> None:
        kfs = self.system.keyframe_trajectory()
        poses = _world_poses_to_map(_stack_sim3([T for _, T in kfs]), self.T_map_W)
        stamp = self._last_stamp
        self.pub_kf.publish(conv.pose_array_msg(poses, stamp, self.p.map_frame))
        self.pub_kf_markers.publish(conv.frusta_markers(poses, stamp, self.p.map_frame,
                                                        size=float(self.p.frustum_size)))

    # -------------------------------------------------------------------------------------------- diagnostics
    def diagnostics(self) -> DiagnosticArray:
        """Build the ``/diagnostics`` message (input/processing rate, drops, tracking state, keyframes, memory)."""
        now = time.monotonic()
        with self._lock:
            c = dict(self.counters)
            in_rate, proc_rate = self._in_rate.rate(now), self._proc_rate.rate(now)
        state = int(getattr(self.system, "state", 0)) if self.system is not None else -1
        n_kf = len(self.system.keyframes()) if self.system is not None else 0
        level, message = DiagnosticStatus.OK, "tracking"
        if self.system is None:
            level, message = DiagnosticStatus.WARN, "waiting for camera_info (use_calib)"
        elif self.paused:
            level, message = DiagnosticStatus.OK, "paused"
        elif state == 2:
            level, message = DiagnosticStatus.WARN, "lost: relocalizing"
        elif state == 0:
            level, message = DiagnosticStatus.OK, "waiting for the first image"
        if c["errors"]:
            level, message = DiagnosticStatus.ERROR, f"{c['errors']} tracking/backend errors"
        values = {
            "input_rate_hz": f"{in_rate:.2f}", "processing_rate_hz": f"{proc_rate:.2f}",
            "frames_received": c["received"], "frames_processed": c["processed"], "frames_dropped": c["dropped"],
            "frames_malformed": c["malformed"], "frames_out_of_order": c["out_of_order"],
            "frames_skipped_paused": c["skipped_paused"], "frames_waiting_for_calib": c["waiting_for_calib"],
            "errors": c["errors"], "frame_policy": self.p.frame_policy, "tracking_state": MODE_NAMES.get(state, "NONE"),
            "keyframes": n_kf, "mean_tracking_time_s": f"{np.mean(self._track_time):.4f}" if self._track_time else "",
            "gpu_memory_allocated_mb": self._gpu_memory(),
        }
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: SLAM", message=message,
                                  hardware_id=str(self.p.device),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        return DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status])

    @staticmethod
    def _gpu_memory() -> str:
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                return f"{torch.cuda.memory_allocated() / 2**20:.1f}"
        except Exception:  # noqa: BLE001
            pass
        return "n/a"

    def _on_diagnostics_timer(self) -> None:
        self.pub_diag.publish(self.diagnostics())

    # ---------------------------------------------------------------------------------------------- services
    def _srv_reset(self, request, response):
        if self.system is None:
            response.success, response.message = False, "no SLAM system yet (waiting for camera_info)"
            return response
        self.system.reset()
        with self._lock:
            self._path, self._path_msgs = [], []
            self._last_stamp_ns = None
            self._path_version = int(self.system.map_version)
            self._last_result = None
        self._map_version_published = None
        if self._last_stamp is not None:
            self._publish_path(self._last_stamp, force=True)
        self.get_logger().info("SLAM reset")
        response.success, response.message = True, "reset"
        return response

    def save_map(self, output_dir: str | Path | None = None) -> list[Path]:
        """Write ``map.ply`` (map frame = SLAM world), ``trajectory.txt`` (TUM, every frame) and ``keyframes.txt``
        (TUM) into ``output_dir`` (parameter by default). Returns the written paths. Poses in the TUM files are the
        SLAM world's ``T_WC`` (OpenCV optical axes, as upstream MASt3R-SLAM writes them)."""
        from mast3r_slam_ros.io.export import write_ply, write_tum

        out = Path(output_dir or self.p.output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        xyz, rgb = self.system.map_points(float(self.p.map_conf_threshold), float(self.p.map_voxel_size))
        written = [out / "map.ply", out / "trajectory.txt", out / "keyframes.txt"]
        write_ply(written[0], xyz, rgb)
        for path, traj in ((written[1], self.system.trajectory()), (written[2], self.system.keyframe_trajectory())):
            write_tum(path, [int(ns) for ns, _ in traj], _stack_sim3([T for _, T in traj]))
        return written

    def _srv_save_map(self, request, response):
        if self.system is None:
            response.success, response.message = False, "no SLAM system yet (waiting for camera_info)"
            return response
        try:
            files = self.save_map()
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            response.success, response.message = False, f"save failed: {type(exc).__name__}: {exc}"
            self.get_logger().error(response.message)
            return response
        response.success, response.message = True, ";".join(str(f) for f in files)
        self.get_logger().info(f"saved {response.message}")
        return response

    def _srv_pause(self, request, response):
        self.paused = True
        response.success, response.message = True, "paused"
        return response

    def _srv_resume(self, request, response):
        self.paused = False
        response.success, response.message = True, "resumed"
        return response

    # ------------------------------------------------------------------------------------------------ shutdown
    def on_shutdown(self) -> None:
        """Optional save on exit (parameter ``save_on_exit``); errors are logged, not raised."""
        if self.p.save_on_exit and self.system is not None and self.counters["processed"] > 0:
            try:
                files = self.save_map()
                print(f"[{self.get_name()}] saved on exit: {', '.join(str(f) for f in files)}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"[{self.get_name()}] save on exit failed: {type(exc).__name__}: {exc}", flush=True)


def make_executor(kind: str):
    """``single_threaded`` -> SingleThreadedExecutor; ``multi_threaded`` -> MultiThreadedExecutor(2 threads)."""
    if kind == "single_threaded":
        return SingleThreadedExecutor()
    if kind == "multi_threaded":
        return MultiThreadedExecutor(num_threads=2)
    raise ValueError(f"executor must be single_threaded or multi_threaded, got '{kind}'")


def spin_node(node: SlamNode) -> None:
    """Spin ``node`` with the executor its ``executor`` parameter names, until shutdown or SIGINT/SIGTERM.

    SIGINT/SIGTERM only set a flag (Python handlers run between callbacks, never inside one); the loop then leaves
    and the caller saves and shuts down in order. Letting rclpy's own handler shut the context down while a callback
    was publishing crashed the process now and then (seen on Jazzy: exit code -11 after SIGINT). Must run in the main
    thread when signals are to be handled (otherwise it spins until the context shuts down).
    """
    executor = make_executor(node.p.executor)
    executor.add_node(node)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        while not stop.is_set() and rclpy.ok(context=node.context):
            executor.spin_once(timeout_sec=0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        executor.shutdown(timeout_sec=1.0)


def main(args: list[str] | None = None, **node_kwargs: Any) -> int:
    """Console-script entry point (``slam_node``): init, build the node, spin, clean shutdown on SIGINT/SIGTERM.

    ``node_kwargs`` go to :class:`SlamNode` (test entry scripts inject a predictor this way). Returns the exit code:
    0 on a clean shutdown, 1 if the model or parameters are invalid.
    """
    try:  # our own SIGINT/SIGTERM handling in spin_node (rclpy >= Humble has SignalHandlerOptions)
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):
        rclpy.init(args=args)
    node = None
    rc = 0
    try:
        node = SlamNode(**node_kwargs)
        spin_node(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ModelLoadError, ValueError) as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(exc))
        rc = 1
    finally:
        if node is not None:
            node.on_shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
