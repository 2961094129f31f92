"""Fused RoPE kernel (csrc/rope_kernels.cu) against the PyTorch implementation ``RoPE2D.apply_torch``."""

from __future__ import annotations

import pytest
import torch

from mast3r_slam_ros import kernels
from mast3r_slam_ros.network.rope import RoPE2D, _fused_rope


def test_cpu_tokens_use_the_torch_path():
    rope = RoPE2D(100.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 8, generator=g)
    pos = torch.randint(0, 5, (2, 6, 2), generator=g)
    tab = rope.tables(pos, 8)
    assert torch.equal(rope.apply(x, tab), RoPE2D.apply_torch(x, tab))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_batch", [1, 2])
def test_fused_rope_matches_torch(dtype, table_batch):
    if not kernels.cuda_op_available("rope_apply"):
        pytest.skip("CUDA extension without rope_apply")
    assert _fused_rope() is not None
    dev = torch.device("cuda")
    rope = RoPE2D(100.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    B, N, Hh, D = 2, 768, 16, 64
    pos = torch.randint(0, 48, (table_batch, N, 2), generator=g).to(dev)
    tab = rope.tables(pos, D)
    # a strided view as in Attention: q, k of a fused qkv projection, [2, B, H, N, D]
    qkv = torch.randn(B, N, 3, Hh, D, generator=g).to(dev, dtype).permute(2, 0, 3, 1, 4)
    x5 = qkv[:2]
    assert not x5.is_contiguous()
    for x in (x5, qkv[0]):  # 5-D strided and 4-D
        got = rope.apply(x, tab)
        ref = RoPE2D.apply_torch(x, tab)
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        else:  # same float32 math, at most one rounding step apart after the cast
            eps = torch.finfo(dtype).eps
            assert float(((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)).max()) <= 2 * eps
            assert float((got != ref).float().mean()) < 1e-3
