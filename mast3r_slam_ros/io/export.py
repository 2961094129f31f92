"""Exports of a SLAM run: TUM trajectory, binary PLY point cloud, keyframe images. Every write is atomic.

Atomicity: each file is first written to a temporary file in the *same folder* (``.<name>.<random>.tmp``), flushed and
``fsync``-ed, then moved over the target with :func:`os.replace` (an atomic rename on POSIX and Windows/NTFS). A crash
or an exception while writing leaves the previous file untouched and removes the temporary file, so a reader never sees
a half-written trajectory or map.

Formats:

- TUM RGB-D trajectory (Sturm et al., IROS 2012, "file formats" page of the benchmark): one pose per line,
  ``timestamp tx ty tz qx qy qz qw``; timestamp in seconds (written exactly from integer nanoseconds with 9 decimals),
  translation = camera centre in the world frame, quaternion (x, y, z, w) of R_WC. Lines starting with ``#`` are
  comments (evo and the TUM tools skip them). The Sim(3) scale ``s`` of ``T_WC`` is dropped: the pose
  ``X_W = s R X_C + t`` has camera centre ``t`` and orientation ``R`` whatever ``s`` is.
- PLY (Turk, 1994; the ``plyfile`` package): ``binary_little_endian``, one ``vertex`` element with float32 ``x y z``
  and, when colours are given, uint8 ``red green blue``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

__all__ = [
    "atomic_write",
    "write_tum",
    "read_tum",
    "write_ply",
    "voxel_downsample",
    "save_keyframe_images",
    "PlyWriteResult",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success move it over ``path`` atomically.

    Args:
        path: target file. Its folder is created if missing.
        mode: ``"wb"`` (binary) or ``"w"`` (text, UTF-8, ``\\n`` line endings on every OS).
    Yields:
        the open temporary file object.
    Raises:
        ValueError: ``mode`` is not ``"w"``/``"wb"``. Any exception of the body or of the file system is re-raised
        after the temporary file has been removed; the previous content of ``path`` is then unchanged.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"atomic_write: {target} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        if mode == "w":
            fh: IO = open(fd, "w", encoding="utf-8", newline="\n")
        else:
            fh = open(fd, "wb")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------------------------------ helpers
def _to_numpy(x, name: str) -> np.ndarray:
    """torch tensor / array-like -> numpy array (detached, on the CPU)."""
    if x is None:
        raise TypeError(f"{name} must not be None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _poses_to_array(poses) -> np.ndarray:
    """Sim3 ``[T]``/``[T,1]``, a sequence of Sim3, or a ``[T,8]`` tensor/array -> float64 ``[T,8]``."""
    from mast3r_slam_ros.lie import Sim3

    if isinstance(poses, (list, tuple)) and len(poses) == 0:
        return np.zeros((0, 8), dtype=np.float64)
    if isinstance(poses, Sim3):
        data = _to_numpy(poses.data, "poses")
    elif isinstance(poses, (list, tuple)) and poses and all(isinstance(p, Sim3) for p in poses):
        data = np.concatenate([_to_numpy(p.data, "poses").reshape(-1, 8) for p in poses], axis=0)
    else:
        data = _to_numpy(poses, "poses")
    if data.dtype.kind not in "fiu":
        raise TypeError(f"poses must be numeric (Sim3 or [T,8] array), got dtype {data.dtype}")
    if data.ndim == 0 or data.shape[-1] != 8:
        raise ValueError(f"poses must be Sim3 [T] or an array [T,8] = (t, q_xyzw, s), got shape {tuple(data.shape)}")
    data = data.reshape(-1, 8).astype(np.float64)
    return data


def _stamp_to_seconds_str(stamp_ns: int) -> str:
    """Exact decimal seconds from integer nanoseconds, 9 decimals (no float rounding)."""
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return f"{sec}.{nsec:09d}"


# ---------------------------------------------------------------------------------------------------------- TUM
def write_tum(path: str | os.PathLike, stamps_ns, poses, *, header: bool = True) -> Path:
    """Write a trajectory in the TUM RGB-D format ``timestamp tx ty tz qx qy qz qw`` (atomic).

    Args:
        path: output text file (folder created if missing).
        stamps_ns: ``[T]`` integer timestamps in nanoseconds (int64 array, tensor or list of int), >= 0.
        poses: ``T_WC`` (camera -> world), one per stamp: ``lie.Sim3`` of batch shape ``[T]`` or ``[T,1]``, a list of
            ``Sim3 [1]``, or a ``[T,8]`` tensor/array in lietorch layout ``(tx,ty,tz,qx,qy,qz,qw,s)``. The Sim(3)
            scale is dropped (camera centre ``t`` and rotation are written); quaternions are normalised and their sign
            chosen with ``qw >= 0``.
        header: write a ``# timestamp tx ty tz qx qy qz qw`` comment line first.
    Returns:
        the path written.
    Raises:
        ValueError: lengths differ, a stamp is negative or not an integer, a pose is not finite or has a zero
            quaternion. TypeError: non-numeric input.
    Source: TUM RGB-D benchmark file formats (Sturm et al., IROS 2012).
    """
    stamps = _to_numpy(stamps_ns, "stamps_ns").reshape(-1)
    if stamps.size and stamps.dtype.kind == "f":
        if not np.all(np.isfinite(stamps)) or np.any(stamps != np.round(stamps)):
            raise ValueError("stamps_ns must be integer nanoseconds (got non-integer floats)")
        stamps = stamps.astype(np.int64)
    elif stamps.size and stamps.dtype.kind not in "iu":
        raise TypeError(f"stamps_ns must be integers (nanoseconds), got dtype {stamps.dtype}")
    data = _poses_to_array(poses)
    if len(stamps) != len(data):
        raise ValueError(f"write_tum: {len(stamps)} stamps but {len(data)} poses")
    if stamps.size and stamps.min() < 0:
        raise ValueError(f"write_tum: negative timestamp {int(stamps.min())} ns")
    bad = ~np.all(np.isfinite(data), axis=1)
    if bad.any():
        raise ValueError(f"write_tum: {int(bad.sum())} pose(s) are not finite (first at row {int(np.argmax(bad))})")
    q = data[:, 3:7]
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    if np.any(qn < 1e-12):
        raise ValueError(f"write_tum: zero quaternion at row {int(np.argmax(qn[:, 0] < 1e-12))}")
    q = q / qn
    q = np.where(q[:, 3:4] < 0, -q, q)
    lines = ["# timestamp tx ty tz qx qy qz qw\n"] if header else []
    for s, t, qq in zip(stamps, data[:, :3], q):
        lines.append(_stamp_to_seconds_str(s) + " " + " ".join(f"{v:.9f}" for v in (*t, *qq)) + "\n")
    target = Path(path)
    with atomic_write(target, "w") as fh:
        fh.writelines(lines)
    return target


def read_tum(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory: returns ``(stamps_s [T] float64, poses [T,7] float64 (tx,ty,tz,qx,qy,qz,qw))``.

    Raises:
        FileNotFoundError: no such file. ValueError: a line does not have 8 numbers (the line number is named).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TUM trajectory not found: {p}")
    stamps, poses = [], []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.replace(",", " ").split()
        if len(parts) != 8:
            raise ValueError(f"{p}:{lineno}: expected 8 values 'timestamp tx ty tz qx qy qz qw', got {len(parts)}")
        try:
            vals = [float(v) for v in parts]
        except ValueError as exc:
            raise ValueError(f"{p}:{lineno}: not a number: {exc}") from None
        stamps.append(vals[0])
        poses.append(vals[1:])
    return np.asarray(stamps, dtype=np.float64), np.asarray(poses, dtype=np.float64).reshape(-1, 7)


# ---------------------------------------------------------------------------------------------------------- PLY
@dataclass
class PlyWriteResult:
    """Outcome of :func:`write_ply`: the file, points written, non-finite points dropped, points merged by voxels."""

    path: Path
    n_written: int
    n_dropped_nonfinite: int
    n_input: int


def voxel_downsample(xyz, rgb=None, voxel_size: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Average points (and colours) that fall in the same cubic voxel of edge ``voxel_size``.

    Args:
        xyz: ``[N,3]`` float points (any unit; ``voxel_size`` is in the same unit), all finite.
        rgb: optional ``[N,3]`` uint8 colours (averaged per voxel and rounded).
        voxel_size: edge length > 0; ``0`` returns the input unchanged.
    Returns:
        ``(xyz [M,3] float32, rgb [M,3] uint8 | None)``, one point per occupied voxel (the mean of its points), voxels
        in lexicographic order of their integer index ``floor(xyz / voxel_size)``.
    Raises:
        ValueError: negative or non-finite ``voxel_size``, non-finite points, shape mismatch.
    """
    pts = _to_numpy(xyz, "xyz")
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"xyz must have shape [N,3], got {tuple(pts.shape)}")
    col = None if rgb is None else _to_numpy(rgb, "rgb")
    if col is not None and col.shape != pts.shape:
        raise ValueError(f"rgb shape {tuple(col.shape)} does not match xyz shape {tuple(pts.shape)}")
    if not np.isfinite(voxel_size) or voxel_size < 0:
        raise ValueError(f"voxel_size must be a finite number >= 0, got {voxel_size}")
    if voxel_size == 0 or len(pts) == 0:
        return pts.astype(np.float32), (None if col is None else col.astype(np.uint8))
    if not np.all(np.isfinite(pts)):
        raise ValueError("voxel_downsample: xyz contains non-finite values (filter them first)")
    keys = np.floor(pts.astype(np.float64) / voxel_size).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    m = len(counts)
    sums = np.zeros((m, 3), dtype=np.float64)
    np.add.at(sums, inverse, pts.astype(np.float64))
    out_xyz = (sums / counts[:, None]).astype(np.float32)
    out_rgb = None
    if col is not None:
        csum = np.zeros((m, 3), dtype=np.float64)
        np.add.at(csum, inverse, col.astype(np.float64))
        out_rgb = np.clip(np.rint(csum / counts[:, None]), 0, 255).astype(np.uint8)
    return out_xyz, out_rgb


def write_ply(path: str | os.PathLike, xyz, rgb=None, *, voxel_size: float = 0.0) -> PlyWriteResult:
    """Write a point cloud as a binary little-endian PLY (atomic), optionally voxel-downsampled.

    Args:
        path: output ``.ply`` file (folder created if missing).
        xyz: ``[N,3]`` float points (world frame of the map, SLAM units), numpy array or torch tensor.
        rgb: optional ``[N,3]`` uint8 colours (RGB order).
        voxel_size: > 0 averages points per voxel with :func:`voxel_downsample` after dropping non-finite points.
    Returns:
        :class:`PlyWriteResult`. Points with any non-finite coordinate are dropped (a warning states how many).
    Raises:
        ValueError: wrong shapes or mismatched lengths. TypeError: ``rgb`` is not uint8 or ``xyz`` not numeric.
    """
    from plyfile import PlyData, PlyElement

    pts = _to_numpy(xyz, "xyz")
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"write_ply: xyz must have shape [N,3], got {tuple(pts.shape)}")
    if pts.dtype.kind not in "fiu":
        raise TypeError(f"write_ply: xyz must be numeric, got dtype {pts.dtype}")
    col = None
    if rgb is not None:
        col = _to_numpy(rgb, "rgb")
        if col.ndim != 2 or col.shape[1] != 3:
            raise ValueError(f"write_ply: rgb must have shape [N,3], got {tuple(col.shape)}")
        if len(col) != len(pts):
            raise ValueError(f"write_ply: {len(pts)} points but {len(col)} colours")
        if col.dtype != np.uint8:
            raise TypeError(f"write_ply: rgb must be uint8 in [0, 255], got dtype {col.dtype}")
    n_input = len(pts)
    finite = np.all(np.isfinite(pts), axis=1)
    n_bad = int(n_input - finite.sum())
    if n_bad:
        log.warning("write_ply: dropped %d of %d points with non-finite coordinates", n_bad, n_input)
        pts = pts[finite]
        col = None if col is None else col[finite]
    pts, col = voxel_downsample(pts, col, voxel_size)

    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if col is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.empty(len(pts), dtype=fields)
    vertex["x"], vertex["y"], vertex["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if col is not None:
        vertex["red"], vertex["green"], vertex["blue"] = col[:, 0], col[:, 1], col[:, 2]
    ply = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")
    target = Path(path)
    with atomic_write(target, "wb") as fh:
        ply.write(fh)
    return PlyWriteResult(path=target, n_written=len(pts), n_dropped_nonfinite=n_bad, n_input=n_input)


# ---------------------------------------------------------------------------------------------- keyframe images
def save_keyframe_images(folder: str | os.PathLike, images: Sequence, frame_ids: Sequence[int] | None = None,
                         stamps_ns: Sequence[int] | None = None, *, ext: str = "png") -> list[Path]:
    """Save keyframe images as ``kf_<frame_id:06d>.<ext>`` plus an index ``keyframes.txt`` (all writes atomic).

    Args:
        folder: output folder (created if missing).
        images: sequence of ``[H,W,3]`` uint8 RGB images (numpy or torch; e.g. ``Frame.uimg``), or ``[H,W]`` gray.
        frame_ids: one id per image (default ``0..n-1``); used in the file names.
        stamps_ns: optional integer nanosecond stamps, written to the index next to each file name.
        ext: ``"png"`` (lossless, default) or ``"jpg"``.
    Returns:
        the image paths, in input order.
    Raises:
        ValueError: length mismatch, duplicate ids, bad image shape or unknown ``ext``. TypeError: non-uint8 image.
    """
    from PIL import Image

    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}.get(ext.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"save_keyframe_images: ext must be 'png' or 'jpg', got {ext!r}")
    images = list(images)
    ids = list(range(len(images))) if frame_ids is None else [int(i) for i in frame_ids]
    if len(ids) != len(images):
        raise ValueError(f"save_keyframe_images: {len(images)} images but {len(ids)} frame ids")
    if len(set(ids)) != len(ids):
        raise ValueError("save_keyframe_images: duplicate frame ids")
    stamps = None if stamps_ns is None else [int(s) for s in _to_numpy(stamps_ns, "stamps_ns").reshape(-1)]
    if stamps is not None and len(stamps) != len(images):
        raise ValueError(f"save_keyframe_images: {len(images)} images but {len(stamps)} stamps")
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (img, fid) in enumerate(zip(images, ids)):
        arr = _to_numpy(img, f"images[{k}]")
        if arr.dtype != np.uint8:
            raise TypeError(f"images[{k}] must be uint8, got {arr.dtype}")
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
            raise ValueError(f"images[{k}] must be [H,W,3] RGB or [H,W] gray, got {tuple(arr.shape)}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt)
        target = out_dir / f"kf_{fid:06d}.{ext.lower().lstrip('.')}"
        with atomic_write(target, "wb") as fh:
            fh.write(buf.getvalue())
        paths.append(target)
    with atomic_write(out_dir / "keyframes.txt", "w") as fh:
        fh.write("# frame_id stamp_ns file\n" if stamps is not None else "# frame_id file\n")
        for i, (fid, p) in enumerate(zip(ids, paths)):
            fh.write(f"{fid} {stamps[i]} {p.name}\n" if stamps is not None else f"{fid} {p.name}\n")
    return paths
