"""Image sources: image folder, video file, TUM RGB-D folder, EuRoC folder and rosbag2 (sqlite3 / MCAP).

Every source is an iterable of ``Sample(stamp_ns, rgb)`` (``rgb`` ``[H,W,3]`` uint8, RGB order) with
``intrinsics: CameraIntrinsics | None`` and, where the number of images is known up front, ``__len__``; file-list
sources (folder, TUM, EuRoC) are also indexable (``source[i]``). ``open_source(path, **kw)`` picks the reader from the
layout on disk (docs/interfaces.md; spec upstream_algorithm.md §11.1), never from string splitting of the path.

Dispatch of ``open_source(path)`` (first match):

1. a file with suffix ``.db3`` / ``.mcap``, or a folder with ``metadata.yaml`` -> rosbag2 (``io.rosbag.RosbagSource``);
2. a file with a video suffix (``.mp4 .avi .mov .mkv .webm .mpg .mpeg .m4v``) -> ``VideoSource``;
3. a folder with ``mav0/cam0/data.csv`` (or ``cam0/data.csv``, or ``data.csv`` + ``data/``) -> ``EurocSource``;
4. a folder with ``rgb.txt`` -> ``TUMSource``;
5. a folder with image files -> ``ImageFolderSource``.

Undistortion (spec §11.1): ``undistort=True`` remaps every image with ``cv2.initUndistortRectifyMap(K, dist, None,
K_opt)`` where ``K_opt = cv2.getOptimalNewCameraMatrix(K, dist, (W,H), alpha=0, (W,H), centerPrincipalPoint)``; the
source's ``intrinsics`` then report ``K_opt`` with zero distortion and ``raw_intrinsics`` the calibration. EuRoC is
undistorted by default (upstream ``always_undistort``), every other source is not.

Stamps: non-increasing stamps are dropped with a warning (file-list sources drop them when opened, so ``len`` is exact;
rosbags and videos drop them while iterating, so their ``len`` is an upper bound).

Corrupt images: indexing raises ``ValueError`` naming the file; iteration does the same unless ``skip_corrupt=True``,
which logs a warning and skips the frame.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "CameraIntrinsics",
    "EurocSource",
    "ImageFolderSource",
    "ImageSource",
    "Sample",
    "TUMSource",
    "TUM_CALIBRATION",
    "Undistorter",
    "VideoSource",
    "decode_image_file",
    "natural_key",
    "open_source",
    "to_rgb_u8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v")
BAG_SUFFIXES = (".db3", ".mcap")

# TUM RGB-D ROS-default calibrations (spec §11.1, upstream dataloader): fx fy cx cy k1 k2 p1 p2 k3, 640x480
TUM_CALIBRATION: dict[str, tuple[float, ...]] = {
    "freiburg1": (517.3, 516.5, 318.6, 255.3, 0.2624, -0.9531, -0.0054, 0.0026, 1.1633),
    "freiburg2": (520.9, 521.0, 325.1, 249.7, 0.2312, -0.7849, -0.0033, -0.0001, 0.9172),
    "freiburg3": (535.4, 539.2, 320.1, 247.6),
}


# ---------------------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole camera with OpenCV distortion.

    Attributes:
        K: ``[3,3]`` float64 camera matrix (pixels; pixel centres at integer coordinates).
        dist: ``[k]`` float64 OpenCV distortion coefficients ``(k1, k2, p1, p2[, k3, ...])``; empty / zeros = none.
        width, height: image size in pixels the calibration refers to.
    """

    K: np.ndarray
    dist: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        d = np.asarray(self.dist, dtype=np.float64).reshape(-1)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"CameraIntrinsics: K must be a finite 3x3 matrix with fx, fy > 0, got {K.tolist()}")
        if not np.all(np.isfinite(d)) or d.size not in (0, 4, 5, 8, 12, 14):
            raise ValueError(f"CameraIntrinsics: dist must have 0, 4, 5, 8, 12 or 14 finite values, got {d.tolist()}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"CameraIntrinsics: width/height must be positive, got {self.width}x{self.height}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "dist", d)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @classmethod
    def from_params(cls, params: Sequence[float], width: int, height: int) -> "CameraIntrinsics":
        """From ``[fx, fy, cx, cy, *dist]`` (upstream calibration list order)."""
        p = [float(v) for v in params]
        if len(p) < 4:
            raise ValueError(f"calibration needs at least fx, fy, cx, cy, got {p}")
        K = np.array([[p[0], 0.0, p[2]], [0.0, p[1], p[3]], [0.0, 0.0, 1.0]])
        return cls(K, np.array(p[4:], dtype=np.float64), width, height)

    @property
    def has_distortion(self) -> bool:
        return bool(self.dist.size and np.any(self.dist != 0))


@dataclass(eq=False)
class Sample:
    """One image: ``stamp_ns`` (int, nanoseconds), ``rgb [H,W,3]`` uint8 RGB, ``index`` in the source, ``name``
    (file name or topic) for messages."""

    stamp_ns: int
    rgb: np.ndarray
    index: int = -1
    name: str = ""

    def __iter__(self):  # allows ``stamp, rgb = sample``
        yield self.stamp_ns
        yield self.rgb


class Undistorter:
    """Undistortion maps of spec §11.1: ``K_opt = getOptimalNewCameraMatrix(K, dist, (W,H), alpha=0, (W,H),
    centerPrincipalPoint)``, ``initUndistortRectifyMap(K, dist, None, K_opt, (W,H), CV_32FC1)``, ``remap`` bilinear.

    Attributes: ``intrinsics`` (undistorted camera, zero distortion), ``raw`` (the input calibration).
    """

    def __init__(self, intrinsics: CameraIntrinsics, center_principal_point: bool = True) -> None:
        self.raw = intrinsics
        W, H = intrinsics.width, intrinsics.height
        if not intrinsics.has_distortion:
            self.maps = None
            K_opt = intrinsics.K.copy()
            if center_principal_point:
                # getOptimalNewCameraMatrix with zero distortion only moves the principal point when centring
                K_opt, _ = cv2.getOptimalNewCameraMatrix(intrinsics.K, np.zeros(4), (W, H), 0, (W, H), True)
                self.maps = cv2.initUndistortRectifyMap(intrinsics.K, np.zeros(4), None, K_opt, (W, H),
                                                        cv2.CV_32FC1)
        else:
            K_opt, _ = cv2.getOptimalNewCameraMatrix(intrinsics.K, intrinsics.dist, (W, H), 0, (W, H),
                                                     bool(center_principal_point))
            self.maps = cv2.initUndistortRectifyMap(intrinsics.K, intrinsics.dist, None, K_opt, (W, H),
                                                    cv2.CV_32FC1)
        self.intrinsics = CameraIntrinsics(np.asarray(K_opt, dtype=np.float64), np.zeros(0), W, H)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb [H,W,3] uint8`` -> undistorted ``[H,W,3] uint8``. Raises ``ValueError`` on a size mismatch."""
        H, W = rgb.shape[:2]
        if (W, H) != (self.raw.width, self.raw.height):
            raise ValueError(f"image size {W}x{H} differs from the calibration's {self.raw.width}x{self.raw.height}")
        if self.maps is None:
            return rgb
        return cv2.remap(rgb, self.maps[0], self.maps[1], cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------------------- helpers
def natural_key(name: str) -> list:
    """Sort key that orders embedded integers numerically (``img2 < img10``), case-insensitively."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t]


def to_rgb_u8(img: np.ndarray, order: str = "bgr") -> np.ndarray:
    """Normalize a decoded image to ``[H,W,3]`` uint8 RGB.

    Args:
        img: ``[H,W]`` grey, ``[H,W,1]``, ``[H,W,3]`` (``order`` "bgr" or "rgb") or ``[H,W,4]`` (BGRA / RGBA);
            uint8 or uint16 (scaled by 1/257).
        order: channel order of colour inputs, "bgr" (OpenCV) or "rgb".
    Raises:
        ValueError: unsupported shape or dtype.
    """
    if img.dtype == np.uint16:
        img = np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {img.dtype} (need uint8 or uint16)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"unsupported image shape {img.shape}")
    if img.shape[2] == 4:
        img = img[..., :3]
    if order == "bgr":
        img = img[..., ::-1]
    elif order != "rgb":
        raise ValueError(f"order must be 'bgr' or 'rgb', got {order!r}")
    return np.ascontiguousarray(img)


def decode_image_file(path: Path) -> np.ndarray:
    """Read an image file into ``[H,W,3]`` uint8 RGB (grey -> 3 channels). Works with non-ASCII paths.

    Raises:
        FileNotFoundError: missing file. ValueError: the file cannot be decoded (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    buf = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise ValueError(f"cannot decode image file {path} (corrupt or not an image)")
    try:
        return to_rgb_u8(img, "bgr")
    except ValueError as e:
        raise ValueError(f"cannot use image file {path}: {e}") from e


def _drop_non_increasing(stamps: list[int], names: list, what: str) -> list[int]:
    """Indices to keep so that stamps strictly increase; warns about each dropped entry."""
    keep, last = [], None
    for k, t in enumerate(stamps):
        if last is not None and t <= last:
            log.warning("%s: dropping %s, its stamp %d ns does not increase (previous %d ns)", what, names[k], t, last)
            continue
        keep.append(k)
        last = t
    return keep


def _seconds_to_ns(text: str) -> int:
    """Decimal seconds string -> integer nanoseconds without float rounding."""
    text = text.strip()
    m = re.fullmatch(r"([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", text)
    if not m or not (m.group(2) or m.group(3)):
        raise ValueError(f"not a time stamp: {text!r}")
    if m.group(4):
        return int(round(float(text) * 1e9))
    sign = -1 if m.group(1) == "-" else 1
    frac = (m.group(3) or "")[:9].ljust(9, "0")
    return sign * (int(m.group(2) or "0") * 10**9 + int(frac))


class ImageSource:
    """Base class: iteration with optional undistortion and corrupt-image skipping (see module docstring).

    Subclasses with a file list implement ``_stamps`` / ``_paths``; others override ``__iter__``.
    """

    name: str = "source"

    def __init__(self, intrinsics: CameraIntrinsics | None, undistort: bool, skip_corrupt: bool,
                 center_principal_point: bool = True) -> None:
        self.raw_intrinsics = intrinsics
        self.skip_corrupt = bool(skip_corrupt)
        self._undistorter: Undistorter | None = None
        if undistort:
            if intrinsics is None:
                raise ValueError(f"{self.name}: undistort=True needs a calibration, and this source has none")
            self._undistorter = Undistorter(intrinsics, center_principal_point)
        self.intrinsics: CameraIntrinsics | None = (
            self._undistorter.intrinsics if self._undistorter is not None else intrinsics)
        self._stamps: list[int] = []
        self._paths: list[Path] = []

    def _finish(self, rgb: np.ndarray) -> np.ndarray:
        return self._undistorter(rgb) if self._undistorter is not None else rgb

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def stamps_ns(self) -> list[int]:
        """Stamps of every image (file-list sources)."""
        return list(self._stamps)

    def __getitem__(self, i: int) -> Sample:
        """Sample ``i`` (negative indices count from the end). Raises ``IndexError``, or ``ValueError`` for an
        undecodable image (naming the file)."""
        n = len(self._paths)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} images")
        i %= n
        rgb = decode_image_file(self._paths[i])
        return Sample(self._stamps[i], self._finish(rgb), i, self._paths[i].name)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self._paths)):
            try:
                yield self[i]
            except ValueError as e:
                if not self.skip_corrupt:
                    raise
                log.warning("%s: skipping frame %d: %s", self.name, i, e)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images)"


# ---------------------------------------------------------------------------------------------------------- folder
class ImageFolderSource(ImageSource):
    """Images of one folder (``IMAGE_SUFFIXES``, case-insensitive) in natural sort order, or in stamp order when the
    stamps come from the file names (duplicated stamps: the later file is dropped with a warning).

    Args:
        path: folder.
        fps: frame rate for index-based stamps (``stamp = i * 1e9 / fps``).
        stamps: "auto" (file stems that all parse as decimal seconds, e.g. ``1305031102.175304.png``, or all as
            integer nanoseconds with >= 16 digits, give the stamps; otherwise the index), "index" or "name".
        intrinsics: optional calibration; undistort / skip_corrupt / center_principal_point: see module docstring.
    Raises:
        FileNotFoundError: missing folder. ValueError: no images, or ``stamps="name"`` with unparsable names.
    """

    def __init__(self, path: str | Path, fps: float = 30.0, stamps: str = "auto",
                 intrinsics: CameraIntrinsics | None = None, undistort: bool = False, skip_corrupt: bool = False,
                 center_principal_point: bool = True) -> None:
        path = Path(path)
        self.name = path.name or str(path)
        if not path.exists():
            raise FileNotFoundError(f"image folder not found: {path}")
        if not path.is_dir():
            raise ValueError(f"not a folder: {path}")
        if fps <= 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be positive, got {fps}")
        if stamps not in ("auto", "index", "name"):
            raise ValueError(f"stamps must be 'auto', 'index' or 'name', got {stamps!r}")
        files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        super().__init__(intrinsics, undistort, skip_corrupt, center_principal_point)
        st = self._stamps_from_names(files) if stamps != "index" else None
        if st is None:
            if stamps == "name":
                raise ValueError(f"stamps='name' but the file names in {path} are not all time stamps")
            st = [int(round(i * 1e9 / fps)) for i in range(len(files))]
        else:  # time-stamp names are ordered by their value (natural order would misplace '.2' vs '.175304')
            order = sorted(range(len(files)), key=lambda k: st[k])
            files, st = [files[k] for k in order], [st[k] for k in order]
        keep = _drop_non_increasing(st, [f.name for f in files], self.name)
        self._paths = [files[k] for k in keep]
        self._stamps = [st[k] for k in keep]

    @staticmethod
    def _stamps_from_names(files: list[Path]) -> list[int] | None:
        stems = [f.stem for f in files]
        if all(re.fullmatch(r"\d{16,}", s) for s in stems):
            return [int(s) for s in stems]
        if all(re.fullmatch(r"\d+\.\d+", s) for s in stems):
            return [_seconds_to_ns(s) for s in stems]
        return None


# ---------------------------------------------------------------------------------------------------------- video
class VideoSource(ImageSource):
    """Frames of a video file decoded with OpenCV; stamps ``i * 1e9 / fps`` (upstream ``MP4Dataset``), fps from the
    container (``fps`` argument overrides; 30 if unknown). ``len`` is the container's frame count (may be approximate).
    ``subsample`` keeps every n-th frame. Not indexable.

    Raises:
        FileNotFoundError: missing file. ValueError: OpenCV cannot open the video or it has no frames.
    """

    def __init__(self, path: str | Path, fps: float | None = None, subsample: int = 1,
                 intrinsics: CameraIntrinsics | None = None, undistort: bool = False,
                 center_principal_point: bool = True) -> None:
        path = Path(path)
        self.name = path.name
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")
        super().__init__(intrinsics, undistort, False, center_principal_point)
        self.path = path
        self.subsample = int(subsample)
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                raise ValueError(f"cannot open video file {path} (unsupported codec or corrupt)")
            cfps = cap.get(cv2.CAP_PROP_FPS)
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            ok, _ = cap.read()
            if not ok:
                raise ValueError(f"video file {path} has no decodable frames")
        finally:
            cap.release()
        self.fps = float(fps) if fps else (float(cfps) if cfps and cfps > 0 and math.isfinite(cfps) else 30.0)
        self._count = max(0, (count + self.subsample - 1) // self.subsample) if count > 0 else None

    def __len__(self) -> int:
        if self._count is None:
            raise TypeError(f"{self.name}: the video container does not report its frame count")
        return self._count

    def __getitem__(self, i):  # pragma: no cover - explicit refusal
        raise TypeError("VideoSource is not indexable; iterate over it")

    @property
    def stamps_ns(self) -> list[int]:  # pragma: no cover - explicit refusal
        raise TypeError("VideoSource stamps are only known while iterating")

    def __iter__(self) -> Iterator[Sample]:
        cap = cv2.VideoCapture(str(self.path))
        try:
            k = 0
            out = 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                if k % self.subsample == 0:
                    yield Sample(int(round(out * 1e9 / self.fps)), self._finish(to_rgb_u8(frame, "bgr")), out,
                                 self.name)
                    out += 1
                k += 1
        finally:
            cap.release()


# ---------------------------------------------------------------------------------------------------------- TUM
def _read_list_file(path: Path, what: str) -> list[tuple[str, str]]:
    """``timestamp filename`` lines of a TUM list file (``#`` comments, blank lines ignored)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"{what}: {path}:{n}: expected 'timestamp filename', got {line!r}")
        rows.append((parts[0], parts[1]))
    return rows


class TUMSource(ImageSource):
    """TUM RGB-D sequence folder: ``rgb.txt`` (``timestamp rgb/<file>``), stamps in seconds (spec §11.1).

    Calibration, first found: the ``intrinsics`` argument; ``camera.txt`` in the folder (``fx fy cx cy [dist...]``, as
    written by ``testing.SyntheticSequence.save_tum``); the ROS-default calibration of ``freiburg1/2/3`` when the
    folder name or a parent folder name contains it (``TUM_CALIBRATION``, 640x480); else none.

    Raises:
        FileNotFoundError: missing folder / rgb.txt / listed image. ValueError: malformed rgb.txt or no images.
    """

    def __init__(self, path: str | Path, intrinsics: CameraIntrinsics | None = None, undistort: bool = False,
                 skip_corrupt: bool = False, center_principal_point: bool = True) -> None:
        path = Path(path)
        self.name = path.name or str(path)
        lst = path / "rgb.txt"
        if not lst.is_file():
            raise FileNotFoundError(f"TUM folder {path} has no rgb.txt")
        rows = _read_list_file(lst, "TUM")
        if not rows:
            raise ValueError(f"TUM rgb.txt in {path} lists no images")
        files = [path / Path(f) for _, f in rows]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"TUM folder {path}: {len(missing)} listed images are missing, e.g. {missing[0]}")
        stamps = [_seconds_to_ns(t) for t, _ in rows]
        if intrinsics is None:
            intrinsics = self._calibration(path, files[0])
        super().__init__(intrinsics, undistort, skip_corrupt, center_principal_point)
        keep = _drop_non_increasing(stamps, [f.name for f in files], self.name)
        self._paths = [files[k] for k in keep]
        self._stamps = [stamps[k] for k in keep]

    @staticmethod
    def _calibration(path: Path, first: Path) -> CameraIntrinsics | None:
        cam = path / "camera.txt"
        if cam.is_file():
            vals = [float(v) for v in cam.read_text(encoding="utf-8").split()]
            h, w = decode_image_file(first).shape[:2]
            return CameraIntrinsics.from_params(vals, w, h)
        for part in (path.resolve().name, *[p.name for p in path.resolve().parents]):
            for key, params in TUM_CALIBRATION.items():
                if key in part.lower():
                    return CameraIntrinsics.from_params(params, 640, 480)
        return None


# ---------------------------------------------------------------------------------------------------------- EuRoC
def _find_euroc_cam(path: Path, cam: str) -> Path | None:
    for c in (path / "mav0" / cam, path / cam, path):
        if (c / "data.csv").is_file() and (c / "data").is_dir():
            return c
    return None


def read_euroc_sensor_yaml(path: Path) -> CameraIntrinsics:
    """EuRoC ``sensor.yaml``: ``intrinsics [fu, fv, cu, cv]``, ``distortion_coefficients [k1, k2, p1, p2]``,
    ``resolution [W, H]`` (radial-tangential model). Raises ``ValueError`` naming the file on a bad file."""
    import yaml

    text = "\n".join(line for line in Path(path).read_text(encoding="utf-8").splitlines()
                     if not line.startswith("%"))
    try:
        data = yaml.safe_load(text) or {}
        intr = [float(v) for v in data["intrinsics"]]
        dist = [float(v) for v in data.get("distortion_coefficients", [])]
        W, H = (int(v) for v in data["resolution"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read EuRoC camera calibration {path}: {e!r}") from e
    model = str(data.get("distortion_model", "radial-tangential"))
    if model not in ("radial-tangential", "radtan", "plumb_bob", "none"):
        raise ValueError(f"{path}: distortion_model {model!r} is not supported (radial-tangential only)")
    return CameraIntrinsics.from_params(intr + dist, W, H)


class EurocSource(ImageSource):
    """EuRoC MAV sequence: ``mav0/cam0/data.csv`` (``#timestamp [ns],filename``) + ``data/``, calibration from
    ``sensor.yaml``; grey images become 3 channels. Undistorted by default (upstream ``always_undistort``).

    Args:
        path: the sequence folder (containing ``mav0``), the ``mav0`` folder or the ``cam0`` folder.
        cam: camera folder name (``cam0``).
    Raises:
        FileNotFoundError: no EuRoC layout / missing images. ValueError: malformed data.csv or sensor.yaml.
    """

    def __init__(self, path: str | Path, cam: str = "cam0", undistort: bool = True, skip_corrupt: bool = False,
                 intrinsics: CameraIntrinsics | None = None, center_principal_point: bool = True) -> None:
        path = Path(path)
        self.name = path.name or str(path)
        camdir = _find_euroc_cam(path, cam) if path.is_dir() else None
        if camdir is None:
            raise FileNotFoundError(f"no EuRoC layout (mav0/{cam}/data.csv + data/) under {path}")
        rows = []
        for n, line in enumerate((camdir / "data.csv").read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 2 or not parts[0].isdigit():
                raise ValueError(f"EuRoC: {camdir / 'data.csv'}:{n}: expected 'timestamp_ns,filename', got {line!r}")
            rows.append((int(parts[0]), camdir / "data" / parts[1]))
        if not rows:
            raise ValueError(f"EuRoC data.csv in {camdir} lists no images")
        missing = [f for _, f in rows if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"EuRoC {camdir}: {len(missing)} listed images are missing, e.g. {missing[0]}")
        if intrinsics is None and (camdir / "sensor.yaml").is_file():
            intrinsics = read_euroc_sensor_yaml(camdir / "sensor.yaml")
        if intrinsics is None and undistort:
            log.warning("EuRoC %s: no sensor.yaml, images are not undistorted", camdir)
            undistort = False
        super().__init__(intrinsics, undistort, skip_corrupt, center_principal_point)
        keep = _drop_non_increasing([t for t, _ in rows], [f.name for _, f in rows], self.name)
        self._stamps = [rows[k][0] for k in keep]
        self._paths = [rows[k][1] for k in keep]


# ---------------------------------------------------------------------------------------------------------- dispatch
def open_source(path: str | Path, **kw) -> ImageSource:
    """Open an image source, choosing the reader from what is on disk (see the module docstring).

    Keyword arguments are passed to the reader (e.g. ``topic=`` / ``camera_info_topic=`` for rosbags, ``fps=`` for
    folders and videos, ``undistort=``, ``skip_corrupt=``, ``intrinsics=``); an argument the chosen reader does not
    take raises ``TypeError`` naming it.

    Raises:
        FileNotFoundError: the path does not exist. ValueError: the path exists but is no known layout / is empty.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source not found: {p}")
    if (p.is_file() and p.suffix.lower() in BAG_SUFFIXES) or (p.is_dir() and (p / "metadata.yaml").is_file()):
        from mast3r_slam_ros.io.rosbag import RosbagSource

        return _call(RosbagSource, p, kw)
    if p.is_file():
        if p.suffix.lower() in VIDEO_SUFFIXES:
            return _call(VideoSource, p, kw)
        raise ValueError(f"unsupported source file {p}: expected a video ({', '.join(VIDEO_SUFFIXES)}) "
                         f"or a rosbag2 (.db3 / .mcap), or pass a folder")
    if _find_euroc_cam(p, kw.get("cam", "cam0")) is not None:
        return _call(EurocSource, p, kw)
    if (p / "rgb.txt").is_file():
        return _call(TUMSource, p, kw)
    return _call(ImageFolderSource, p, kw)


def _call(cls, p: Path, kw: dict):
    import inspect

    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kw if k not in params]
    if unknown:
        raise TypeError(f"{cls.__name__} does not take {', '.join(unknown)} (accepts: "
                        f"{', '.join(k for k in params if k not in ('self', 'path'))})")
    return cls(p, **kw)
