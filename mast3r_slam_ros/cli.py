"""``mast3r-slam-ros`` command line: one entry point, one sub-command per job (evo-style).

Sub-commands (each implemented in ``mast3r_slam_ros/apps/<module>.py``):

- ``run``                  the SLAM main job on a folder / video / TUM / EuRoC / rosbag2 source, without ROS
- ``eval``                 ATE RMSE of an estimated TUM trajectory against ground truth (evo, Sim(3) alignment)
- ``bench-synthetic``      synthetic benchmark suite with the oracle predictor
- ``make-test-checkpoint`` write a small randomly initialized checkpoint in the official MASt3R format
- ``replay``               publish a rosbag2's images through rclpy (needs ROS 2), optionally recording the outputs
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command name -> (module under mast3r_slam_ros.apps, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "run SLAM on an image folder, video, TUM/EuRoC folder or rosbag2 (no ROS needed)"),
    "eval": ("evaluate", "ATE RMSE of a TUM trajectory against ground truth (Sim(3)-aligned, evo)"),
    "bench-synthetic": ("bench_synthetic", "run the synthetic benchmark suite with the oracle predictor"),
    "make-test-checkpoint": ("make_checkpoint", "write a small random checkpoint in the official format"),
    "replay": ("replay", "publish a rosbag2's image topics through rclpy (optionally record the outputs)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the sub-command actually named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(prog="mast3r-slam-ros", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            mod = importlib.import_module(f"mast3r_slam_ros.apps.{module}")
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mast3r-slam-ros`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
