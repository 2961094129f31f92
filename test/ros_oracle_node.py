"""Test-only entry script: the real ``mast3r_slam`` node (``SlamNode`` + real ``SlamSystem``) with the oracle predictor
of a rendered synthetic sequence, for the separate-process ROS tests. Not installed; the runtime has no test hook.

    python test/ros_oracle_node.py --sequence slow_translation --frames 6 --size 224 --ros-args -p ... -r ...

The sequence is rendered with the same arguments as the test that writes the bag (rendering is deterministic), so
the images the node receives are the oracle's frames.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequence", default="slow_translation")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    opts = parser.parse_args(argv[:split])

    import torch

    torch.set_num_threads(1)
    from mast3r_slam_ros.ros.node import main as node_main
    from mast3r_slam_ros.testing import OraclePredictor, render_sequence

    seq = render_sequence(opts.sequence, n_frames=opts.frames, size=(opts.size, opts.size))
    return node_main(["slam_node", *argv[split:]], predictor=OraclePredictor(seq))


if __name__ == "__main__":
    sys.exit(main())
