"""rosbag2 access for the ROS layer with ``rosbags`` (no rclpy, no rosbag2 C++): list topics, read raw messages.

Writing image bags: ``mast3r_slam_ros.io.rosbag.write_image_bag``. Recorded bags are rosbag2 **version 8** with the
ROS 2 Humble typestore, which Humble's ``ros2 bag`` reads (spec ros_test_env.md §5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["IMAGE_TYPES", "INPUT_TYPES", "typestore", "read_messages", "bag_topics"]

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INPUT_TYPES = IMAGE_TYPES + ("sensor_msgs/msg/CameraInfo",)


def typestore():
    """The ROS 2 Humble ``rosbags`` typestore (150 types incl. tf2_msgs, diagnostic_msgs, visualization_msgs)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def bag_topics(path: str | Path) -> dict[str, str]:
    """``{topic: msgtype}`` of a rosbag2 (sqlite3 or mcap). Raises FileNotFoundError if ``path`` is not a bag."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not (path / "metadata.yaml").exists():
        raise FileNotFoundError(f"{path} is not a rosbag2 directory (no metadata.yaml)")
    with Reader(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def read_messages(path: str | Path, topics: Sequence[str] | None = None, deserialize: bool = True
                  ) -> Iterator[tuple[str, int, object]]:
    """Yield ``(topic, bag_time_ns, message)`` in bag order (``message`` = rosbags object, or raw CDR bytes when
    ``deserialize`` is False)."""
    from rosbags.rosbag2 import Reader

    ts = typestore()
    with Reader(Path(path)) as reader:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        for conn, t, raw in reader.messages(connections=conns):
            yield conn.topic, int(t), (ts.deserialize_cdr(raw, conn.msgtype) if deserialize else bytes(raw))
