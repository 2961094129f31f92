"""refine_matches CUDA kernel: the vectorized fast path (F = 24 half/float, 16-byte aligned rows) and the generic
fallback (odd F, unaligned rows, double) must equal ``refine_matches_torch`` bit for bit (needs a GPU + the extension).

The fast path is chosen inside ``csrc/matching_kernels.cu`` (``refine_matches_cuda``) when the descriptor length is 24,
the dtype is half or float, both descriptor tensors start on a 16-byte boundary and all indices fit in int32; every
other input goes through the generic kernel. These tests build inputs that hit each branch and compare with PyTorch.
"""

from __future__ import annotations

import pytest
import torch

from mast3r_slam_ros.kernels.matching_torch import refine_matches_torch

pytestmark = pytest.mark.cuda

DEV = "cuda"



def _problem(B: int, H: int, W: int, F: int, dtype: torch.dtype, seed: int, smooth: bool = False):
    """Unit descriptors ``D11 [B,H,W,F]``, ``D21 [B,HW,F]`` and start pixels ``p1 [B,HW,2]`` int64.

    ``smooth``: D21 are D11 at a shifted pixel plus noise (a realistic matching problem whose maxima move across
    levels); else independent random descriptors.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    D11 = torch.nn.functional.normalize(torch.randn(B, H, W, F, generator=g), dim=-1)
    if smooth:
        D11 = torch.nn.functional.avg_pool2d(D11.permute(0, 3, 1, 2), 5, 1, 2).permute(0, 2, 3, 1)
        D11 = torch.nn.functional.normalize(D11, dim=-1)
        shifted = torch.roll(D11, shifts=(4, -7), dims=(1, 2)).reshape(B, H * W, F)
        D21 = torch.nn.functional.normalize(shifted + 0.05 * torch.randn(shifted.shape, generator=g), dim=-1)
    else:
        D21 = torch.nn.functional.normalize(torch.randn(B, H * W, F, generator=g), dim=-1)
    p1 = torch.stack([torch.randint(0, W, (B, H * W), generator=g), torch.randint(0, H, (B, H * W), generator=g)], -1)
    return D11.to(dtype).to(DEV), D21.to(dtype).to(DEV), p1.to(DEV)


def _unaligned_copy(x: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of ``x`` whose data pointer is 1 element past a 16-byte boundary (storage offset 1)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = flat[1:].view(x.shape)
    out.copy_(x)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def _check(ext, D11, D21, p1, radius=3, dilation_max=5):
    out_c = ext.refine_matches(D11, D21, p1, radius, dilation_max)
    out_t = refine_matches_torch(D11, D21, p1, radius, dilation_max)
    torch.cuda.synchronize()
    assert out_c.dtype == torch.int64 and out_c.shape == p1.shape
    assert torch.equal(out_c, out_t), (out_c != out_t).any(-1).sum().item()
    return out_c


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 384, 512), (2, 37, 51)])
@pytest.mark.parametrize("smooth", [False, True])
def test_fast_path_f24_identical_to_torch(ext, dtype, shape, smooth):
    B, H, W = shape
    D11, D21, p1 = _problem(B, H, W, 24, dtype, seed=11, smooth=smooth)
    assert D11.data_ptr() % 16 == 0 and D21.data_ptr() % 16 == 0  # fresh CUDA allocations: fast path
    out = _check(ext, D11, D21, p1)
    if smooth:  # the search moves most pixels (the property the kernel exists for)
        assert (out != p1).any(-1).float().mean() > 0.5


def test_fast_path_far_out_of_image_starts(ext):
    """Start pixels outside the image (near: candidates reach in; far: none can, incl. int64 beyond int32)."""
    D11, D21, p1 = _problem(1, 40, 56, 24, torch.float16, seed=5, smooth=True)
    far = torch.tensor([[-(2**40), 3], [5, 2**33], [-16, 10], [70, -16], [56 + 15, 39 + 15], [-15, -15],
                        [2**31 - 1, 0], [-(2**31), 7]], dtype=torch.int64, device=DEV)
    p1[0, : far.shape[0]] = far
    out = _check(ext, D11, D21, p1)
    assert torch.equal(out[0, :2], far[:2])  # unreachable: unchanged


def test_fast_path_ties_and_radius_variants(ext):
    """Constant descriptors (every score equal: first candidate wins) and other radius / dilation settings."""
    B, H, W = 1, 33, 47
    D11 = torch.ones(B, H, W, 24, dtype=torch.float16, device=DEV) / 24 ** 0.5
    D21 = torch.ones(B, H * W, 24, dtype=torch.float16, device=DEV) / 24 ** 0.5
    _, _, p1 = _problem(B, H, W, 24, torch.float16, seed=2)
    _check(ext, D11, D21, p1)
    D11, D21, p1 = _problem(B, H, W, 24, torch.float16, seed=3, smooth=True)
    for radius, dil in ((0, 1), (1, 1), (2, 7), (4, 2)):
        _check(ext, D11, D21, p1, radius, dil)


def test_non_finite_descriptors(ext):
    """NaN / inf in descriptors: NaN scores never win; inf products follow IEEE as in PyTorch."""
    D11, D21, p1 = _problem(1, 32, 40, 24, torch.float16, seed=4, smooth=True)
    D11.view(-1, 24)[::37, 5] = float("nan")
    D11.view(-1, 24)[::53, 0] = float("inf")
    D21.view(-1, 24)[::41, 23] = float("-inf")
    _check(ext, D11, D21, p1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fallback_unaligned_rows(ext, dtype):
    """F = 24 but D11 / D21 not 16-byte aligned: generic kernel, same result as the fast path and PyTorch."""
    D11, D21, p1 = _problem(1, 48, 64, 24, dtype, seed=7, smooth=True)
    fast = _check(ext, D11, D21, p1)
    D11u, D21u = _unaligned_copy(D11), _unaligned_copy(D21)
    assert torch.equal(_check(ext, D11u, D21, p1), fast)
    assert torch.equal(_check(ext, D11, D21u, p1), fast)


@pytest.mark.parametrize("F", [1, 13, 16, 23, 25, 64])
def test_fallback_other_lengths(ext, F):
    """Descriptor lengths other than 24 (odd, a multiple of 8, the bound 64) take the generic kernel."""
    D11, D21, p1 = _problem(2, 29, 41, F, torch.float16, seed=F, smooth=F >= 8)
    _check(ext, D11, D21, p1)


def test_fallback_double(ext):
    D11, D21, p1 = _problem(1, 30, 45, 24, torch.float64, seed=9, smooth=True)
    _check(ext, D11, D21, p1)
