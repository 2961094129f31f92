"""rosbag2 files for the ROS layer with ``rosbags`` (no rclpy, no rosbag2 C++): write image bags, read topics.

Bags are written as rosbag2 **version 8** sqlite3 with the ROS 2 Humble typestore, which Humble's ``ros2 bag`` reads
(spec ros_test_env.md §5: Humble cannot parse v9's ``offered_qos_profiles`` list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["IMAGE_TYPES", "INPUT_TYPES", "typestore", "write_image_bag", "read_messages", "bag_topics"]

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INPUT_TYPES = IMAGE_TYPES + ("sensor_msgs/msg/CameraInfo",)


def typestore():
    """The ROS 2 Humble ``rosbags`` typestore (150 types incl. tf2_msgs, diagnostic_msgs, visualization_msgs)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def write_image_bag(path: str | Path, images: Sequence[np.ndarray] | Iterable[np.ndarray], stamps_ns: Sequence[int],
                    K: np.ndarray | None = None, image_topic: str = "/camera/image_raw",
                    info_topic: str = "/camera/camera_info", frame_id: str = "camera_optical_frame",
                    encoding: str = "rgb8", dist: Sequence[float] | None = None) -> Path:
    """Write ``images`` as ``sensor_msgs/Image`` (+ ``CameraInfo`` when ``K`` is given) into a new rosbag2.

    Args:
        path: bag directory to create (must not exist).
        images: ``[H, W, 3] uint8`` RGB (or ``[H, W]`` uint8 with ``encoding='mono8'``).
        stamps_ns: header stamps in nanoseconds, also used as the bag's receive times.
        K: ``[3, 3]`` intrinsics of the images, or None (no camera_info topic).
        encoding: ``rgb8``, ``bgr8`` or ``mono8``.
        dist: plumb_bob distortion ``[k1, k2, p1, p2, k3]`` (default zeros).
    Returns:
        ``Path`` of the bag.
    Raises:
        FileExistsError: ``path`` exists. ValueError: bad image shapes, encodings or lengths.
    """
    from rosbags.rosbag2 import Writer

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"bag {path} already exists")
    ts = typestore()
    Image = ts.types["sensor_msgs/msg/Image"]
    CameraInfo = ts.types["sensor_msgs/msg/CameraInfo"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    RegionOfInterest = ts.types["sensor_msgs/msg/RegionOfInterest"]
    images = list(images)
    if len(images) != len(stamps_ns):
        raise ValueError(f"{len(images)} images but {len(stamps_ns)} stamps")
    with Writer(path, version=8) as writer:
        c_img = writer.add_connection(image_topic, Image.__msgtype__, typestore=ts)
        c_info = writer.add_connection(info_topic, CameraInfo.__msgtype__, typestore=ts) if K is not None else None
        for img, ns in zip(images, stamps_ns):
            a = np.ascontiguousarray(img)
            if a.dtype != np.uint8:
                raise ValueError(f"images must be uint8, got {a.dtype}")
            if encoding == "mono8":
                if a.ndim != 2:
                    raise ValueError(f"mono8 needs [H, W] images, got {a.shape}")
                px, ch = a, 1
            elif encoding in ("rgb8", "bgr8") and a.ndim == 3 and a.shape[2] == 3:
                px, ch = (a if encoding == "rgb8" else np.ascontiguousarray(a[:, :, ::-1])), 3
            else:
                raise ValueError(f"cannot write {a.shape} as {encoding}")
            ns = int(ns)
            hdr = Header(stamp=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000), frame_id=frame_id)
            h, w = a.shape[:2]
            msg = Image(header=hdr, height=h, width=w, encoding=encoding, is_bigendian=0, step=w * ch,
                        data=px.reshape(-1).view(np.uint8))
            writer.write(c_img, ns, ts.serialize_cdr(msg, Image.__msgtype__))
            if c_info is not None:
                Kf = np.asarray(K, np.float64).reshape(9)
                P = np.zeros(12)
                P[[0, 1, 2, 4, 5, 6, 10]] = Kf[[0, 1, 2, 3, 4, 5, 8]]
                info = CameraInfo(header=hdr, height=h, width=w, distortion_model="plumb_bob",
                                  d=np.asarray(dist if dist is not None else np.zeros(5), np.float64), k=Kf,
                                  r=np.eye(3).reshape(9), p=P, binning_x=0, binning_y=0,
                                  roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
                writer.write(c_info, ns, ts.serialize_cdr(info, CameraInfo.__msgtype__))
    return path


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
