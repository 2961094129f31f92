"""``mast3r-slam-ros run``: the SLAM main job without ROS (upstream ``main.py``, spec §1.3, §11, §12).

``mast3r-slam-ros run <source> [--config cfg.yaml] [--calib intrinsics.yaml] [--checkpoint PATH|REPO] [--device D]
[--out DIR] [--max-frames N]``

Reads an image folder, a video, a TUM RGB-D or EuRoC folder or a rosbag2 (``io.open_source``), tracks every image with
:class:`~mast3r_slam_ros.slam.system.SlamSystem`, runs the backend (one unit per frame, everything left at the end;
with ``runtime.sync_backend`` after each keyframe) and writes to ``--out``:

- ``trajectory.txt``: TUM trajectory of **every** frame (``T_WC`` re-anchored to the final keyframe poses),
- ``keyframes.txt``: TUM trajectory of the keyframes (upstream's ``<seq>.txt``; evaluate with ``evo_ape tum -as``),
- ``map.ply``: binary PLY of all keyframe points with ``C/N > --conf-threshold`` (XYZ + RGB, map frame),
- ``summary.json``: frames, keyframes, FPS, modes, relocalizations, loop closures, config and source.

Errors (exit code 2, one ``error:`` line): missing checkpoint, empty or unreadable source, corrupt image (named; use
``--skip-corrupt`` to drop such frames with a warning instead), bad calibration file, bad config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mast3r_slam_ros.run")


class RunError(RuntimeError):
    """A user-facing failure of the run job (printed as one ``error:`` line, exit code 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sub-command's options."""
    parser.add_argument("source", help="image folder, video file, TUM/EuRoC folder or rosbag2 (folder/.db3/.mcap)")
    parser.add_argument("--config", type=Path, default=None, help="SLAM config YAML (default: built-in base config)")
    parser.add_argument("--calib", type=Path, default=None,
                        help="intrinsics.yaml (width, height, calibration: [fx, fy, cx, cy, k1, k2, p1, p2, (k3)]); "
                             "enables calibrated mode and undistortion")
    parser.add_argument("--checkpoint", default=None,
                        help="MASt3R checkpoint (.pth / .safetensors / folder) or Hugging Face repo id "
                             "(default: the official metric checkpoint)")
    parser.add_argument("--device", default=None, help="cuda | cpu | auto (overrides runtime.device)")
    parser.add_argument("--kernel-backend", default=None, choices=("auto", "cuda", "torch"),
                        help="overrides runtime.kernel_backend")
    parser.add_argument("--img-size", type=int, default=None, choices=(224, 512), help="overrides runtime.img_size")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: logs/<source name>)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--topic", default=None, help="image topic for rosbag2 sources")
    parser.add_argument("--conf-threshold", type=float, default=1.5, help="C/N threshold of the PLY map (default 1.5)")
    parser.add_argument("--voxel-size", type=float, default=0.0, help="voxel size of the PLY map (0 = no downsampling)")
    parser.add_argument("--sync-backend", action="store_true",
                        help="finish backend work after every keyframe (upstream single_thread / evaluation setting)")
    parser.add_argument("--skip-corrupt", action="store_true", help="drop unreadable images with a warning")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------- helpers
def _load_config(args: argparse.Namespace):
    from mast3r_slam_ros.config import load_config

    overrides: dict[str, Any] = {}
    rt: dict[str, Any] = {}
    if args.device is not None:
        rt["device"] = args.device
    if args.kernel_backend is not None:
        rt["kernel_backend"] = args.kernel_backend
    if args.img_size is not None:
        rt["img_size"] = args.img_size
    if args.sync_backend:
        rt["sync_backend"] = True
    if rt:
        overrides["runtime"] = rt
    if args.calib is not None:
        overrides["use_calib"] = True
    if args.config is not None and not Path(args.config).is_file():
        raise RunError(f"config file not found: {args.config}")
    try:
        return load_config(args.config, overrides or None)
    except ValueError as e:  # ConfigError names the key and the file
        raise RunError(f"bad configuration: {e}") from e


def read_intrinsics_yaml(path: Path):
    """Parse an upstream ``intrinsics.yaml`` (spec §10.2: ``width``, ``height``, ``calibration: [fx, fy, cx, cy,
    k1, k2, p1, p2, (k3)]``, OpenCV order) into ``io.sources.CameraIntrinsics``.

    Raises: RunError for a missing file or malformed content.
    """
    import yaml

    from mast3r_slam_ros.io.sources import CameraIntrinsics

    path = Path(path)
    if not path.is_file():
        raise RunError(f"calibration file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RunError(f"calibration file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or "calibration" not in data or "width" not in data or "height" not in data:
        raise RunError(f"calibration file {path} needs 'width', 'height' and 'calibration: [fx, fy, cx, cy, ...]'")
    try:
        return CameraIntrinsics.from_params([float(c) for c in data["calibration"]], int(data["width"]),
                                            int(data["height"]))
    except (TypeError, ValueError) as e:
        raise RunError(f"calibration file {path}: {e}") from e


def _open_source(args: argparse.Namespace, cfg):
    """Open the source; with calibrated mode (``--calib`` or ``use_calib``) images are undistorted by the source
    (spec §11.1) and its ``intrinsics`` are those of the undistorted images."""
    from mast3r_slam_ros.io import sources

    if not Path(args.source).exists():
        raise RunError(f"source not found: {args.source}")
    kw: dict[str, Any] = {}
    if args.topic:
        kw["topic"] = args.topic
    use_calib = bool(getattr(cfg, "use_calib", False))
    if args.calib is not None:
        kw["intrinsics"] = read_intrinsics_yaml(args.calib)
    if use_calib:
        kw["undistort"] = True
        kw["center_principal_point"] = bool(getattr(getattr(cfg, "dataset", None), "center_principle_point", True))
    try:
        source = sources.open_source(args.source, **kw)
    except (FileNotFoundError, ValueError, TypeError) as e:
        hint = " (pass --calib intrinsics.yaml)" if use_calib and args.calib is None else ""
        raise RunError(f"cannot open source {args.source}: {e}{hint}") from e
    try:
        n = len(source)
    except TypeError:
        n = None
    if n == 0:
        raise RunError(f"source {args.source} contains no images")
    K = None
    if use_calib:
        if source.intrinsics is None:
            raise RunError("use_calib is set but the source has no calibration; pass --calib intrinsics.yaml")
        K = np.asarray(source.intrinsics.K, dtype=np.float64)
    return source, n, K


def _looks_like_repo_id(s: str) -> bool:
    """``owner/name`` without a checkpoint file suffix (a Hugging Face repo id rather than a path)."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and \
        Path(s).suffix.lower() not in (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def _load_predictor(args: argparse.Namespace, cfg, device: str):
    from mast3r_slam_ros.network import load_predictor

    ckpt = args.checkpoint
    if ckpt is None:
        from mast3r_slam_ros.network import DEFAULT_REPO_ID

        ckpt = DEFAULT_REPO_ID
    elif not Path(ckpt).expanduser().exists() and not _looks_like_repo_id(str(ckpt)):
        raise RunError(f"checkpoint not found: {ckpt} (download the MASt3R checkpoint, pass its path with "
                       "--checkpoint, or write a test one with `mast3r-slam-ros make-test-checkpoint`)")
    precision = getattr(getattr(cfg, "runtime", None), "precision", "fp32")
    head_precision = getattr(getattr(cfg, "runtime", None), "head_precision", "fp32")
    try:
        return load_predictor(ckpt, device=device, precision=precision, head_precision=head_precision)
    except FileNotFoundError as e:
        raise RunError(f"checkpoint not found: {e}") from e
    except ValueError as e:  # CheckpointError is a ValueError
        raise RunError(f"cannot load checkpoint {ckpt}: {e}") from e


def _iterate(source, skip_corrupt: bool):
    """Yield samples; decoding errors become RunError (or are skipped with ``--skip-corrupt``) when the source
    reports them per item (indexable sources); otherwise the first error stops the run."""
    try:
        n = len(source)
    except TypeError:
        n = None
    if n is not None and hasattr(source, "__getitem__"):
        for i in range(n):
            try:
                yield source[i]
            except (OSError, ValueError) as e:
                if skip_corrupt:
                    log.warning("skipping unreadable frame %d: %s", i, e)
                    continue
                raise RunError(f"cannot read frame {i}: {e} (use --skip-corrupt to drop unreadable frames)") from e
        return
    it = iter(source)
    i = 0
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read frame {i}: {e}") from e
        i += 1
        yield sample


# ------------------------------------------------------------------------------------------------------ main job
def run(args: argparse.Namespace) -> dict:
    """Run SLAM on ``args.source``; returns the summary dict (also written to ``<out>/summary.json``)."""
    import torch

    from mast3r_slam_ros.io.export import save_keyframe_images, write_ply, write_tum
    from mast3r_slam_ros.slam.frame import Mode
    from mast3r_slam_ros.slam.system import SlamSystem, StampOrderError, resolve_device

    if args.max_frames is not None and args.max_frames < 1:
        raise RunError(f"--max-frames must be >= 1, got {args.max_frames}")
    cfg = _load_config(args)
    source, n_total, K = _open_source(args, cfg)
    out = Path(args.out) if args.out is not None else Path("logs") / Path(str(args.source).rstrip("/\\")).stem
    out.mkdir(parents=True, exist_ok=True)
    use_calib = bool(getattr(cfg, "use_calib", False))

    device = str(resolve_device(getattr(getattr(cfg, "runtime", None), "device", "auto")))
    predictor = _load_predictor(args, cfg, device)
    system = SlamSystem(predictor, cfg, K=K)
    sync = bool(getattr(getattr(cfg, "runtime", None), "sync_backend", False))

    total = n_total if args.max_frames is None else (min(n_total, args.max_frames) if n_total else args.max_frames)
    pbar = None
    if not args.no_progress:
        from tqdm import tqdm

        pbar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr)
    counts = {"frames": 0, "tracked": 0, "reloc_frames": 0, "relocalizations": 0, "dropped_stamps": 0}
    prev_state = system.state
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for sample in _iterate(source, args.skip_corrupt):
                if args.max_frames is not None and counts["frames"] >= args.max_frames:
                    break
                rgb = sample.rgb
                try:
                    res = system.track(rgb, int(sample.stamp_ns))
                except StampOrderError as e:
                    counts["dropped_stamps"] += 1
                    log.warning("%s", e)
                    continue
                except ValueError as e:
                    if args.skip_corrupt:
                        log.warning("skipping frame at %d ns: %s", sample.stamp_ns, e)
                        continue
                    raise RunError(f"bad image at stamp {sample.stamp_ns} ns: {e}") from e
                counts["frames"] += 1
                if res.state == Mode.RELOC:
                    counts["reloc_frames"] += 1
                else:
                    counts["tracked"] += 1
                if not sync:
                    system.backend_step()
                if prev_state == Mode.RELOC and system.state == Mode.TRACKING:
                    counts["relocalizations"] += 1
                prev_state = system.state
                if pbar is not None:
                    dt = time.perf_counter() - t0
                    pbar.update(1)
                    pbar.set_postfix(fps=f"{counts['frames'] / max(dt, 1e-9):.2f}", kf=len(system.keyframes()),
                                     state=system.state.name)
            while system.backend_step():  # drain: every queued keyframe gets its edges and global solve
                if prev_state == Mode.RELOC and system.state == Mode.TRACKING:
                    counts["relocalizations"] += 1
                prev_state = system.state
    finally:
        if pbar is not None:
            pbar.close()
    elapsed = time.perf_counter() - t0
    if counts["frames"] == 0:
        raise RunError(f"no frame of {args.source} could be processed")
    last_mode = system.state.name
    system.terminate()

    traj = system.trajectory()
    kf_traj = system.keyframe_trajectory()
    write_tum(out / "trajectory.txt", [s for s, _ in traj], [T for _, T in traj])
    write_tum(out / "keyframes.txt", [s for s, _ in kf_traj], [T for _, T in kf_traj])
    xyz, rgb = system.map_points(args.conf_threshold, 0.0)
    ply = write_ply(out / "map.ply", xyz, rgb, voxel_size=args.voxel_size)
    store = system.keyframes()
    save_keyframe_images(out / "keyframes", [f.uimg for f in store], [f.frame_id for f in store],
                         [f.stamp_ns for f in store])
    backend = system.backend
    summary = {
        "source": str(args.source),
        "out": str(out),
        **counts,
        "keyframes": len(store),
        "elapsed_s": elapsed,
        "fps": counts["frames"] / elapsed if elapsed > 0 else None,
        "final_state": last_mode,
        "loop_closures": int(getattr(backend, "loop_closures", 0)) if backend is not None else 0,
        "map_points": int(ply.n_written),
        "use_calib": use_calib,
        "device": device,
        "kernel_backend": __import__("mast3r_slam_ros.kernels", fromlist=["backend"]).backend(),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "default",
        "files": {"trajectory": "trajectory.txt", "keyframes": "keyframes.txt", "map": "map.ply",
                  "keyframe_images": "keyframes/"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(args: argparse.Namespace) -> int:
    """Entry point: returns 0 on success, 2 on a user-facing error (printed as ``error: ...``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"processed {summary['frames']} frames ({summary['fps']:.2f} FPS), {summary['keyframes']} keyframes, "
          f"{summary['map_points']} map points -> {summary['out']}")
    return 0
