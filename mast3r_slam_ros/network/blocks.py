"""Transformer building blocks of the MASt3R encoder and decoders (spec ``mast3r_network.md`` §3.3–3.4).

Module and parameter names match the official checkpoint (``attn.qkv``, ``cross_attn.projq``, ``mlp.fc1``, ...).
All attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (scale ``D^-0.5``); RoPE is
applied to q and k (never v) after the head split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import RoPE2D, RopeTables

#: LayerNorm epsilon used everywhere in MASt3R (spec §9 item 1)
LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6 and affine parameters (``weight``, ``bias`` of shape ``[dim]``)."""
    return nn.LayerNorm(dim, eps=LN_EPS)


class Mlp(nn.Module):
    """``fc2(GELU_erf(fc1(x)))``; ``x [..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim if out_dim is not None else in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, C] -> [B, heads, N, C/heads]``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE.

    ``qkv`` is one Linear ``dim -> 3*dim`` whose output rows are ``[q | k | v]``, each ``heads x head_dim``.
    """

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # stored in a list so that it is not registered as a sub-module (no keys, shared instance)
        self._rope = [rope]

    def forward(self, x: Tensor, rope_tables: RopeTables) -> Tensor:
        """``x [B, N, C]``, tables for ``x``'s positions -> ``[B, N, C]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        qk = self._rope[0].apply(qkv[:2], rope_tables)  # q and k rotated in one pass, [2, B, h, N, D]
        out = F.scaled_dot_product_attention(qk[0], qk[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head cross-attention with 2-D RoPE: q rotated by the query positions, k by the key positions."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim, bias=True)
        self.projk = nn.Linear(dim, dim, bias=True)
        self.projv = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self._rope = [rope]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, qtab: RopeTables, ktab: RopeTables) -> Tensor:
        """``query [B, Nq, C]``, ``key``/``value [B, Nk, C]`` -> ``[B, Nq, C]``."""
        b, nq, c = query.shape
        q = _split_heads(self.projq(query), self.num_heads)
        k = _split_heads(self.projk(key), self.num_heads)
        v = _split_heads(self.projv(value), self.num_heads)
        rope = self._rope[0]
        q = rope.apply(q, qtab)
        k = rope.apply(k, ktab)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, c))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: ``x += Attn(LN1 x); x += MLP(LN2 x)`` (spec §3.3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: RoPE2D) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, rope)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rope_tables: RopeTables) -> Tensor:
        x = x + self.attn(self.norm1(x), rope_tables)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Decoder block with self- and cross-attention (spec §3.4).

    ``x += SelfAttn(LN1 x); y' = LN_y(y); x += CrossAttn(LN2 x, y', y'); x += MLP(LN3 x)`` where ``y`` is the other
    view's tokens from the previous layer.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: RoPE2D) -> None:
        super().__init__()
        # registration order = official state-dict order
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, rope)
        self.cross_attn = CrossAttention(dim, num_heads, rope)
        self.norm2 = layer_norm(dim)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = layer_norm(dim)

    def forward(self, x: Tensor, y: Tensor, xtab: RopeTables, ytab: RopeTables) -> Tensor:
        """``x [B, N, C]`` (this view), ``y [B, M, C]`` (other view) -> new ``x [B, N, C]``."""
        x = x + self.attn(self.norm1(x), xtab)
        y_ = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y_, y_, xtab, ytab)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """16x16 patch embedding (``PatchEmbedDust3R``): Conv2d stride = kernel = patch size, no norm (spec §3.1)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """``img [B, 3, H, W]`` -> ``(tokens [B, N, C], pos [B, N, 2] int64 (row, col))``, ``N = (H/16)(W/16)``.

        Raises:
            ValueError: if H or W is not a multiple of the patch size.
        """
        b, _, h, w = img.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of the patch size {p}")
        x = self.proj(img)
        gh, gw = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        pos = patch_positions(b, gh, gw, img.device)
        return tokens, pos


def patch_positions(batch: int, h: int, w: int, device: torch.device | str) -> Tensor:
    """Token grid positions ``[batch, h*w, 2]`` int64, ``pos[b, y*w + x] = (y, x)`` (row-major)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return torch.stack([ys, xs], dim=-1)[None].expand(batch, -1, -1).contiguous()
