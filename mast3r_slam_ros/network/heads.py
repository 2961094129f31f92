"""``catmlp+dpt`` output head of MASt3R: DPT for pts3d + conf and a local-feature MLP for desc + desc_conf.

Spec ``mast3r_network.md`` §3.5. Parameter names follow the official checkpoint, including the aliased
``dpt.scratch.layer_rn.{0..3}`` (the same conv modules as ``layer{1..4}_rn``).

Compute dtype: a head runs its DPT convolutions (``act_postprocess``, ``scratch``, ``head[0..3]``) and its local-feature
MLP in the dtype of their stored weights: float32 normally (upstream), bfloat16/float16 after
:func:`cast_head_` (``runtime.head_precision``). The input tokens are cast to that dtype on entry; the final 1x1 output
conv ``dpt.head[4]`` and the post-processing (``expm1`` depth, ``1 + exp`` confidences, descriptor normalization)
always run in float32 on the upcast last feature map / MLP output, so every :class:`HeadOutput` tensor is float32.
With float32 weights the casts are no-ops and the numbers are exactly the upstream ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Mlp


@dataclass
class HeadOutput:
    """One view's network outputs; the frame is the camera of the FIRST decoder input.

    Attributes:
        pts3d: ``[B, H, W, 3]`` float32 pointmap (metres for the metric checkpoint).
        conf: ``[B, H, W]`` float32 pointmap confidence C, ``>= 1``.
        desc: ``[B, H, W, 24]`` float32 unit-norm matching descriptor D (``None`` if skipped with ``need_desc=False``).
        desc_conf: ``[B, H, W]`` float32 descriptor confidence Q, ``> 0`` (``None`` if skipped).
    """

    pts3d: Tensor
    conf: Tensor
    desc: Optional[Tensor]
    desc_conf: Optional[Tensor]


def _up2(x: Tensor) -> Tensor:
    """Bilinear x2 upsampling with ``align_corners=True`` (all DPT upsampling, spec §9 item 6)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Interpolate(nn.Module):
    """Parameter-free module wrapper of :func:`_up2` (keeps the ``head.{0,2,4}`` key numbering)."""

    def forward(self, x: Tensor) -> Tensor:
        return _up2(x)


class ResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))``, both 3x3 convs with bias and padding 1."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet block: ``o = a (+ RCU1(b)); o = out_conv(up2(RCU2(o)))``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        out = a if b is None else a + self.resConfUnit1(b)
        out = self.resConfUnit2(out)
        return self.out_conv(_up2(out))


class Scratch(nn.Module):
    """``layer{1..4}_rn`` (3x3, no bias, to ``feature_dim``), their alias list ``layer_rn`` and ``refinenet{1..4}``."""

    def __init__(self, layer_dims: Sequence[int], feature_dim: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(c, feature_dim, 3, padding=1, bias=False) for c in layer_dims]
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = convs
        self.layer_rn = nn.ModuleList(convs)  # aliases: same modules, second set of state-dict names
        self.refinenet1 = FeatureFusionBlock(feature_dim)
        self.refinenet2 = FeatureFusionBlock(feature_dim)
        self.refinenet3 = FeatureFusionBlock(feature_dim)
        self.refinenet4 = FeatureFusionBlock(feature_dim)


class DPT(nn.Module):
    """DPT adapter on decoder-list entries ``hooks`` (spec §3.5, "DPT branch").

    Args:
        hooks: 4 indices into the decoder list (``[0, 6, 9, 12]`` for dec_depth 12).
        dim_tokens: token widths at the hooks (``[enc_dim, dec_dim, dec_dim, dec_dim]``).
        num_channels: output channels (4 = xyz + conf).
        layer_dims, feature_dim, last_dim, patch_size: DPT widths (class defaults of the checkpoint).
    """

    def __init__(
        self,
        hooks: Sequence[int],
        dim_tokens: Sequence[int],
        num_channels: int = 4,
        layer_dims: Sequence[int] = (96, 192, 384, 768),
        feature_dim: int = 256,
        last_dim: int = 128,
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.hooks = list(hooks)
        self.patch_size = patch_size
        self.scratch = Scratch(layer_dims, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            Interpolate(),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, num_channels, 1),
        )
        ld = layer_dims
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(dim_tokens[0], ld[0], 1), nn.ConvTranspose2d(ld[0], ld[0], 4, stride=4)),
                nn.Sequential(nn.Conv2d(dim_tokens[1], ld[1], 1), nn.ConvTranspose2d(ld[1], ld[1], 2, stride=2)),
                nn.Sequential(nn.Conv2d(dim_tokens[2], ld[2], 1)),
                nn.Sequential(nn.Conv2d(dim_tokens[3], ld[3], 1), nn.Conv2d(ld[3], ld[3], 3, stride=2, padding=1)),
            ]
        )

    def forward(self, tokens: Sequence[Tensor], hw: tuple[int, int]) -> Tensor:
        """``tokens``: decoder list of ``[B, N, C_i]``; ``hw = (H, W)`` image size -> ``[B, num_channels, H, W]``."""
        h, w = hw[0] // self.patch_size, hw[1] // self.patch_size
        dtype = self.compute_dtype
        layers = []
        for i, hook in enumerate(self.hooks):
            t = tokens[hook]
            b, n, c = t.shape
            if n != h * w:
                raise ValueError(f"token count {n} does not match image size {hw} (expected {h * w})")
            x = t.to(dtype).transpose(1, 2).reshape(b, c, h, w)
            x = self.act_postprocess[i](x)
            layers.append(self.scratch.layer_rn[i](x))
        s = self.scratch
        p4 = s.refinenet4(layers[3])[:, :, : layers[2].shape[2], : layers[2].shape[3]]
        p3 = s.refinenet3(p4, layers[2])
        p2 = s.refinenet2(p3, layers[1])
        p1 = s.refinenet1(p2, layers[0])
        feat = p1
        for i in range(len(self.head) - 1):
            feat = self.head[i](feat)
        out_conv = self.head[-1]
        return out_conv(feat.to(out_conv.weight.dtype))  # final 1x1 conv in float32 (no-op cast in fp32 mode)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the DPT convolutions (their stored weights); the final output conv stays float32."""
        return self.act_postprocess[0][0].weight.dtype


@dataclass(frozen=True)
class PostprocessModes:
    """Output activations (spec §1.2, §3.5): ``depth_mode``, ``conf_mode``, ``desc_conf_mode`` as (name, vmin, vmax)."""

    depth_mode: tuple = ("exp", -math.inf, math.inf)
    conf_mode: tuple = ("exp", 1.0, math.inf)
    desc_conf_mode: tuple = ("exp", 0.0, math.inf)
    desc_mode: str = "norm"


def reg_dense_depth(xyz: Tensor, mode: tuple) -> Tensor:
    """Pointmap activation ``[..., 3] -> [..., 3]``; 'exp': ``xyz/max(|xyz|,1e-8) * expm1(|xyz|)`` (spec §3.5)."""
    name, vmin, vmax = mode
    if name == "linear":
        return xyz if (vmin == -math.inf and vmax == math.inf) else xyz.clip(min=vmin, max=vmax)
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    if name == "square":
        return direction * d.square()
    if name == "exp":
        return direction * torch.expm1(d)
    raise ValueError(f"unsupported depth_mode {mode!r}")


def reg_dense_conf(x: Tensor, mode: tuple) -> Tensor:
    """Confidence activation; 'exp': ``vmin + exp(x)`` clipped at ``vmax - vmin``; 'sigmoid': ``(vmax-vmin)*sigmoid(x) + vmin``."""
    name, vmin, vmax = mode
    if name == "exp":
        return vmin + x.exp().clip(max=vmax - vmin)
    if name == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(x) + vmin
    raise ValueError(f"unsupported confidence mode {mode!r}")


def reg_desc(desc: Tensor, mode: str) -> Tensor:
    """Descriptor activation; 'norm': ``d / |d|_2`` with no epsilon (upstream behaviour)."""
    if mode == "norm":
        return desc / desc.norm(dim=-1, keepdim=True)
    raise ValueError(f"unsupported desc_mode {mode!r}")


class CatMlpDptHead(nn.Module):
    """``Cat_MLP_LocalFeatures_DPT_Pts3d``: DPT (pts3d + conf) and the local-feature MLP (desc + desc_conf).

    Args:
        enc_dim, dec_dim: token widths of the encoder and decoder.
        dec_depth: number of decoder blocks (decoder list has ``dec_depth + 1`` entries).
        local_feat_dim: descriptor width (24).
        two_confs: if True the MLP emits one extra channel, the descriptor confidence.
        modes: post-processing activations.
        patch_size: 16.
    """

    def __init__(
        self,
        enc_dim: int,
        dec_dim: int,
        dec_depth: int,
        local_feat_dim: int = 24,
        two_confs: bool = True,
        modes: PostprocessModes = PostprocessModes(),
        patch_size: int = 16,
        hidden_dim_factor: float = 4.0,
    ) -> None:
        super().__init__()
        hooks = [0, dec_depth * 2 // 4, dec_depth * 3 // 4, dec_depth]
        has_conf = modes.conf_mode is not None
        self.dpt = DPT(hooks, [enc_dim, dec_dim, dec_dim, dec_dim], num_channels=3 + int(has_conf),
                       patch_size=patch_size)
        idim = enc_dim + dec_dim
        self.local_feat_dim = local_feat_dim
        self.two_confs = two_confs
        self.patch_size = patch_size
        self.modes = modes
        self.head_local_features = Mlp(
            idim, int(hidden_dim_factor * idim), (local_feat_dim + int(two_confs)) * patch_size**2
        )

    def forward(self, dec: Sequence[Tensor], hw: tuple[int, int], need_desc: bool = True) -> HeadOutput:
        """Run the head on one branch's decoder list.

        Args:
            dec: ``dec_depth + 1`` tensors ``[B, N, C]`` (entry 0 = encoder output, last = dec_norm'ed).
            hw: image size ``(H, W)``, multiples of 16.
            need_desc: if False, skip the local-feature MLP (``desc``/``desc_conf`` are None).

        Returns:
            HeadOutput with ``[B, H, W, ...]`` float32 tensors.
        """
        h, w = int(hw[0]), int(hw[1])
        out = self.dpt(dec, (h, w))  # [B, 3+conf, H, W]
        fmap = out.permute(0, 2, 3, 1)
        pts3d = reg_dense_depth(fmap[..., 0:3], self.modes.depth_mode)
        conf = reg_dense_conf(fmap[..., 3], self.modes.conf_mode)
        desc = desc_conf = None
        if need_desc:
            mlp_dtype = self.head_local_features.fc1.weight.dtype
            cat = torch.cat([dec[0].to(mlp_dtype), dec[-1].to(mlp_dtype)], dim=-1)
            b = cat.shape[0]
            lf = self.head_local_features(cat).float()  # [B, N, (F+1)*P^2], post-processing in float32
            lf = lf.transpose(-1, -2).reshape(b, -1, h // self.patch_size, w // self.patch_size)
            lf = F.pixel_shuffle(lf, self.patch_size).permute(0, 2, 3, 1)  # [B, H, W, F(+1)]
            desc = reg_desc(lf[..., : self.local_feat_dim], self.modes.desc_mode)
            if self.two_confs:
                desc_conf = reg_dense_conf(lf[..., self.local_feat_dim], self.modes.desc_conf_mode)
            else:
                desc_conf = conf.clone()
        return HeadOutput(pts3d=pts3d, conf=conf, desc=desc, desc_conf=desc_conf)


def cast_head_(head: CatMlpDptHead, dtype: torch.dtype) -> int:
    """Store the weights of ``head``'s DPT convolutions and local-feature MLP in ``dtype`` (in place, memory format
    kept), except the final 1x1 output conv ``dpt.head[-1]`` which stays float32.

    Args:
        head: a :class:`CatMlpDptHead`.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        The number of parameters whose dtype changed.

    Raises:
        TypeError: ``head`` is not a CatMlpDptHead. ValueError: unsupported dtype.
    """
    if not isinstance(head, CatMlpDptHead):
        raise TypeError(f"cast_head_ needs a CatMlpDptHead, got {type(head).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"head dtype must be float32, bfloat16 or float16, got {dtype}")
    keep = head.dpt.head[-1]
    n = 0
    for m in head.modules():
        if m is keep or not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            continue
        for p in m.parameters(recurse=False):
            if p.dtype != dtype:
                p.data = p.data.to(dtype)  # preserve_format: channels-last weights stay channels-last
                n += p.numel()
    return n
