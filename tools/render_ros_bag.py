#!/usr/bin/env python3
"""Render what RViz would show from a bag recorded with ``mast3r-slam-ros replay --record``: the last ``~/map``
PointCloud2 (RGB points), the last ``~/path`` and the keyframe poses, in the map frame, as a PNG (matplotlib, no
display needed).

    python tools/render_ros_bag.py OUT_BAG docs/images/ros_outputs.png [--max-points 40000] [--title TEXT]

Reads the bag with ``rosbags`` (ROS 2 Humble typestore); needs no rclpy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def load_outputs(bag: Path, node: str = "/mast3r_slam") -> dict:
    """Last map cloud ``(xyz [N,3] f32, rgb [N,3] u8)``, path ``[M,3]`` and keyframe positions ``[K,3]`` of a bag."""
    from mast3r_slam_ros.ros.bagio import read_messages

    last: dict = {}
    for topic, _, msg in read_messages(bag, [f"{node}/map", f"{node}/path", f"{node}/keyframes"]):
        last[topic.rsplit("/", 1)[-1]] = msg
    if "map" not in last or "path" not in last:
        raise ValueError(f"{bag} has no {node}/map or {node}/path message")
    cloud = last["map"]
    names = [f.name for f in cloud.fields]
    if names[:4] != ["x", "y", "z", "rgb"] or cloud.point_step != 16:
        raise ValueError(f"unexpected cloud layout {names} point_step {cloud.point_step}")
    rec = np.frombuffer(bytes(cloud.data), dtype=np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("c", "<u4")]))
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], 1)
    rgb = np.stack([(rec["c"] >> 16) & 255, (rec["c"] >> 8) & 255, rec["c"] & 255], 1).astype(np.uint8)
    path = np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in last["path"].poses])
    kfs = np.array([[p.position.x, p.position.y, p.position.z] for p in last["keyframes"].poses]) \
        if "keyframes" in last else np.zeros((0, 3))
    return {"xyz": xyz, "rgb": rgb, "path": path, "keyframes": kfs, "frame": cloud.header.frame_id}


def render(out: dict, png: Path, max_points: int = 40000, title: str = "") -> Path:
    """Two views (3-D perspective and top-down x-y) of the cloud, path and keyframes; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xyz, rgb, path, kfs = out["xyz"], out["rgb"], out["path"], out["keyframes"]
    keep = np.isfinite(xyz).all(1)
    xyz, rgb = xyz[keep], rgb[keep]
    if len(xyz) > max_points:
        idx = np.random.default_rng(0).choice(len(xyz), max_points, replace=False)
        xyz, rgb = xyz[idx], rgb[idx]
    fig = plt.figure(figsize=(13, 6))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.scatter(*xyz.T, c=rgb / 255.0, s=0.4, depthshade=False)
    ax.plot(*path.T, "r-", lw=2, label=f"~/path ({len(path)} poses)")
    if len(kfs):
        ax.scatter(*kfs.T, c="deepskyblue", s=25, marker="^", label=f"~/keyframes ({len(kfs)})")
    ax.set_xlabel("x [map]")
    ax.set_ylabel("y [map]")
    ax.set_zlabel("z [map]")
    ax.view_init(elev=25, azim=-150)
    ax.legend(loc="upper left", fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.scatter(xyz[:, 0], xyz[:, 1], c=rgb / 255.0, s=0.3)
    ax2.plot(path[:, 0], path[:, 1], "r-", lw=2)
    if len(kfs):
        ax2.scatter(kfs[:, 0], kfs[:, 1], c="deepskyblue", s=25, marker="^")
    ax2.set_aspect("equal")
    ax2.set_xlabel("x [map]")
    ax2.set_ylabel("y [map]")
    ax2.set_title(f"top view (frame '{out['frame']}', REP-103 axes)")
    fig.suptitle(title or f"~/map: {len(out['xyz'])} points")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bag", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--max-points", type=int, default=40000)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    out = load_outputs(a.bag)
    print(f"cloud {len(out['xyz'])} points, path {len(out['path'])} poses, keyframes {len(out['keyframes'])} "
          f"-> {render(out, a.png, a.max_points, a.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
