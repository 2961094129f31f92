"""Parameters of the ``mast3r_slam`` node: one table (name, default, description, range / choices, read-only).

The table is the single source of truth: the node declares exactly these, ``config/mast3r_slam.yaml`` sets a subset,
the launch files pass a subset, ``docs/ros.md`` documents them, and the tests check all four agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParamSpec", "PARAMETERS", "CHOICES", "NodeParams"]


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: ``default`` fixes the ROS type (bool/int/float/str/list of float)."""

    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None      # inclusive numeric range
    step: float = 0                                # integer/float step of the range (0 = any)
    choices: tuple[str, ...] | None = None         # allowed values of a string parameter
    read_only: bool = True                         # False: may change at run time (ros2 param set)


PARAMETERS: tuple[ParamSpec, ...] = (
    # --- model and SLAM core (read once at start-up)
    ParamSpec("checkpoint", "", "MASt3R checkpoint: path of the official .pth/.safetensors file, or a Hugging Face "
              "repo id. Loaded once at start-up; the node exits with an error if it is missing."),
    ParamSpec("device", "auto", "torch device for the network and the SLAM core: auto (cuda if available), cuda, "
              "cuda:N or cpu."),
    ParamSpec("precision", "fp32", "network precision.", choices=("fp32", "tf32", "bf16", "fp16")),
    ParamSpec("head_precision", "fp32", "compute dtype of the heads' DPT convolutions and local-feature MLP (final "
              "output conv and post-processing stay fp32).", choices=("fp32", "bf16", "fp16")),
    ParamSpec("kernel_backend", "auto", "matching / Gauss-Newton kernels: CUDA extension or PyTorch.",
              choices=("auto", "cuda", "torch")),
    ParamSpec("config_file", "", "SLAM configuration YAML (upstream base.yaml layout); empty = built-in defaults."),
    ParamSpec("img_size", 512, "network image size (long side): 512 or 224.", range=(224, 512), step=288),
    ParamSpec("use_calib", False, "calibrated mode: wait for camera_info with a valid K, undistort the images and use "
              "pixel/depth residuals; otherwise uncalibrated ray residuals."),
    ParamSpec("max_keyframes", 2000, "cap on stored keyframes (bounds GPU memory).", range=(2, 1_000_000), step=1),
    ParamSpec("loop_closure", True, "retrieval-based loop closure in the backend."),
    # --- input
    ParamSpec("image_qos", "sensor_data", "QoS of the image / camera_info subscriptions: sensor_data (best effort), "
              "reliable, or system_default.", choices=("sensor_data", "reliable", "system_default")),
    ParamSpec("image_queue_size", 5, "history depth of the image subscriptions.", range=(1, 10_000), step=1),
    ParamSpec("subscribe_compressed", False, "also subscribe to image/compressed (sensor_msgs/CompressedImage)."),
    # --- execution
    ParamSpec("executor", "single_threaded", "single_threaded: tracking and backend interleave on one thread; "
              "multi_threaded: they run concurrently (2 threads).", choices=("single_threaded", "multi_threaded")),
    ParamSpec("frame_policy", "latest", "latest: process only the newest waiting image and count the skipped ones "
              "as drops (live cameras); all: process every image (bags, evaluation).", choices=("latest", "all"),
              read_only=False),
    ParamSpec("sync_backend", False, "run the backend to completion after every frame, in the frontend callback "
              "(deterministic; the upstream evaluation setting)."),
    ParamSpec("backend_period", 0.05, "period of the backend timer in seconds.", range=(0.001, 10.0)),
    # --- outputs
    ParamSpec("map_publish_period", 1.0, "period of the map check; the cloud is published only when the map "
              "changed (seconds).", range=(0.05, 3600.0)),
    ParamSpec("map_conf_threshold", 1.5, "minimum mean confidence of a map point.", range=(0.0, 1.0e6),
              read_only=False),
    ParamSpec("map_voxel_size", 0.0, "voxel size of the published map in map units; 0 = no voxel filter.",
              range=(0.0, 1.0e6), read_only=False),
    ParamSpec("map_max_points", 500_000, "at most this many points in ~/map (uniform stride subsample); 0 = all.",
              range=(0, 1_000_000_000), step=1, read_only=False),
    ParamSpec("path_publish_period", 0.2, "minimum time between two ~/path messages in seconds (the path holds every "
              "frame; a pending update is sent by the backend timer); 0 = after every frame.", range=(0.0, 3600.0),
              read_only=False),
    ParamSpec("diagnostics_period", 1.0, "period of /diagnostics in seconds.", range=(0.05, 3600.0)),
    ParamSpec("frustum_size", 0.05, "size of the keyframe frusta in ~/keyframes/markers (map units).",
              range=(0.0, 1.0e6), read_only=False),
    # --- frames and TF
    ParamSpec("map_frame", "map", "fixed frame of every output."),
    ParamSpec("camera_frame", "", "camera optical frame; empty = the image header's frame_id "
              "(camera_optical_frame if that is empty too)."),
    ParamSpec("odom_frame", "", "REP-105 odom frame; with base_frame set, TF is map->odom(->base_frame)."),
    ParamSpec("base_frame", "", "robot base frame; set it to publish the robot pose via the static camera_mount "
              "instead of the camera pose."),
    ParamSpec("camera_mount", [0.0, 0.0, 0.0, -0.5, 0.5, -0.5, 0.5], "static pose of the camera optical frame in "
              "base_frame: [x, y, z, qx, qy, qz, qw] (default: optical axes at the base origin)."),
    ParamSpec("publish_odom_tf", True, "with odom_frame and base_frame set: publish odom->base_frame too (the SLAM "
              "pose is the odometry; map->odom is identity). false: another node publishes odom->base_frame, "
              "looked up with tf2_ros (not available in pip-only environments)."),
    ParamSpec("map_orientation", "rep103", "rep103: map axes x forward, y left, z up relative to the first camera; "
              "optical: map = first camera's optical frame (x right, y down, z forward).",
              choices=("rep103", "optical")),
    ParamSpec("publish_tf", True, "publish TF.", read_only=False),
    # --- persistence
    ParamSpec("output_dir", "mast3r_slam_output", "folder of ~/save_map (map.ply, trajectory.txt, "
              "keyframes.txt)."),
    ParamSpec("save_on_exit", False, "save the map and trajectories into output_dir on shutdown."),
)

CHOICES = {p.name: p.choices for p in PARAMETERS if p.choices}


@dataclass
class NodeParams:
    """The parameter values read at start-up (attribute per parameter)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None
