"""``mast3r-slam-ros eval``: absolute trajectory error (ATE) of an estimated TUM trajectory against ground truth.

Method (the MASt3R-SLAM evaluation, upstream ``scripts/eval_*.sh`` = ``evo_ape tum gt est -as``):

1. read both TUM files (``timestamp tx ty tz qx qy qz qw``) with ``evo.tools.file_interface``;
2. associate poses by nearest timestamp within ``--max-diff`` seconds (``evo.core.sync.associate_trajectories``);
3. align the estimate to the ground truth with Umeyama's method (Umeyama, PAMI 1991): Sim(3) by default (monocular
   SLAM is up to scale), SE(3) with ``--no-scale`` (``PosePath3D.align(correct_scale=...)``);
4. ATE = statistics of the translation error ``||t_gt - (s R t_est + t)||`` over the associated pairs
   (``evo.core.metrics.APE`` with ``PoseRelation.translation_part``), in the ground truth's unit (metres for TUM).

Prints a small table (rmse, mean, median, std, min, max, pairs, scale) and optionally writes a trajectory plot (PNG,
matplotlib Agg) and the numbers as JSON. Exit status 0 on success, 2 on bad input (missing file, no associated pairs).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["AteResult", "ate_from_poses", "compute_ate", "plot_trajectories", "add_arguments", "main"]


@dataclass
class AteResult:
    """ATE statistics (ground-truth units) and the alignment that produced them.

    ``rotation [3,3]``, ``translation [3]``, ``scale`` map estimate positions to ground truth:
    ``p_gt ≈ scale * rotation @ p_est + translation``. ``stamps [n]`` (s), ``gt_xyz [n,3]``, ``est_xyz_aligned [n,3]``
    and ``errors [n]`` are the associated pairs.
    """

    rmse: float
    mean: float
    median: float
    std: float
    min: float
    max: float
    n_pairs: int
    n_est: int
    n_gt: int
    scale: float
    correct_scale: bool
    rotation: np.ndarray = field(repr=False)
    translation: np.ndarray = field(repr=False)
    stamps: np.ndarray = field(repr=False)
    gt_xyz: np.ndarray = field(repr=False)
    est_xyz_aligned: np.ndarray = field(repr=False)
    errors: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        """The scalar fields as a JSON-friendly dict."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}


def _trajectory(stamps_s, poses7, name: str):
    """Build an ``evo`` PoseTrajectory3D from ``stamps [T]`` (s) and ``poses [T,7]`` (tx,ty,tz,qx,qy,qz,qw)."""
    from evo.core.trajectory import PoseTrajectory3D

    stamps = np.asarray(stamps_s, dtype=np.float64).reshape(-1)
    poses = np.asarray(poses7, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 7:
        raise ValueError(f"{name}: poses must have shape [T,7] (tx,ty,tz,qx,qy,qz,qw), got {tuple(poses.shape)}")
    if len(stamps) != len(poses):
        raise ValueError(f"{name}: {len(stamps)} stamps but {len(poses)} poses")
    if len(poses) == 0:
        raise ValueError(f"{name}: empty trajectory")
    if not (np.all(np.isfinite(poses)) and np.all(np.isfinite(stamps))):
        raise ValueError(f"{name}: non-finite values in the trajectory")
    return PoseTrajectory3D(positions_xyz=poses[:, :3], orientations_quat_wxyz=poses[:, [6, 3, 4, 5]],
                            timestamps=stamps)


def _ate(traj_est, traj_gt, max_diff: float, correct_scale: bool) -> AteResult:
    from evo.core import metrics, sync

    n_est, n_gt = traj_est.num_poses, traj_gt.num_poses
    try:
        gt_sync, est_sync = sync.associate_trajectories(traj_gt, traj_est, max_diff=max_diff)
    except sync.SyncException as exc:
        raise ValueError(f"no associated poses within max_diff={max_diff} s: {exc}") from None
    if gt_sync.num_poses < 3:
        raise ValueError(f"only {gt_sync.num_poses} associated pose pair(s) within max_diff={max_diff} s; "
                         "Umeyama alignment needs at least 3")
    est_aligned = copy.deepcopy(est_sync)
    rot, trans, scale = est_aligned.align(gt_sync, correct_scale=correct_scale)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((gt_sync, est_aligned))
    st = ape.get_all_statistics()
    return AteResult(
        rmse=float(st["rmse"]), mean=float(st["mean"]), median=float(st["median"]), std=float(st["std"]),
        min=float(st["min"]), max=float(st["max"]), n_pairs=int(gt_sync.num_poses), n_est=int(n_est),
        n_gt=int(n_gt), scale=float(scale), correct_scale=bool(correct_scale), rotation=np.asarray(rot),
        translation=np.asarray(trans).reshape(3), stamps=np.asarray(gt_sync.timestamps),
        gt_xyz=np.asarray(gt_sync.positions_xyz), est_xyz_aligned=np.asarray(est_aligned.positions_xyz),
        errors=np.asarray(ape.error),
    )


def ate_from_poses(stamps_est_s, poses_est, stamps_gt_s, poses_gt, *, max_diff: float = 0.01,
                   correct_scale: bool = True) -> AteResult:
    """ATE of in-memory trajectories (same method as :func:`compute_ate`).

    Args:
        stamps_est_s, stamps_gt_s: ``[T]`` float seconds.
        poses_est, poses_gt: ``[T,7]`` float ``(tx,ty,tz,qx,qy,qz,qw)`` (``T_WC`` camera centres and orientations).
        max_diff: association tolerance in seconds.
        correct_scale: Sim(3) alignment (True) or SE(3) (False).
    Raises:
        ValueError: bad shapes, non-finite values, fewer than 3 associated pairs.
    """
    return _ate(_trajectory(stamps_est_s, poses_est, "estimate"), _trajectory(stamps_gt_s, poses_gt, "ground truth"),
                max_diff, correct_scale)


def compute_ate(est_path: str | Path, gt_path: str | Path, *, max_diff: float = 0.01,
                correct_scale: bool = True) -> AteResult:
    """ATE RMSE (and statistics) of the TUM trajectory ``est_path`` against ``gt_path`` (see module docstring).

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is malformed or fewer than 3 poses associate.
    """
    from evo.tools import file_interface

    trajs = []
    for label, p in (("estimate", Path(est_path)), ("ground truth", Path(gt_path))):
        if not p.is_file():
            raise FileNotFoundError(f"{label} trajectory not found: {p}")
        try:
            trajs.append(file_interface.read_tum_trajectory_file(str(p)))
        except file_interface.FileInterfaceException as exc:
            raise ValueError(f"{label} trajectory {p} is not a TUM file: {exc}") from None
    if max_diff <= 0:
        raise ValueError(f"max_diff must be > 0 seconds, got {max_diff}")
    return _ate(trajs[0], trajs[1], max_diff, correct_scale)


def plot_trajectories(result: AteResult, path: str | Path, title: str = "") -> Path:
    """Write a PNG: ground truth vs aligned estimate (top view on the two axes of largest extent) + error over time.

    The file is written atomically (``io.export.atomic_write``). Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mast3r_slam_ros.io.export import atomic_write

    gt, est = result.gt_xyz, result.est_xyz_aligned
    ax_ids = np.sort(np.argsort(np.ptp(gt, axis=0))[::-1][:2])
    names = "xyz"
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    ax0.plot(gt[:, ax_ids[0]], gt[:, ax_ids[1]], "-", color="0.3", lw=1.5, label="ground truth")
    ax0.plot(est[:, ax_ids[0]], est[:, ax_ids[1]], "-", color="tab:blue", lw=1.2,
             label="estimate (Sim(3)-aligned)" if result.correct_scale else "estimate (SE(3)-aligned)")
    ax0.plot(gt[0, ax_ids[0]], gt[0, ax_ids[1]], "o", color="tab:green", label="start")
    ax0.set_xlabel(names[ax_ids[0]])
    ax0.set_ylabel(names[ax_ids[1]])
    ax0.set_aspect("equal", adjustable="datalim")
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=8)
    t = result.stamps - result.stamps[0]
    ax1.plot(t, result.errors, color="tab:red", lw=1.0)
    ax1.axhline(result.rmse, color="k", ls="--", lw=0.8, label=f"RMSE {result.rmse:.4f}")
    ax1.set_xlabel("time [s]")
    ax1.set_ylabel("translation error")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title or f"ATE RMSE {result.rmse:.4f} ({result.n_pairs} pairs, scale {result.scale:.4g})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = Path(path)
    with atomic_write(out, "wb") as fh:
        fh.write(buf.getvalue())
    return out


def format_table(result: AteResult, est_name: str = "", gt_name: str = "") -> str:
    """The text table printed by the command."""
    align = "Sim(3)" if result.correct_scale else "SE(3)"
    rows = [
        f"ATE (translation, {align} Umeyama alignment, evo)" + (f"  est={est_name} gt={gt_name}" if est_name else ""),
        f"  {'rmse':<8}{result.rmse:12.6f}",
        f"  {'mean':<8}{result.mean:12.6f}",
        f"  {'median':<8}{result.median:12.6f}",
        f"  {'std':<8}{result.std:12.6f}",
        f"  {'min':<8}{result.min:12.6f}",
        f"  {'max':<8}{result.max:12.6f}",
        f"  {'pairs':<8}{result.n_pairs:12d}   (estimate {result.n_est} poses, ground truth {result.n_gt})",
        f"  {'scale':<8}{result.scale:12.6g}",
    ]
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mast3r-slam-ros eval``."""
    parser.add_argument("est", type=Path, help="estimated trajectory, TUM format (timestamp tx ty tz qx qy qz qw)")
    parser.add_argument("gt", type=Path, help="ground-truth trajectory, TUM format")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="write a trajectory plot (PNG)")
    parser.add_argument("--no-scale", action="store_true", help="SE(3) alignment (no scale correction)")
    parser.add_argument("--max-diff", type=float, default=0.01, metavar="SEC",
                        help="max timestamp difference for associating poses (default 0.01 s)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the statistics as JSON")


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit status (0 ok, 2 bad input)."""
    try:
        result = compute_ate(args.est, args.gt, max_diff=args.max_diff, correct_scale=not args.no_scale)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mast3r-slam-ros eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result, str(args.est), str(args.gt)))
    if args.plot is not None:
        print(f"plot: {plot_trajectories(result, args.plot)}")
    if args.json is not None:
        from mast3r_slam_ros.io.export import atomic_write

        with atomic_write(args.json, "w") as fh:
            json.dump(result.summary(), fh, indent=2)
        print(f"json: {args.json}")
    return 0
