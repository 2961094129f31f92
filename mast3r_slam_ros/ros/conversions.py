"""ROS 2 message <-> NumPy conversions for the node (NumPy only: no cv_bridge, no sensor_msgs_py).

Everything here is vectorized and Humble-compatible: byte payloads are assigned as ``array.array('B', ...)`` (the
fast path of the generated message setters, also under Humble's always-on field checks and Jazzy's
``ROS_PYTHON_CHECK_FIELDS=1``); received payloads are read with ``np.frombuffer`` honouring ``step`` padding
(spec ros_test_env.md §4, Appendix B).

Frames (docs/design.md "Frames and conventions", REP 103/105): SLAM poses are ``T_WC`` (camera -> SLAM world) in the
OpenCV optical convention (x right, y down, z forward), Sim(3) up to scale. The ROS ``map`` frame is either the SLAM
world itself (``map_orientation="optical"``) or the SLAM world rotated into REP-103 axes (``"rep103"``: x forward,
y left, z up relative to the first camera), ``T_map_W = R_REP103_OPTICAL``. The child frame of every pose is the camera
*optical* frame. TF and ``geometry_msgs/Pose`` are rigid: the Sim(3) scale of ``T_WC`` (the scale of the camera frame,
not of the map) is dropped; translations are in SLAM map units (up to one global scale, monocular).
"""

from __future__ import annotations

import array
from typing import Any, Iterable, Sequence

import numpy as np

from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseArray, PoseStamped, Quaternion, Transform, TransformStamped, Vector3
from nav_msgs.msg import Odometry, Path
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

__all__ = [
    "ImageConversionError", "SUPPORTED_ENCODINGS", "image_to_rgb", "rgb_to_image", "compressed_to_rgb",
    "rgb_to_compressed", "stamp_to_ns", "ns_to_stamp", "sim3_to_rt", "matrix_to_quat", "quat_to_matrix",
    "compose", "invert", "R_REP103_OPTICAL", "map_from_world", "pose_msg", "transform_msg", "odometry_msg",
    "pose_stamped_msg", "path_msg", "pose_array_msg", "frusta_markers", "xyzrgb_to_cloud", "cloud_to_xyzrgb",
    "transform_to_rt",
]


class ImageConversionError(ValueError):
    """An image message cannot be converted (unsupported encoding, wrong data length, zero size, bad step)."""


#: encoding -> (channels, index order that yields RGB from the stored channels, or None for mono)
SUPPORTED_ENCODINGS: dict[str, tuple[int, tuple[int, ...] | None]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, None),
    "8UC1": (1, None),
    "8UC3": (3, (2, 1, 0)),   # OpenCV convention: 3-channel 8-bit images are BGR
    "8UC4": (4, (2, 1, 0)),
}
#: encodings known to carry more than 8 bits per channel: rejected with a clear message
_WIDE_ENCODINGS = ("mono16", "rgb16", "bgr16", "rgba16", "bgra16", "16UC", "16SC", "32FC", "32SC", "64FC")


# --------------------------------------------------------------------------------------------------------- images
def image_to_rgb(msg: Image) -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` to an RGB image.

    Args:
        msg: Image with encoding rgb8, bgr8, rgba8, bgra8, mono8 (or 8UC1/8UC3/8UC4); rows may be padded
            (``step >= width * channels``).
    Returns:
        ``[H, W, 3] uint8`` C-contiguous RGB array (mono is replicated to three channels; alpha is dropped).
    Raises:
        ImageConversionError: zero height/width, unsupported or 16/32-bit encoding, ``step`` smaller than a row,
            or ``len(data) != step * height``.
    """
    h, w, step, enc = int(msg.height), int(msg.width), int(msg.step), str(msg.encoding)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"image has zero size ({w}x{h})")
    if enc not in SUPPORTED_ENCODINGS:
        if enc.lower().startswith(_WIDE_ENCODINGS) or enc.startswith(_WIDE_ENCODINGS):
            raise ImageConversionError(f"encoding '{enc}' has more than 8 bits per channel; MASt3R-SLAM needs an "
                                       f"8-bit color or mono image (rgb8, bgr8, rgba8, bgra8, mono8)")
        raise ImageConversionError(f"unsupported encoding '{enc}' (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    ch, order = SUPPORTED_ENCODINGS[enc]
    if step < w * ch:
        raise ImageConversionError(f"step {step} is smaller than width*channels = {w * ch} for '{enc}'")
    buf = np.frombuffer(msg.data, dtype=np.uint8) if len(msg.data) else np.empty(0, np.uint8)
    if buf.size != step * h:
        raise ImageConversionError(f"data has {buf.size} bytes, expected step*height = {step}*{h} = {step * h}")
    px = buf.reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    if order is None:
        return np.ascontiguousarray(np.repeat(px, 3, axis=2))
    return np.ascontiguousarray(px[:, :, list(order)])


def rgb_to_image(rgb: np.ndarray, encoding: str = "rgb8", header: Header | None = None) -> Image:
    """Build a ``sensor_msgs/Image`` from an RGB (or mono) uint8 array.

    Args:
        rgb: ``[H, W, 3] uint8`` RGB, or ``[H, W] uint8`` for ``mono8``.
        encoding: one of rgb8, bgr8, rgba8 (alpha 255), bgra8, mono8 (input must then be ``[H, W]``).
        header: optional header (stamp, frame_id) copied into the message.
    Returns:
        Image with ``step = width * channels`` (no padding), ``is_bigendian = 0``.
    Raises:
        TypeError: if ``rgb`` is not uint8. ValueError: wrong shape or unsupported encoding.
    """
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise TypeError(f"rgb_to_image expects uint8, got {a.dtype}")
    if encoding == "mono8":
        if a.ndim != 2:
            raise ValueError(f"mono8 expects [H, W], got shape {a.shape}")
        px = a
    else:
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{encoding} expects [H, W, 3] RGB, got shape {a.shape}")
        if encoding == "rgb8":
            px = a
        elif encoding == "bgr8":
            px = a[:, :, ::-1]
        elif encoding in ("rgba8", "bgra8"):
            c = a if encoding == "rgba8" else a[:, :, ::-1]
            px = np.concatenate([c, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=2)
        else:
            raise ValueError(f"unsupported encoding '{encoding}' for rgb_to_image")
    px = np.ascontiguousarray(px)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(px.shape[0]), int(px.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(px.shape[1] * (px.shape[2] if px.ndim == 3 else 1))
    msg.data = array.array("B", px.tobytes())
    return msg


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG/PNG as written by image_transport) to ``[H, W, 3] uint8`` RGB.

    Raises:
        ImageConversionError: empty payload, undecodable data, or a 16-bit PNG.
    """
    import cv2  # a codec is needed here; OpenCV is a project dependency (not cv_bridge)

    if len(msg.data) == 0:
        raise ImageConversionError(f"compressed image (format '{msg.format}') has no data")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageConversionError(f"cannot decode compressed image (format '{msg.format}', {buf.size} bytes)")
    if img.dtype != np.uint8:
        raise ImageConversionError(f"compressed image decodes to {img.dtype}; need 8 bits per channel")
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img[:, :, ::-1])  # OpenCV decodes to BGR


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", header: Header | None = None, quality: int = 95
                      ) -> CompressedImage:
    """Encode ``[H, W, 3] uint8`` RGB as a ``sensor_msgs/CompressedImage`` (``fmt`` 'jpeg' or 'png')."""
    import cv2

    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"rgb_to_compressed expects [H, W, 3] uint8, got {a.dtype} {a.shape}")
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(fmt)
    if ext is None:
        raise ValueError(f"unsupported compressed format '{fmt}' (jpeg or png)")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, enc = cv2.imencode(ext, np.ascontiguousarray(a[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f"OpenCV failed to encode the image as {fmt}")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = "jpeg" if ext == ".jpg" else "png"
    msg.data = array.array("B", enc.tobytes())
    return msg


# ---------------------------------------------------------------------------------------------------------- time
def stamp_to_ns(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """Integer nanoseconds (>= 0) -> ``builtin_interfaces/Time``."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"negative stamp {ns} ns")
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# ------------------------------------------------------------------------------------------------------- poses
def _as_sim3_data(T: Any) -> np.ndarray:
    data = getattr(T, "data", T)
    if hasattr(data, "detach"):
        data = data.detach().cpu().double().numpy()
    a = np.asarray(data, dtype=np.float64).reshape(-1)
    if a.size != 8:
        raise ValueError(f"expected one Sim(3) element [tx,ty,tz,qx,qy,qz,qw,s] (8 values), got {a.size}")
    return a


def sim3_to_rt(T: Any) -> tuple[np.ndarray, np.ndarray]:
    """One Sim(3) (``lie.Sim3`` of shape [1] or [], a tensor or array of 8 values) -> rigid part ``(t [3], q [4])``.

    ``t`` is the translation (map units), ``q`` the unit quaternion (x, y, z, w), both float64; the scale is dropped
    (see module docstring). Layout: lietorch ``[tx, ty, tz, qx, qy, qz, qw, s]`` (docs/interfaces.md).
    """
    a = _as_sim3_data(T)
    q = a[3:7]
    n = np.linalg.norm(q)
    if not np.isfinite(a[:7]).all() or n < 1e-12:
        raise ValueError(f"invalid Sim(3) element {a.tolist()}")
    return a[:3].copy(), q / n


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) ``[..., 4]`` (x, y, z, w) -> rotation matrices ``[..., 3, 3]`` (float64)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], axis=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """Rotation matrix ``[3, 3]`` -> unit quaternion ``[4]`` (x, y, z, w), w >= 0 (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q = q / np.linalg.norm(q)
    return -q if q[3] < 0 else q


def compose(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rigid composition ``a * b`` of ``(t, q)`` pairs: ``R = R_a R_b``, ``t = R_a t_b + t_a``."""
    Ra, Rb = quat_to_matrix(a[1]), quat_to_matrix(b[1])
    return Ra @ np.asarray(b[0], np.float64) + np.asarray(a[0], np.float64), matrix_to_quat(Ra @ Rb)


def invert(a: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of a rigid ``(t, q)``: ``(-R^T t, q^-1)``."""
    R = quat_to_matrix(a[1])
    return -R.T @ np.asarray(a[0], np.float64), matrix_to_quat(R.T)


#: rotation taking OpenCV optical axes (x right, y down, z forward) to REP-103 body axes (x forward, y left, z up)
R_REP103_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def map_from_world(map_orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Rigid ``T_map_W`` for ``map_orientation`` 'rep103' (rotation :data:`R_REP103_OPTICAL`) or 'optical' (identity)."""
    if map_orientation == "optical":
        return np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0])
    if map_orientation == "rep103":
        return np.zeros(3), matrix_to_quat(R_REP103_OPTICAL)
    raise ValueError(f"map_orientation must be 'rep103' or 'optical', got '{map_orientation}'")


def transform_to_rt(tf: Transform | Pose) -> tuple[np.ndarray, np.ndarray]:
    """``geometry_msgs/Transform`` or ``Pose`` -> ``(t [3], q [4])`` float64."""
    t = getattr(tf, "translation", None) or getattr(tf, "position")
    r = getattr(tf, "rotation", None) or getattr(tf, "orientation")
    return np.array([t.x, t.y, t.z]), np.array([r.x, r.y, r.z, r.w])


def pose_msg(rt: tuple[np.ndarray, np.ndarray]) -> Pose:
    """``(t [3], q [4] xyzw)`` -> ``geometry_msgs/Pose``."""
    t, q = rt
    return Pose(position=Point(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def transform_msg(rt: tuple[np.ndarray, np.ndarray], stamp: Time, parent: str, child: str) -> TransformStamped:
    """``(t, q)`` = pose of ``child`` in ``parent`` -> ``geometry_msgs/TransformStamped`` (TF ``parent -> child``)."""
    t, q = rt
    return TransformStamped(
        header=Header(stamp=stamp, frame_id=parent), child_frame_id=child,
        transform=Transform(translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                            rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))))


def pose_stamped_msg(rt: tuple[np.ndarray, np.ndarray], stamp: Time, frame_id: str) -> PoseStamped:
    return PoseStamped(header=Header(stamp=stamp, frame_id=frame_id), pose=pose_msg(rt))


def odometry_msg(rt: tuple[np.ndarray, np.ndarray], stamp: Time, frame_id: str, child: str,
                 position_variance: float = -1.0) -> Odometry:
    """``nav_msgs/Odometry`` of ``child`` in ``frame_id``; twist zero with unknown covariance.

    ``position_variance < 0`` leaves the pose covariance zero except ``covariance[0] = -1`` (the "unknown" marker
    used by ROS drivers); otherwise it is put on the diagonal.
    """
    msg = Odometry(header=Header(stamp=stamp, frame_id=frame_id), child_frame_id=child)
    msg.pose.pose = pose_msg(rt)
    cov = np.zeros(36)
    if position_variance < 0:
        cov[0] = -1.0
    else:
        cov[[0, 7, 14, 21, 28, 35]] = float(position_variance)
    msg.pose.covariance = cov.tolist()
    tcov = np.zeros(36)
    tcov[0] = -1.0
    msg.twist.covariance = tcov.tolist()
    return msg


def path_msg(poses: Sequence[tuple[int, tuple[np.ndarray, np.ndarray]]], stamp: Time, frame_id: str) -> Path:
    """``[(stamp_ns, (t, q)), ...]`` -> ``nav_msgs/Path`` (each pose keeps its own frame stamp)."""
    return Path(header=Header(stamp=stamp, frame_id=frame_id),
                poses=[pose_stamped_msg(rt, ns_to_stamp(ns), frame_id) for ns, rt in poses])


def pose_array_msg(poses: Iterable[tuple[np.ndarray, np.ndarray]], stamp: Time, frame_id: str) -> PoseArray:
    return PoseArray(header=Header(stamp=stamp, frame_id=frame_id), poses=[pose_msg(rt) for rt in poses])


def frusta_markers(poses: Sequence[tuple[np.ndarray, np.ndarray]], stamp: Time, frame_id: str, size: float = 0.1,
                   aspect: float = 4.0 / 3.0, ns: str = "keyframes") -> MarkerArray:
    """Camera frusta (optical frame: z forward) as one LINE_LIST marker, plus a DELETEALL first.

    Each frustum: apex at the camera centre, image-plane rectangle at depth ``size`` with half-width
    ``size * aspect / 2`` and half-height ``size / 2``. Returns a MarkerArray ``[DELETEALL, LINE_LIST]``.
    """
    hw, hh, d = size * aspect / 2.0, size / 2.0, size
    corners = np.array([[-hw, -hh, d], [hw, -hh, d], [hw, hh, d], [-hw, hh, d]])
    segs = []
    for t, q in poses:
        R = quat_to_matrix(q)
        c = (R @ corners.T).T + t
        for i in range(4):
            segs += [t, c[i], c[i], c[(i + 1) % 4]]
    header = Header(stamp=stamp, frame_id=frame_id)
    clear = Marker(header=header, ns=ns, id=0, action=Marker.DELETEALL)
    m = Marker(header=header, ns=ns, id=1, type=Marker.LINE_LIST, action=Marker.ADD)
    m.pose.orientation.w = 1.0
    m.scale.x = float(size * 0.05)
    m.color = ColorRGBA(r=0.1, g=0.6, b=1.0, a=1.0)
    m.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in segs]
    return MarkerArray(markers=[clear, m])


# -------------------------------------------------------------------------------------------------- point clouds
_CLOUD_FIELDS = ("x", "y", "z", "rgb")


def xyzrgb_to_cloud(xyz: np.ndarray, rgb: np.ndarray, stamp: Time, frame_id: str) -> PointCloud2:
    """Points + colours -> ``sensor_msgs/PointCloud2`` with fields x, y, z (FLOAT32) and rgb (packed FLOAT32).

    Args:
        xyz: ``[N, 3]`` float (map frame, map units).
        rgb: ``[N, 3] uint8``.
    Returns:
        Unorganized cloud (height 1, width N), little-endian, point_step 16, rgb = ``0x00RRGGBB`` reinterpreted as
        float32 (the PCL / RViz convention), ``is_dense`` True iff all coordinates are finite.
    Raises:
        ValueError: mismatched or wrongly shaped inputs.
    """
    xyz = np.asarray(xyz)
    rgb = np.asarray(rgb)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"xyz and rgb must both be [N, 3], got {xyz.shape} and {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise TypeError(f"rgb must be uint8, got {rgb.dtype}")
    n = xyz.shape[0]
    rec = np.empty(n, dtype=np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")]))
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rec["rgb"] = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2]
    msg = PointCloud2(header=Header(stamp=stamp, frame_id=frame_id))
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=k, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, k in enumerate(_CLOUD_FIELDS)]
    msg.is_bigendian = False
    msg.point_step, msg.row_step = 16, 16 * n
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = array.array("B", rec.tobytes())
    return msg


_PF_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}


def cloud_to_xyzrgb(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray]:
    """``sensor_msgs/PointCloud2`` with x, y, z and packed rgb -> ``(xyz [N,3] float32, rgb [N,3] uint8)``.

    Raises:
        ValueError: missing fields or inconsistent sizes.
    """
    fields = {f.name: f for f in msg.fields}
    missing = [k for k in _CLOUD_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"cloud lacks fields {missing} (has {list(fields)})")
    n = int(msg.width) * int(msg.height)
    if len(msg.data) != n * int(msg.point_step):
        raise ValueError(f"cloud data has {len(msg.data)} bytes, expected {n} * {msg.point_step}")
    end = ">" if msg.is_bigendian else "<"
    dt = np.dtype({"names": list(_CLOUD_FIELDS),
                   "formats": [end + (_PF_DTYPES[fields[k].datatype] if k != "rgb" else "u4") for k in _CLOUD_FIELDS],
                   "offsets": [fields[k].offset for k in _CLOUD_FIELDS], "itemsize": int(msg.point_step)})
    rec = np.frombuffer(msg.data, dtype=dt, count=n)
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1).astype(np.float32)
    p = rec["rgb"].astype(np.uint32)
    rgb = np.stack([(p >> 16) & 255, (p >> 8) & 255, p & 255], axis=1).astype(np.uint8)
    return xyz, rgb
