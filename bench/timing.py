"""Shared timer of the ``bench/`` scripts (imported as ``timing`` when a script runs as ``python bench/<name>.py``)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timer(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times, then return the times of ``repeats`` runs in milliseconds (CUDA events around
    each run on a GPU, ``time.perf_counter`` on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times
