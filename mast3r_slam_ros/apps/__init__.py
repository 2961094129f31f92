"""Sub-commands of the ``mast3r-slam-ros`` command line.

Each module here exposes ``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``main(args) -> int`` and is
imported lazily by :mod:`mast3r_slam_ros.cli`, so ``mast3r-slam-ros --help`` stays fast and a sub-command's heavy
dependencies (torch, rclpy, evo) load only when it runs.
"""
