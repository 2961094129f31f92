"""``mast3r-slam-ros replay <bag> [--rate R] [--record OUT_BAG]``: play a rosbag2's camera topics through rclpy.

A substitute for ``ros2 bag play`` / ``ros2 bag record`` where the ros2 CLI is missing (pip installs, Windows without
the rosbag2 plugins): the image (``sensor_msgs/Image``, ``CompressedImage``) and ``CameraInfo`` messages of the bag are
published **as stored** (serialized CDR bytes, so header stamps are the recorded ones), paced by their bag receive
times divided by ``--rate``. ``--record`` subscribes to the node's outputs (raw CDR) and writes them with ``rosbags``
into a new rosbag2 (version 8 sqlite3, Humble-readable); the bag time of each recorded message is its header stamp
when it has one (so outputs line up with the inputs) and the receive time otherwise.

Needs rclpy (ROS 2 sourced, or ``tools/setup_ros_env.py``). Exit code 0 when every message was published.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

#: default outputs recorded with ``--record`` (the node's topics with node name ``mast3r_slam``)
DEFAULT_RECORD = ("/mast3r_slam/odometry", "/mast3r_slam/pose", "/mast3r_slam/path", "/mast3r_slam/map",
                  "/mast3r_slam/keyframes", "/tf", "/diagnostics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sub-command's options."""
    parser.add_argument("bag", type=Path, help="rosbag2 directory (sqlite3 or mcap)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback rate factor (default 1.0)")
    parser.add_argument("--topics", nargs="*", default=None,
                        help="bag topics to publish (default: every Image, CompressedImage and CameraInfo topic)")
    parser.add_argument("--remap", action="append", default=[], metavar="FROM:=TO",
                        help="publish bag topic FROM on TO (repeatable), e.g. /camera/image_raw:=/image")
    parser.add_argument("--qos", choices=("reliable", "sensor_data"), default="reliable",
                        help="publisher reliability (default reliable: matches best-effort and reliable subscribers; "
                             "large best-effort images can be lost between processes)")
    parser.add_argument("--wait-for-subscribers", type=float, default=10.0, metavar="SEC",
                        help="wait up to SEC seconds until every image topic has a subscriber (0: do not wait)")
    parser.add_argument("--record", type=Path, default=None, metavar="OUT_BAG",
                        help="record the outputs into this new rosbag2 directory")
    parser.add_argument("--record-topics", nargs="*", default=list(DEFAULT_RECORD),
                        help="topics recorded with --record (default: the mast3r_slam node's outputs, /tf, /diagnostics)")
    parser.add_argument("--linger", type=float, default=2.0, metavar="SEC",
                        help="keep recording at most SEC seconds after the last published message")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SEC",
                        help="with --record: stop lingering once no output (other than /diagnostics) arrived for SEC "
                             "seconds (0: linger fully)")
    parser.add_argument("--node-name", default="mast3r_slam_replay", help="name of the replay node")


def _msg_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rclpy message class (raises ImportError with the package name)."""
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"message type {msgtype} is not available in this Python ({exc}); install {pkg}") from exc


def _parse_remaps(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if ":=" not in item:
            raise ValueError(f"--remap expects FROM:=TO, got '{item}'")
        a, b = item.split(":=", 1)
        out[a] = b
    return out


def _stamp_ns_of(raw: bytes, msg_class) -> int | None:
    """Header stamp of a serialized message (None if it has no header)."""
    from rclpy.serialization import deserialize_message

    try:
        msg = deserialize_message(raw, msg_class)
    except Exception:  # noqa: BLE001
        return None
    hdr = getattr(msg, "header", None)
    if hdr is None:
        if hasattr(msg, "transforms") and msg.transforms:
            hdr = msg.transforms[0].header
        else:
            return None
    return int(hdr.stamp.sec) * 1_000_000_000 + int(hdr.stamp.nanosec)


def replay(bag: Path, rate: float = 1.0, topics: list[str] | None = None, remap: dict[str, str] | None = None,
           qos: str = "reliable", wait_for_subscribers: float = 10.0, record: Path | None = None,
           record_topics: list[str] | tuple[str, ...] = DEFAULT_RECORD, linger: float = 2.0, idle: float = 0.0,
           node_name: str = "mast3r_slam_replay", log=print) -> dict:
    """Publish the bag's camera topics (see module docstring); returns ``{"published": {topic: n},
    "recorded": {topic: n}}``. Calls ``rclpy.init`` if needed and shuts its own context down.

    Raises:
        FileNotFoundError: not a bag. ValueError: no camera topics / unknown topics / rate <= 0.
        FileExistsError: the record bag exists.
    """
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    from mast3r_slam_ros.ros.bagio import INPUT_TYPES, bag_topics, read_messages, typestore

    if rate <= 0:
        raise ValueError(f"--rate must be > 0, got {rate}")
    available = bag_topics(bag)
    if topics:
        unknown = [t for t in topics if t not in available]
        if unknown:
            raise ValueError(f"topics {unknown} are not in {bag} (it has {sorted(available)})")
        chosen = {t: available[t] for t in topics}
    else:
        chosen = {t: ty for t, ty in available.items() if ty in INPUT_TYPES}
    if not chosen:
        raise ValueError(f"{bag} has no Image/CompressedImage/CameraInfo topic (it has {available})")
    if record is not None and Path(record).exists():
        raise FileExistsError(f"record bag {record} already exists")
    remap = remap or {}

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(node_name, context=ctx)
    executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    profile = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE) if qos == "reliable" else \
        QoSProfile(depth=100, reliability=qos_profile_sensor_data.reliability)
    pubs = {t: node.create_publisher(_msg_class(ty), remap.get(t, t), profile) for t, ty in chosen.items()}

    writer, conns, recorded, rec_classes = None, {}, {}, {}
    if record is not None:
        from rosbags.rosbag2 import Writer

        ts = typestore()
        writer = Writer(Path(record), version=8)
        writer.open()
        record_types = {"/tf": "tf2_msgs/msg/TFMessage", "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray"}
        suffix_types = {"odometry": "nav_msgs/msg/Odometry", "pose": "geometry_msgs/msg/PoseStamped",
                        "path": "nav_msgs/msg/Path", "map": "sensor_msgs/msg/PointCloud2",
                        "keyframes": "geometry_msgs/msg/PoseArray", "markers": "visualization_msgs/msg/MarkerArray"}

        def make_cb(topic):
            def cb(raw):
                stamp = _stamp_ns_of(raw, rec_classes[topic])
                t = stamp if stamp is not None else time.time_ns()
                writer.write(conns[topic], t, bytes(raw))
                recorded[topic] = recorded.get(topic, 0) + 1
            return cb

        from rclpy.qos import DurabilityPolicy

        for topic in record_topics:
            ty = record_types.get(topic) or suffix_types.get(topic.rsplit("/", 1)[-1])
            if ty is None:
                raise ValueError(f"cannot tell the message type of record topic '{topic}'")
            rec_classes[topic] = _msg_class(ty)
            conns[topic] = writer.add_connection(topic, ty, typestore=ts)
            latched = topic.rsplit("/", 1)[-1] in ("path", "map", "keyframes", "markers")
            rqos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            node.create_subscription(rec_classes[topic], topic, make_cb(topic), rqos, raw=True)

    published: dict[str, int] = {t: 0 for t in chosen}
    try:
        if wait_for_subscribers > 0:
            end = time.monotonic() + wait_for_subscribers
            img_pubs = [p for t, p in pubs.items() if chosen[t] != "sensor_msgs/msg/CameraInfo"] or list(pubs.values())
            while time.monotonic() < end and not all(p.get_subscription_count() > 0 for p in img_pubs):
                executor.spin_once(timeout_sec=0.05)
            missing = [p.topic_name for p in img_pubs if p.get_subscription_count() == 0]
            if missing:
                log(f"[replay] warning: no subscriber on {missing} after {wait_for_subscribers} s; publishing anyway")
            if writer is not None:  # give the recorder's subscriptions time to match too
                end = time.monotonic() + min(wait_for_subscribers, 5.0)
                while time.monotonic() < end and not all(node.count_publishers(t) > 0 for t in conns):
                    executor.spin_once(timeout_sec=0.05)
        t_wall0, t_bag0 = None, None
        for topic, t_bag, raw in read_messages(bag, list(chosen), deserialize=False):
            if t_wall0 is None:
                t_wall0, t_bag0 = time.monotonic(), t_bag
            due = t_wall0 + (t_bag - t_bag0) / 1e9 / rate
            while True:
                left = due - time.monotonic()
                if left <= 0:
                    break
                executor.spin_once(timeout_sec=min(left, 0.01))
            pubs[topic].publish(raw)
            published[topic] += 1
        end = time.monotonic() + (linger if writer is not None else 0.2)
        def n_outputs():  # periodic topics (diagnostics) do not count as activity
            return sum(v for k, v in recorded.items() if k != "/diagnostics")
        last_rx = [time.monotonic(), n_outputs()]
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
            if writer is not None and idle > 0:
                n = n_outputs()
                if n != last_rx[1]:
                    last_rx = [time.monotonic(), n]
                elif time.monotonic() - last_rx[0] > idle:
                    break
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
        if writer is not None:
            writer.close()
    log(f"[replay] published {published}" + (f"; recorded {recorded} into {record}" if writer is not None else ""))
    return {"published": published, "recorded": recorded}


def main(args: argparse.Namespace) -> int:
    """Entry point of ``mast3r-slam-ros replay``."""
    try:
        replay(args.bag, args.rate, args.topics, _parse_remaps(args.remap), args.qos, args.wait_for_subscribers,
               args.record, args.record_topics, args.linger, args.idle, args.node_name)
    except ImportError as exc:
        print(f"replay needs ROS 2 (rclpy and the message packages): {exc}\n"
              "  Source your ROS 2 installation, or run `python tools/setup_ros_env.py <venv>` (Linux).",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - rclpy's ExternalShutdownException after SIGINT (its signal handler)
        if type(exc).__name__ == "ExternalShutdownException":
            return 130
        raise
    return 0
