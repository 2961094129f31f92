"""Numeric precision of the network: one parameter, ``"fp32" | "tf32" | "bf16" | "fp16"``.

* ``fp32``: full float32 (TF32 explicitly off for matmuls and cuDNN convolutions while the network runs).
* ``tf32``: float32 tensors, TF32 tensor-core matmuls/convolutions allowed (the upstream SLAM setting, spec §5).
* ``bf16`` / ``fp16``: autocast of the encoder and decoder to that dtype (the upstream-measured GPU setting; CPU
  autocast works too but is slow), heads in float32 with autocast off and TF32 allowed.

A second, independent parameter, the **head precision** ``"fp32" | "bf16" | "fp16"`` (:data:`HEAD_PRECISIONS`,
``runtime.head_precision``), selects the dtype in which the DPT convolutions and the local-feature MLP of the two
``catmlp+dpt`` heads run (their weights are stored in that dtype, see ``Mast3rModel.set_head_precision``); the final
1x1 output convolution and the post-processing always stay float32. ``fp32`` (default) is the upstream behaviour.

The flags are set only inside :func:`precision_context` and restored afterwards, so other code is not affected.
RoPE angles are always computed in fp32 (see ``rope.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def check_precision(precision: str) -> str:
    """Validate and normalise a precision name (case-insensitive); raises ValueError listing the valid names."""
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string, one of {PRECISIONS}, got {type(precision).__name__}")
    p = precision.strip().lower()
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return p


#: head precisions (``runtime.head_precision``); ``fp32`` = upstream float32 heads
HEAD_PRECISIONS = ("fp32", "bf16", "fp16")


def check_head_precision(precision: str) -> str:
    """Validate and normalise a head precision name (case-insensitive); raises ValueError listing the valid names."""
    if not isinstance(precision, str):
        raise TypeError(f"head_precision must be a string, one of {HEAD_PRECISIONS}, got {type(precision).__name__}")
    p = precision.strip().lower()
    if p not in HEAD_PRECISIONS:
        raise ValueError(f"unknown head_precision {precision!r}; expected one of {', '.join(HEAD_PRECISIONS)}")
    return p


def head_dtype(head_precision: str) -> torch.dtype:
    """The compute dtype of the head convolutions / MLP for ``head_precision`` (float32, bfloat16 or float16)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[check_head_precision(head_precision)]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of the encoder/decoder for ``precision`` (None for fp32/tf32)."""
    p = check_precision(precision)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Allow/forbid TF32 for CUDA matmuls and cuDNN convolutions inside the block, restoring the state after.

    Uses the ``fp32_precision`` API of torch >= 2.9 when present (mixing it with the legacy ``allow_tf32`` flags
    makes torch raise), else the legacy flags.
    """
    mm = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(mm, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        old = (mm.fp32_precision, conv.fp32_precision)
        mode = "tf32" if enabled else "ieee"
        mm.fp32_precision = mode
        conv.fp32_precision = mode
        try:
            yield
        finally:
            mm.fp32_precision, conv.fp32_precision = old
        return
    old_legacy = (mm.allow_tf32, torch.backends.cudnn.allow_tf32)
    mm.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        mm.allow_tf32, torch.backends.cudnn.allow_tf32 = old_legacy


@contextlib.contextmanager
def precision_context(precision: str, device_type: str, part: str = "trunk") -> Iterator[None]:
    """Context for running one part of the network at ``precision``.

    Args:
        precision: ``"fp32" | "tf32" | "bf16" | "fp16"``.
        device_type: ``"cuda"`` or ``"cpu"`` (the device of the inputs).
        part: ``"trunk"`` (encoder/decoder: autocast for bf16/fp16) or ``"head"`` (always float32, autocast off,
            TF32 allowed unless precision is ``"fp32"``).

    Raises:
        ValueError: on an unknown precision or part.
    """
    p = check_precision(precision)
    if part not in ("trunk", "head"):
        raise ValueError(f"part must be 'trunk' or 'head', got {part!r}")
    allow_tf32 = p != "fp32"
    dtype = autocast_dtype(p) if part == "trunk" else None
    with _tf32(allow_tf32):
        if dtype is None:
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        else:
            with torch.autocast(device_type=device_type, dtype=dtype):
                yield
