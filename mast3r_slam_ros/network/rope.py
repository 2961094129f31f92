"""2-D rotary position embedding (RoPE) of CroCo/MASt3R, frequency base 100.

Math (spec ``mast3r_network.md`` §3.2): per attention head of width D (a multiple of 4), channels ``[0, D/2)`` encode
the token's row ``y`` and channels ``[D/2, D)`` its column ``x``. Inside each half, channel ``k`` (k < D/4) is paired
with channel ``k + D/4`` ("rotate-half" layout) and rotated by the angle ``theta_k = p * base^(-k/(D/4))`` where ``p``
is the row (first half) or the column (second half)::

    u' = u cos(theta) - v sin(theta)
    v' = v cos(theta) + u sin(theta)

Angles, cosines and sines are always computed in float32 (and the rotation is done in float32) whatever the token
dtype; the result is cast back to the token dtype. This is more accurate than the upstream PyTorch fallback in
bf16/fp16 (spec §3.2 table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RopeTables:
    """Precomputed rotation tables for one set of token positions.

    Attributes:
        cos: ``[B, 1, N, D]`` float32, cosine of the angle for every channel (broadcasts over heads).
        sin: ``[B, 1, N, D]`` float32, sine of the angle with the rotation's sign folded in: ``-sin`` on the first
            quarter of each half (``u' = u cos - v sin``), ``+sin`` on the second (``v' = v cos + u sin``).
    """

    cos: Tensor
    sin: Tensor


def _fused_rope():
    """The compiled ``rope_apply`` of the optional CUDA extension, or None (not built, no CUDA, kernel backend
    ``torch``, or ``MAST3R_SLAM_ROS_FUSED_ROPE=0``)."""
    if os.environ.get("MAST3R_SLAM_ROS_FUSED_ROPE", "1") == "0":
        return None
    from mast3r_slam_ros import kernels

    if not kernels.cuda_op_available("rope_apply"):
        return None
    return kernels._ext.load().rope_apply


class RoPE2D(torch.nn.Module):
    """2-D RoPE without parameters (so no state-dict keys), as used by every MASt3R attention layer.

    Args:
        base: frequency base (100.0 for ``pos_embed='RoPE100'``).
    """

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        if not base > 0:
            raise ValueError(f"RoPE base must be positive, got {base!r}")
        self.base = float(base)

    def tables(self, pos: Tensor, head_dim: int) -> RopeTables:
        """Build the cos/sin tables for positions ``pos``.

        Args:
            pos: ``[B, N, 2]`` integer (or float) token positions ``(row, col)`` in patch units.
            head_dim: per-head channel count D, a multiple of 4.

        Returns:
            RopeTables with ``cos``/``sin`` of shape ``[B, 1, N, D]`` float32 on ``pos.device``.

        Raises:
            ValueError: if ``pos`` is not ``[B, N, 2]`` or ``head_dim`` is not a positive multiple of 4.
        """
        if pos.ndim != 3 or pos.shape[-1] != 2:
            raise ValueError(f"pos must have shape [B, N, 2], got {tuple(pos.shape)}")
        if head_dim <= 0 or head_dim % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dimension that is a multiple of 4, got {head_dim}")
        quarter = head_dim // 4
        half = head_dim // 2
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, half, 2, device=pos.device, dtype=torch.float32) / half)
        )  # [D/4]
        p = pos.to(torch.float32)
        ang_y = p[..., 0:1] * inv_freq  # [B, N, D/4]
        ang_x = p[..., 1:2] * inv_freq
        ang = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)[:, None]  # [B, 1, N, D]
        sign = torch.ones(2, 2, quarter, device=pos.device, dtype=torch.float32)
        sign[:, 0] = -1.0
        return RopeTables(cos=torch.cos(ang), sin=torch.sin(ang) * sign.flatten())

    @staticmethod
    def apply(x: Tensor, tables: RopeTables) -> Tensor:
        """Rotate tokens ``x`` with precomputed tables.

        Args:
            x: ``[..., B, H, N, D]`` tokens (any float dtype) of H heads (leading axes broadcast, e.g. q and k
                stacked as ``[2, B, H, N, D]``).
            tables: output of :meth:`tables` for the same N and D (batch broadcastable).

        Returns:
            Rotated tokens of ``x``'s shape in ``x.dtype`` (computed in float32).
        """
        fused = _fused_rope()
        if (fused is not None and x.is_cuda and x.ndim in (4, 5) and x.stride(-1) == 1
                and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and tables.cos.is_contiguous() and tables.sin.is_contiguous() and tables.cos.device == x.device):
            # one kernel instead of five (upcast, flip, mul, addcmul, downcast): csrc/rope_kernels.cu
            x5 = x if x.ndim == 5 else x.unsqueeze(0)
            out = fused(x5, tables.cos, tables.sin)
            return out if x.ndim == 5 else out[0]
        return RoPE2D.apply_torch(x, tables)

    @staticmethod
    def apply_torch(x: Tensor, tables: RopeTables) -> Tensor:
        """PyTorch implementation of :meth:`apply` (any device; the reference of the CUDA kernel)."""
        d = x.shape[-1]
        xf = x.float()
        # partner channel of every channel: swap the (u | v) quarters inside each half; the sign is in tables.sin
        partner = xf.unflatten(-1, (2, 2, d // 4)).flip(-2).flatten(-3)
        out = torch.addcmul(xf * tables.cos, partner, tables.sin)
        return out.to(x.dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x [B, H, N, D]`` by positions ``pos [B, N, 2]`` (row, col); returns ``[B, H, N, D]`` in x.dtype."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape [B, heads, N, D], got {tuple(x.shape)}")
        if x.shape[-1] % 4:
            raise ValueError(f"head dimension must be a multiple of 4, got {x.shape[-1]}")
        return self.apply(x, self.tables(pos, x.shape[-1]))
