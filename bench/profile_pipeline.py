#!/usr/bin/env python3
"""torch.profiler table of the SLAM tracking loop (per-op device and host time), to find what a stage spends.

Runs ``bench/pipeline.py``'s hybrid setup (``--variant``, default ``none`` = oracle only) for ``--warm`` frames, then
profiles ``--frames`` more and prints the ops sorted by total device time, with the stage functions labelled
(``record_function``). Usage: ``python bench/profile_pipeline.py --variant none --frames 30``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as P  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="none")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    from mast3r_slam_ros.config import load_config
    from mast3r_slam_ros.testing.scenes import intrinsics_for, sequence_poses

    n = args.warm + args.frames
    oracle = P.BoxRoomOracle(sequence_poses("loop", 500), intrinsics_for((512, 384)), (384, 512), dev)
    images = [oracle.colors(i) for i in range(n)]
    model = None
    if args.variant != "none":
        with torch.device(dev):
            model = P.Mast3rModel(P.Mast3rConfig.full())
        model.eval()
    hyb = P.HybridPredictor(P.build_network(args.variant, model), oracle)
    system = P.SlamSystem(hyb, load_config(None, {"runtime.device": "cuda", "runtime.sync_backend": False}))
    for name in ("opt_pose_ray_dist_sim3", "opt_pose_calib_sim3"):
        orig = getattr(P.tracker_mod, name)

        def labelled(*a, _orig=orig, **kw):
            with record_function("tracking_solve"):
                return _orig(*a, **kw)

        setattr(P.tracker_mod, name, labelled)
    for i in range(args.warm):
        hyb.next_index = i
        system.track(images[i], 10**9 + i)
        system.backend_step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.warm, n):
            hyb.next_index = i
            system.track(images[i], 10**9 + i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
