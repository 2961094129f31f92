"""``mast3r-slam-ros make-test-checkpoint``: write a small random MASt3R checkpoint in the official format.

The file is a ``torch.save`` dict ``{'model': state_dict, 'args': argparse.Namespace(model="AsymmetricMASt3R(...)")}``
exactly like ``MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth`` (spec ``mast3r_network.md`` §1.3), so every
loading path (``load_model``, the SLAM CLI, the ROS node) can be exercised without the 2.75 GB download. Its
outputs are meaningless. ``--size tiny`` is the fixture's tiny config (about 215 MB: the DPT heads have a fixed
width); ``--size full`` is the real architecture (2.75 GB).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sub-command's options."""
    parser.add_argument("--out", required=True, type=Path, help="output .pth path")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="architecture size (default tiny)")
    parser.add_argument("--init", choices=("random", "keyed"), default="random",
                        help="random (seeded CroCo-style init) or keyed (the fixtures' deterministic weights)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for --init random")


def make_checkpoint(out: Path, size: str = "tiny", init: str = "random", seed: int = 0) -> Path:
    """Build a model of ``size``, initialise it and save it in the official checkpoint format.

    Returns:
        The written path. Raises ValueError for an unknown size/init and OSError if the file cannot be written.
    """
    import torch

    from mast3r_slam_ros.network.keyed import apply_keyed_weights
    from mast3r_slam_ros.network.loader import config_to_model_string
    from mast3r_slam_ros.network.model import Mast3rConfig, Mast3rModel

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    if init not in ("random", "keyed"):
        raise ValueError(f"init must be 'random' or 'keyed', got {init!r}")
    cfg = Mast3rConfig.tiny() if size == "tiny" else Mast3rConfig.full()
    torch.manual_seed(seed)
    model = Mast3rModel(cfg)
    if init == "keyed":
        apply_keyed_weights(model)
    ckpt = {"model": model.state_dict(), "args": argparse.Namespace(model=config_to_model_string(cfg))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    torch.save(ckpt, tmp)
    tmp.replace(out)  # atomic: a crash never leaves a truncated checkpoint under the final name
    return out


def main(args: argparse.Namespace) -> int:
    """Entry point; prints the written path and its size."""
    out = make_checkpoint(args.out, args.size, args.init, args.seed)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.size}, init={args.init})")
    return 0
