"""rosbag2 image sources and writer (sqlite3 ``.db3`` and MCAP) through the pure-Python ``rosbags`` library.

Reading (``RosbagSource``): a bag folder (``metadata.yaml`` + storage files) or a single ``.db3`` / ``.mcap`` file,
opened with ``rosbags.highlevel.AnyReader`` (messages are decoded with the definitions stored in the bag, else the ROS 2
Humble type store). One image topic of type ``sensor_msgs/msg/Image`` (encodings ``rgb8 bgr8 mono8 rgba8 bgra8
mono16 8UC1 8UC3``) or ``sensor_msgs/msg/CompressedImage`` (anything OpenCV decodes: JPEG, PNG, ...), plus an optional
``sensor_msgs/msg/CameraInfo`` topic giving ``K``, ``D``, width and height (first message). Stamps come from the
message header (the bag receive time when the header stamp is zero); non-increasing stamps are dropped with a warning.

Writing (``write_image_bag``): samples to a new bag, raw (``Image``) or compressed (``CompressedImage``, JPEG or PNG),
with an optional ``CameraInfo`` per image; rosbag2 format version 8 by default (ROS 2 Humble reads it; version 9's QoS
serialization is not readable by Humble).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from mast3r_slam_ros.io.sources import CameraIntrinsics, ImageSource, Sample, to_rgb_u8

log = logging.getLogger(__name__)

__all__ = [
    "CAMERA_INFO_TYPE",
    "COMPRESSED_TYPE",
    "IMAGE_TYPE",
    "RosbagSource",
    "camera_info_to_intrinsics",
    "image_msg_to_rgb",
    "write_image_bag",
]

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"

_CHANNELS = {"rgb8": 3, "bgr8": 3, "8UC3": 3, "mono8": 1, "8UC1": 1, "rgba8": 4, "bgra8": 4, "8UC4": 4,
             "mono16": 1, "16UC1": 1}


def image_msg_to_rgb(msg, msgtype: str) -> np.ndarray:
    """Decode a ``sensor_msgs/msg/Image`` or ``CompressedImage`` (rosbags message object) to ``[H,W,3]`` uint8 RGB.

    Raw images honour ``step`` (row padding) and ``is_bigendian`` (16-bit); ``8UC3`` is taken as BGR (OpenCV's
    convention). Raises ``ValueError`` for an unsupported encoding, a truncated buffer or an undecodable compressed
    payload.
    """
    data = np.asarray(msg.data, dtype=np.uint8)
    if msgtype == COMPRESSED_TYPE:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if img is None:
            raise ValueError(f"cannot decode CompressedImage (format {msg.format!r}, {data.size} bytes)")
        return to_rgb_u8(img, "bgr")  # OpenCV decodes colour JPEG / PNG payloads to BGR
    if msgtype != IMAGE_TYPE:
        raise ValueError(f"not an image message type: {msgtype}")
    enc = str(msg.encoding)
    if enc not in _CHANNELS:
        raise ValueError(f"unsupported Image encoding {enc!r} (supported: {', '.join(_CHANNELS)})")
    H, W, step = int(msg.height), int(msg.width), int(msg.step)
    ch = _CHANNELS[enc]
    bpp = 2 if enc in ("mono16", "16UC1") else 1
    row = W * ch * bpp
    if H <= 0 or W <= 0 or step < row or data.size < step * (H - 1) + row:
        raise ValueError(f"Image buffer of {data.size} bytes does not hold {W}x{H} {enc} with step {step}")
    rows = np.lib.stride_tricks.as_strided(data, shape=(H, row), strides=(step, 1))
    if bpp == 2:
        dt = np.dtype(">u2" if msg.is_bigendian else "<u2")
        img = np.ascontiguousarray(rows).view(dt).reshape(H, W).astype(np.uint16)
    else:
        img = np.ascontiguousarray(rows).reshape(H, W, ch) if ch > 1 else np.ascontiguousarray(rows).reshape(H, W)
    order = "rgb" if enc in ("rgb8", "rgba8") else "bgr"
    return to_rgb_u8(img, order)


def camera_info_to_intrinsics(msg) -> CameraIntrinsics:
    """``sensor_msgs/msg/CameraInfo`` -> ``CameraIntrinsics`` (``K = k``, ``dist = d`` for ``plumb_bob`` /
    ``rational_polynomial``). Raises ``ValueError`` for an empty K or another distortion model with non-zero D."""
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"CameraInfo has no valid K (k = {K.reshape(-1).tolist()})")
    d = np.asarray(msg.d, dtype=np.float64).reshape(-1)
    model = str(msg.distortion_model)
    if d.size and np.any(d != 0) and model not in ("plumb_bob", "rational_polynomial"):
        raise ValueError(f"CameraInfo distortion_model {model!r} is not supported (plumb_bob / rational_polynomial)")
    if not np.any(d != 0):
        d = np.zeros(0)
    return CameraIntrinsics(K, d, int(msg.width), int(msg.height))


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


class RosbagSource(ImageSource):
    """Images of one topic of a rosbag2 (sqlite3 or MCAP), see the module docstring.

    Args:
        path: bag folder (with ``metadata.yaml``) or a ``.db3`` / ``.mcap`` file.
        topic: image topic; default: the only ``Image`` / ``CompressedImage`` topic of the bag.
        camera_info_topic: ``CameraInfo`` topic; default: ``<namespace of topic>/camera_info`` if present, else the
            only CameraInfo topic, else none. ``""`` disables it. Its first message gives ``intrinsics`` (a message
            with an empty K is ignored with a warning).
        intrinsics: calibration that overrides the bag's CameraInfo.
        undistort, skip_corrupt, center_principal_point: see ``io.sources``.
    Raises:
        FileNotFoundError: missing path. ValueError: not a readable rosbag2 (corrupt), unknown topic (lists the image
        topics), no image topic, or several without ``topic``.
    """

    def __init__(self, path: str | Path, topic: str | None = None, camera_info_topic: str | None = None,
                 intrinsics: CameraIntrinsics | None = None, undistort: bool = False, skip_corrupt: bool = False,
                 center_principal_point: bool = True) -> None:
        path = Path(path)
        self.path = path
        self.name = path.name
        if not path.exists():
            raise FileNotFoundError(f"rosbag2 not found: {path}")
        reader = self._open()
        try:
            topics = {t: info.msgtype for t, info in reader.topics.items()}
            counts = {t: info.msgcount for t, info in reader.topics.items()}
            image_topics = sorted(t for t, ty in topics.items() if ty in (IMAGE_TYPE, COMPRESSED_TYPE))
            if topic is None:
                if len(image_topics) != 1:
                    raise ValueError(f"rosbag2 {path}: " + (
                        "has no sensor_msgs/Image or CompressedImage topic" if not image_topics else
                        f"has several image topics, choose one with topic=: {', '.join(image_topics)}")
                        + f" (all topics: {', '.join(f'{t} [{ty}]' for t, ty in sorted(topics.items()))})")
                topic = image_topics[0]
            if topic not in topics:
                raise ValueError(f"topic {topic!r} is not in rosbag2 {path}; image topics: "
                                 f"{', '.join(image_topics) or 'none'} (all topics: {', '.join(sorted(topics))})")
            if topics[topic] not in (IMAGE_TYPE, COMPRESSED_TYPE):
                raise ValueError(f"topic {topic!r} in {path} has type {topics[topic]}, not an image; image topics: "
                                 f"{', '.join(image_topics) or 'none'}")
            self.topic = topic
            self.msgtype = topics[topic]
            self._count = int(counts[topic])
            info_topic = self._pick_info_topic(topic, camera_info_topic, topics)
            self.camera_info_topic = info_topic
            if intrinsics is None and info_topic:
                conns = [c for c in reader.connections if c.topic == info_topic]
                for _, _, raw in reader.messages(connections=conns):
                    try:
                        intrinsics = camera_info_to_intrinsics(reader.deserialize(raw, CAMERA_INFO_TYPE))
                    except ValueError as e:  # e.g. an uncalibrated camera publishing K = 0
                        log.warning("%s: ignoring CameraInfo on %s: %s", self.name, info_topic, e)
                    break
        finally:
            reader.close()
        super().__init__(intrinsics, undistort, skip_corrupt, center_principal_point)

    @staticmethod
    def _pick_info_topic(topic: str, requested: str | None, topics: dict[str, str]) -> str | None:
        if requested == "":
            return None
        infos = sorted(t for t, ty in topics.items() if ty == CAMERA_INFO_TYPE)
        if requested is not None:
            if topics.get(requested) != CAMERA_INFO_TYPE:
                raise ValueError(f"camera_info topic {requested!r} is not a CameraInfo topic of the bag; "
                                 f"CameraInfo topics: {', '.join(infos) or 'none'}")
            return requested
        parts = topic.rstrip("/").split("/")
        for k in range(len(parts) - 1, 0, -1):  # /cam/image_raw/compressed -> /cam/image_raw/camera_info, /cam/...
            cand = "/".join(parts[:k]) + "/camera_info"
            if cand in infos:
                return cand
        return infos[0] if len(infos) == 1 else None

    def _open(self):
        from rosbags.highlevel import AnyReader

        try:
            reader = AnyReader([self.path], default_typestore=_typestore())
            reader.open()
        except FileNotFoundError:
            raise
        except Exception as e:  # rosbags raises several error types for unreadable / corrupt bags
            raise ValueError(f"cannot read rosbag2 {self.path}: {type(e).__name__}: {e}") from e
        return reader

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # pragma: no cover - explicit refusal
        raise TypeError("RosbagSource is not indexable; iterate over it")

    @property
    def stamps_ns(self) -> list[int]:  # pragma: no cover - not known without reading every message
        raise TypeError("RosbagSource stamps are only known while iterating")

    def __iter__(self) -> Iterator[Sample]:
        reader = self._open()
        try:
            conns = [c for c in reader.connections if c.topic == self.topic]
            last = None
            k = 0
            it = reader.messages(connections=conns)
            while True:
                try:
                    conn, t_bag, raw = next(it)
                except StopIteration:
                    return
                except Exception as e:
                    raise ValueError(f"rosbag2 {self.path}: cannot read message {k} of {self.topic}: "
                                     f"{type(e).__name__}: {e}") from e
                idx = k
                k += 1
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                    stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                    rgb = image_msg_to_rgb(msg, conn.msgtype)
                except Exception as e:
                    err = ValueError(f"rosbag2 {self.path}: message {idx} of {self.topic}: {e}")
                    if not self.skip_corrupt:
                        raise err from e
                    log.warning("%s: skipping: %s", self.name, err)
                    continue
                if stamp == 0:
                    stamp = int(t_bag)
                if last is not None and stamp <= last:
                    log.warning("%s: dropping message %d of %s, its stamp %d ns does not increase (previous %d ns)",
                                self.name, idx, self.topic, stamp, last)
                    continue
                last = stamp
                yield Sample(stamp, self._finish(rgb), idx, self.topic)
        finally:
            reader.close()

    def __repr__(self) -> str:
        return f"RosbagSource({str(self.path)!r}, topic={self.topic!r}, {self._count} messages)"


# ---------------------------------------------------------------------------------------------------------- writer
def write_image_bag(
    path: str | Path,
    samples: Iterable,
    topic: str = "/camera/image_raw",
    camera_info: CameraIntrinsics | None = None,
    fmt: str = "sqlite3",
    compressed: bool | str = False,
    encoding: str = "rgb8",
    frame_id: str = "camera_optical",
    camera_info_topic: str | None = None,
    version: int = 8,
    jpeg_quality: int = 95,
) -> Path:
    """Write images (and optionally a CameraInfo per image) to a new rosbag2 with ``rosbags``.

    Args:
        path: bag folder to create (must not exist).
        samples: iterable of ``Sample`` or ``(stamp_ns, rgb [H,W,3] uint8)``; stamps are written into the header and
            used as the bag time.
        topic: image topic. With ``compressed`` the message type is ``CompressedImage`` (use a ``.../compressed``
            name by convention).
        camera_info: if given, a ``CameraInfo`` (plumb_bob, ``K``, ``D``, projection ``[K|0]``) is written with every
            image on ``camera_info_topic`` (default: ``<image topic's namespace>/camera_info``).
        fmt: storage, "sqlite3" or "mcap".
        compressed: False (raw ``Image``), True / "jpeg" (JPEG, ``jpeg_quality``) or "png" (lossless).
        encoding: raw ``Image`` encoding: rgb8, bgr8, mono8 (luma of the RGB image), rgba8 or bgra8.
        frame_id: header frame id.
        version: rosbag2 format version (8 for ROS 2 Humble, or 9).
    Returns:
        ``Path`` of the bag folder.
    Raises:
        ValueError: bad argument or image; FileExistsError: ``path`` exists.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"rosbag2 output {path} exists already")
    plugins = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
    if fmt not in plugins:
        raise ValueError(f"fmt must be 'sqlite3' or 'mcap', got {fmt!r}")
    comp = {False: None, True: "jpeg", "jpeg": "jpeg", "png": "png"}.get(compressed, "bad")
    if comp == "bad":
        raise ValueError(f"compressed must be False, True, 'jpeg' or 'png', got {compressed!r}")
    if encoding not in ("rgb8", "bgr8", "mono8", "rgba8", "bgra8"):
        raise ValueError(f"unsupported encoding {encoding!r}")
    ts = _typestore()
    Image = ts.types[IMAGE_TYPE]
    CompressedImage = ts.types[COMPRESSED_TYPE]
    CameraInfo = ts.types[CAMERA_INFO_TYPE]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    ROI = ts.types["sensor_msgs/msg/RegionOfInterest"]
    if camera_info_topic is None:
        base = topic.rstrip("/")
        if base.endswith("/compressed"):
            base = base[: -len("/compressed")]
        ns = base.rsplit("/", 1)[0]
        camera_info_topic = (ns if ns else "") + "/camera_info"
    msgtype = COMPRESSED_TYPE if comp else IMAGE_TYPE
    with Writer(path, version=version, storage_plugin=plugins[fmt]) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=ts)
        info_conn = writer.add_connection(camera_info_topic, CAMERA_INFO_TYPE, typestore=ts) if camera_info else None
        for n, s in enumerate(samples):
            stamp, rgb = (s.stamp_ns, s.rgb) if isinstance(s, Sample) else (int(s[0]), s[1])
            rgb = np.asarray(rgb)
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"sample {n}: rgb must be [H,W,3] uint8, got {rgb.shape} {rgb.dtype}")
            stamp = int(stamp)
            header = Header(stamp=Time(sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000), frame_id=frame_id)
            H, W = rgb.shape[:2]
            if comp:
                ext = ".jpg" if comp == "jpeg" else ".png"
                params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if comp == "jpeg" else []
                ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
                if not ok:
                    raise ValueError(f"sample {n}: cannot encode {comp}")
                msg = CompressedImage(header=header, format=comp, data=np.asarray(buf, np.uint8).reshape(-1))
            else:
                if encoding == "rgb8":
                    arr = rgb
                elif encoding == "bgr8":
                    arr = rgb[..., ::-1]
                elif encoding == "mono8":
                    arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None]
                elif encoding == "rgba8":
                    arr = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
                else:
                    arr = np.concatenate([rgb[..., ::-1], np.full((H, W, 1), 255, np.uint8)], axis=2)
                arr = np.ascontiguousarray(arr)
                msg = Image(header=header, height=H, width=W, encoding=encoding, is_bigendian=0,
                            step=W * arr.shape[2], data=arr.reshape(-1))
            writer.write(conn, stamp, ts.serialize_cdr(msg, msgtype))
            if info_conn is not None:
                K = camera_info.K
                P = np.zeros((3, 4))
                P[:, :3] = K
                d = np.zeros(5)
                d[: min(5, camera_info.dist.size)] = camera_info.dist[:5]
                info = CameraInfo(header=header, height=camera_info.height, width=camera_info.width,
                                  distortion_model="plumb_bob",
                                  d=camera_info.dist.astype(np.float64) if camera_info.dist.size > 5 else d,
                                  k=K.reshape(-1).astype(np.float64), r=np.eye(3).reshape(-1),
                                  p=P.reshape(-1), binning_x=0, binning_y=0,
                                  roi=ROI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
                writer.write(info_conn, stamp, ts.serialize_cdr(info, CAMERA_INFO_TYPE))
    return path
