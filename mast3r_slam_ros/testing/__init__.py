"""Test support for mast3r_slam_ros (like ``numpy.testing``): synthetic scenes with exact ground truth and an oracle
predictor. Used by tests and benchmarks, never by the runtime."""

from __future__ import annotations

from mast3r_slam_ros.testing.oracle import HeadOutput, OracleNoise, OraclePredictor, descriptor_embedding
from mast3r_slam_ros.testing.scenes import (
    SEQUENCES,
    Room,
    SyntheticSequence,
    build_room,
    intrinsics_for,
    look_at,
    render_poses,
    render_sequence,
    sequence_poses,
)

__all__ = [
    "HeadOutput",
    "OracleNoise",
    "OraclePredictor",
    "Room",
    "SEQUENCES",
    "SyntheticSequence",
    "build_room",
    "descriptor_embedding",
    "intrinsics_for",
    "look_at",
    "render_poses",
    "render_sequence",
    "sequence_poses",
]
