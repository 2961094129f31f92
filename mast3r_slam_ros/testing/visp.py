"""The ViSP ``cube`` real camera sequence (Debian package ``visp-images-data``, GPL-2, Inria) for tests.

80 grey frames of 384x288 from a hand-held camera over a static poster scene with a dotted cube; no ground-truth
poses; nominal intrinsics ``px = py = 600, u0 = 192, v0 = 144`` (ViSP ``example/pose-estimation/poseVirtualVS.cpp``,
uncalibrated). Facts: ``shared/spec/test_data.md`` §1.1.2.

Lookup order: an installed package (``/usr/share/visp-images-data``), then the cache folder
(``$MAST3R_SLAM_ROS_DATA`` or ``~/.cache/mast3r_slam_ros``)/``visp_cube``, else the ``.deb`` is fetched with
``apt-get download`` (Debian / Ubuntu with the package lists; ``apt-get update`` is run once if the download fails)
and only ``cube/`` is extracted into the cache. The images are data, not code; they are not redistributed here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["VISP_CUBE_K", "visp_cube_dir", "load_visp_cube"]

#: ViSP's nominal intrinsics of the cube sequence (pixels)
VISP_CUBE_K = np.array([[600.0, 0.0, 192.0], [0.0, 600.0, 144.0], [0.0, 0.0, 1.0]])
_INSTALLED = Path("/usr/share/visp-images-data/ViSP-images/cube")
_N_FRAMES = 80


def _cache_root() -> Path:
    env = os.environ.get("MAST3R_SLAM_ROS_DATA")
    return Path(env) if env else Path.home() / ".cache" / "mast3r_slam_ros"


def _complete(folder: Path) -> bool:
    return folder.is_dir() and len(list(folder.glob("image.*.pgm"))) >= _N_FRAMES


def _download_deb(tmp: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("the ViSP cube sequence needs Debian's visp-images-data: apt-get is not available "
                                f"here; put the 80 image.NNNN.pgm files into {_cache_root() / 'visp_cube'}")
    for attempt in range(2):
        proc = subprocess.run(["apt-get", "download", "visp-images-data"], cwd=tmp, capture_output=True, text=True)
        debs = list(tmp.glob("visp-images-data_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        if attempt == 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    raise FileNotFoundError(f"apt-get download visp-images-data failed: {proc.stderr.strip()[-500:]}")


def _extract_cube(deb: Path, dest: Path) -> None:
    """Extract ``ViSP-images/cube/*.pgm`` from the .deb (ar archive -> data.tar.*) into ``dest``."""
    tmp = dest.parent / (dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package")
        while True:
            head = f.read(60)
            if len(head) < 60:
                raise ValueError(f"{deb}: no data.tar member")
            name = head[:16].decode("ascii").strip().rstrip("/")
            size = int(head[48:58].decode("ascii").strip())
            if name.startswith("data.tar"):
                data = tmp / name
                with data.open("wb") as out:
                    remaining = size
                    while remaining:
                        chunk = f.read(min(remaining, 1 << 20))
                        out.write(chunk)
                        remaining -= len(chunk)
                break
            f.seek(size + (size & 1), 1)
    if data.suffix == ".zst":
        raise ValueError(f"{deb} uses zstd compression; install the package instead (apt-get install "
                         "visp-images-data)")
    with tarfile.open(data) as tar:
        for m in tar:
            if m.isfile() and "/ViSP-images/cube/image." in m.name and m.name.endswith(".pgm"):
                src = tar.extractfile(m)
                (tmp / Path(m.name).name).write_bytes(src.read())
    data.unlink()
    if not _complete(tmp):
        raise ValueError(f"{deb} did not contain the {_N_FRAMES} cube frames")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def visp_cube_dir() -> Path:
    """Folder holding ``image.0000.pgm`` ... ``image.0079.pgm`` (fetched on first use, see module docstring).

    Raises:
        FileNotFoundError: the package cannot be found or fetched (message says how to provide it).
    """
    if _complete(_INSTALLED):
        return _INSTALLED
    dest = _cache_root() / "visp_cube"
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visp_") as tmp:
        _extract_cube(_download_deb(Path(tmp)), dest)
    return dest


def load_visp_cube(step: int = 1, count: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Load the cube frames as grey images.

    Args:
        step: keep every ``step``-th frame. count: at most this many frames (after ``step``).
    Returns:
        ``(frames, K)``: list of ``[288, 384] uint8`` grey images in sequence order, ``[3, 3] float64`` nominal K.
    Raises:
        FileNotFoundError: data unavailable. ValueError: unreadable frame.
    """
    import cv2

    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    files = sorted(visp_cube_dir().glob("image.*.pgm"))[::step]
    if count is not None:
        files = files[:count]
    frames = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"cannot read {f}")
        frames.append(img)
    return frames, VISP_CUBE_K.copy()
