"""``mast3r-slam-ros bench-synthetic``: the synthetic benchmark suite with the oracle predictor.

Renders the sequences of spec/test_data.md §2 (``slow_translation``, ``rotation_heavy``, ``loop``, ``textureless``)
with :func:`mast3r_slam_ros.testing.render_sequence`, runs the full :class:`~mast3r_slam_ros.slam.system.SlamSystem`
(tracking, keyframes, backend with retrieval loop closure, relocalization) on every frame with
:class:`~mast3r_slam_ros.testing.oracle.OraclePredictor` standing in for MASt3R, and prints one row per run:

``ATE RMSE`` (m, every frame, Sim(3) Umeyama alignment through ``evo``; ``apps/evaluate.py``), ``ATE / length`` (%
of the GT trajectory length), keyframes, loop closures detected (accepted retrieval edges to keyframes at least
``Backend.loop_min_gap`` older), relocalizations, frames lost (RELOC), FPS (frames / wall time of ``track`` +
backend, rendering excluded).

``--ablate-loop-closure`` runs every sequence twice (loop closure on and off) so the effect of loop closure on the
ATE is printed side by side. The backend runs synchronously after every keyframe (``runtime.sync_backend``, the
upstream evaluation setting) so results are deterministic.

Timings depend on the machine (CPU: the PyTorch kernels; GPU: CUDA kernels if built); the oracle replaces the
network, so FPS measures the SLAM machinery only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

SUITE = ("slow_translation", "rotation_heavy", "loop", "textureless")

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """One benchmark run (see the module docstring for the columns)."""

    sequence: str
    loop_closure: bool
    frames: int
    size: str
    ate_rmse: float
    ate_rel_pct: float
    traj_length: float
    keyframes: int
    edges: int
    loop_closures: int
    relocalizations: int
    frames_lost: int
    fps: float
    wall_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the command-line options of ``bench-synthetic``."""
    p.add_argument("--sequences", nargs="+", default=list(SUITE), choices=list(SUITE) + ["static"],
                   help="sequences to run (default: the 4-sequence suite)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per sequence (the same path resampled; default: the suite's count, 150/150/270/150)")
    p.add_argument("--size", default="224x224",
                   help="render size WxH (224x224 and 512x384 are identity-sized for img_size 224 / 512)")
    p.add_argument("--img-size", type=int, choices=(224, 512), default=None,
                   help="network image size (default: 512 if the render width is 512, else 224)")
    p.add_argument("--no-loop-closure", action="store_true", help="disable loop-closure edges (runtime.loop_closure)")
    p.add_argument("--ablate-loop-closure", action="store_true",
                   help="run every sequence with loop closure on AND off")
    p.add_argument("--noise", choices=("none", "default", "realistic"), default="realistic",
                   help="oracle noise model (OracleNoise.none / OracleNoise() / OracleNoise.realistic)")
    p.add_argument("--seed", type=int, default=0, help="texture and oracle-noise seed")
    p.add_argument("--device", default="auto", help="runtime.device (auto|cpu|cuda)")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "cuda", "torch"))
    p.add_argument("--config", default=None, help="YAML config (defaults: upstream base.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set matching.radius=0 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="log INFO messages of the SLAM core")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WxH (e.g. 224x224), got {text!r}") from None
    if w < 16 or h < 16:
        raise ValueError(f"--size too small: {text}")
    return w, h


def _overrides(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        import yaml

        out[k.strip()] = yaml.safe_load(v)
    return out


def _poses7_from_matrices(T: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(T[:, :3, :3]).as_quat()
    return np.concatenate([T[:, :3, 3], q], axis=1)


def run_one(name: str, *, frames: int | None, size: tuple[int, int], img_size: int, loop_closure: bool,
            noise: str, seed: int, device: str, kernel_backend: str, config: str | None, overrides: dict,
            seq=None) -> BenchRow:
    """Render (unless ``seq`` is given) and run one sequence; returns its :class:`BenchRow`."""
    from mast3r_slam_ros.apps.evaluate import ate_from_poses
    from mast3r_slam_ros.config import load_config
    from mast3r_slam_ros.slam.frame import Mode
    from mast3r_slam_ros.slam.system import SlamSystem
    from mast3r_slam_ros.testing.oracle import OracleNoise, OraclePredictor
    from mast3r_slam_ros.testing.scenes import render_sequence

    if seq is None:
        seq = render_sequence(name, n_frames=frames, size=size, seed=seed)
    nz = {"none": OracleNoise.none(seed), "default": OracleNoise(seed=seed),
          "realistic": OracleNoise.realistic(seed)}[noise]
    pred = OraclePredictor(seq, noise=nz)
    ov = {"runtime.device": device, "runtime.kernel_backend": kernel_backend, "runtime.img_size": img_size,
          "runtime.sync_backend": True, "runtime.loop_closure": loop_closure}
    ov.update(overrides)
    cfg = load_config(config, ov)
    slam = SlamSystem(pred, cfg)
    lost = 0
    t0 = time.perf_counter()
    for i in range(len(seq)):
        r = slam.track(seq.images[i], int(seq.stamps_ns[i]))
        lost += int(r.state == Mode.RELOC)
    wall = time.perf_counter() - t0
    traj = slam.trajectory()
    stamps = np.array([s for s, _ in traj], dtype=np.float64) * 1e-9
    est = np.stack([T.data.reshape(-1)[:7].double().cpu().numpy() for _, T in traj])
    gt = _poses7_from_matrices(seq.T_WC_gt)
    try:
        ate_rmse = ate_from_poses(stamps, est, seq.stamps_ns.astype(np.float64) * 1e-9, gt, max_diff=1e-3,
                                  correct_scale=True).rmse
    except Exception as exc:  # noqa: BLE001 - evo's GeometryException: e.g. a straight-line path cannot fix a rotation
        logging.getLogger(__name__).warning("%s: no ATE (%s: %s)", name, type(exc).__name__, exc)
        ate_rmse = float("nan")
    length = seq.trajectory_length()
    be = slam.backend
    n_reloc = getattr(be, "n_relocalizations", 0)
    return BenchRow(sequence=name, loop_closure=loop_closure, frames=len(seq), size=f"{seq.size[0]}x{seq.size[1]}",
                    ate_rmse=ate_rmse, ate_rel_pct=100.0 * ate_rmse / max(length, 1e-9), traj_length=length,
                    keyframes=len(slam.store), edges=len(be.graph) if be is not None else 0,
                    loop_closures=be.loop_closures if be is not None else 0, relocalizations=n_reloc,
                    frames_lost=lost, fps=len(seq) / wall, wall_s=wall)


def format_table(rows: list[BenchRow]) -> str:
    """Fixed-width text table of the rows."""
    head = (f"{'sequence':<17} {'LC':<3} {'frames':>6} {'size':>8} {'ATE [m]':>9} {'ATE/len':>8} {'KFs':>4} "
            f"{'edges':>5} {'loops':>5} {'reloc':>5} {'lost':>4} {'FPS':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.sequence:<17} {'on' if r.loop_closure else 'off':<3} {r.frames:>6} {r.size:>8} "
                     f"{r.ate_rmse:>9.4f} {r.ate_rel_pct:>7.2f}% {r.keyframes:>4} {r.edges:>5} {r.loop_closures:>5} "
                     f"{r.relocalizations:>5} {r.frames_lost:>4} {r.fps:>6.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite and print the table (or JSON). Returns the exit code (2 on bad arguments)."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        size = _parse_size(args.size)
        overrides = _overrides(args.set)
        if args.frames is not None and args.frames < 3:
            raise ValueError("--frames must be >= 3")
    except ValueError as e:
        print(f"bench-synthetic: {e}", file=sys.stderr)
        return 2
    img_size = args.img_size or (512 if size[0] >= 512 else 224)
    modes = [True, False] if args.ablate_loop_closure else [not args.no_loop_closure]
    rows: list[BenchRow] = []
    from mast3r_slam_ros.testing.scenes import render_sequence

    for name in args.sequences:
        seq = render_sequence(name, n_frames=args.frames, size=size, seed=args.seed)
        for lc in modes:
            row = run_one(name, frames=args.frames, size=size, img_size=img_size, loop_closure=lc, noise=args.noise,
                          seed=args.seed, device=args.device, kernel_backend=args.kernel_backend,
                          config=args.config, overrides=overrides, seq=seq)
            rows.append(row)
            if not args.json:
                print(f"{name} (loop closure {'on' if lc else 'off'}): ATE {row.ate_rmse:.4f} m, "
                      f"{row.keyframes} keyframes, {row.loop_closures} loop closures, {row.fps:.2f} FPS",
                      file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"noise": args.noise, "img_size": img_size, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows))
    return 0
