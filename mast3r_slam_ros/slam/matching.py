"""Dense pixel matching between two MASt3R pointmaps by iterative ray projection + descriptor refinement.

Source: MASt3R-SLAM ``matching.py`` (``prep_for_iter_proj``, ``match_iterative_proj``), ``image.py:img_gradient`` and
``mast3r_utils.py:mast3r_match_asymmetric/mast3r_match_symmetric`` (spec ``upstream_algorithm.md`` §3.4, §3.5, §4).

Convention: ``X11`` is image 1's pointmap in camera 1, ``X21`` is image 2's pointmap in camera 1. For every pixel ``n`` of
image 2 the matcher finds the pixel ``p`` of image 1 whose camera-1 ray points at ``X21[n]``; the result
``idx_1_to_2 [B,HW]`` (int64, linear index ``u + W*v`` into image 1) is **indexed by image-2 pixel**.
All functions are batched over ``B`` so the backend can match ``2B`` directed pairs in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mast3r_slam_ros import kernels
from mast3r_slam_ros.network import inference

#: Scharr kernels divided by 32 (spec §4.1): derivative along u (columns) and v (rows)
_SCHARR_X = torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]]) / 32.0
_SCHARR_Y = torch.tensor([[-3.0, -10.0, -3.0], [0.0, 0.0, 0.0], [3.0, 10.0, 3.0]]) / 32.0


@dataclass
class MatchParams:
    """Matching parameters (config section ``matching``; defaults of upstream ``base.yaml``)."""

    max_iter: int = 10
    lambda_init: float = 1e-8
    convergence_thresh: float = 1e-6
    dist_thresh: float = 0.1
    radius: int = 3
    dilation_max: int = 5

    @classmethod
    def from_config(cls, cfg: Any) -> "MatchParams":
        """Build from a ``SlamConfig`` (uses ``cfg.matching``) or from any object with the same attributes."""
        sec = getattr(cfg, "matching", cfg)
        return cls(**{k: type(getattr(cls, k))(getattr(sec, k)) for k in cls.__dataclass_fields__ if hasattr(sec, k)})


def img_gradient(img: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel image gradients with Scharr/32 kernels and reflect padding (spec §4.1, upstream ``image.py``).

    Args: img ``[B,C,H,W]`` float (H, W >= 2).
    Returns: ``(gx, gy)`` each ``[B,C,H,W]``: d/du (along columns) and d/dv (along rows) per pixel.
    """
    if img.ndim != 4:
        raise ValueError(f"img_gradient expects [B,C,H,W], got {tuple(img.shape)}")
    c = img.shape[1]
    kx = _SCHARR_X.to(img.device, img.dtype).expand(c, 1, 3, 3)
    ky = _SCHARR_Y.to(img.device, img.dtype).expand(c, 1, 3, 3)
    padded = F.pad(img, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kx, groups=c), F.conv2d(padded, ky, groups=c)


def prep_for_iter_proj(X11: Tensor, X21: Tensor, idx_1_to_2_init: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of :func:`kernels.iter_proj` (spec §4.1).

    Args:
        X11: ``[B,H,W,3]`` f32 image-1 points in camera 1.
        X21: ``[B,H,W,3]`` f32 image-2 points in camera 1.
        idx_1_to_2_init: optional ``[B,HW]`` int64 warm start (previous result); identity if None.
    Returns:
        rays_with_grad ``[B,H,W,9]`` f32 contiguous (unit ray, d ray/du, d ray/dv), pts3d_norm ``[B,HW,3]`` f32 (unit
        target rays), p_init ``[B,HW,2]`` f32 ``(u, v)``.
    """
    B, H, W, _ = X11.shape
    rays = F.normalize(X11.float(), dim=-1, eps=1e-12).permute(0, 3, 1, 2)
    gx, gy = img_gradient(rays)
    rays_with_grad = torch.cat([rays, gx, gy], dim=1).permute(0, 2, 3, 1).contiguous()
    pts3d_norm = F.normalize(X21.float().reshape(B, H * W, 3), dim=-1, eps=1e-12).contiguous()
    if idx_1_to_2_init is None:
        idx = torch.arange(H * W, device=X11.device).expand(B, H * W)
    else:
        idx = idx_1_to_2_init.to(X11.device).reshape(B, H * W)
    p_init = torch.stack([idx % W, torch.div(idx, W, rounding_mode="floor")], dim=-1).float().contiguous()
    return rays_with_grad, pts3d_norm, p_init


def match(X11: Tensor, X21: Tensor, D11: Tensor, D21: Tensor, idx_1_to_2_init: Tensor | None = None,
          params: MatchParams | None = None) -> tuple[Tensor, Tensor]:
    """Iterative-projection matching with occlusion test and descriptor refinement (spec §4.3).

    Args:
        X11, X21: ``[B,H,W,3]`` f32 pointmaps of image 1 and image 2, both in camera 1.
        D11, D21: ``[B,H,W,F]`` descriptors (unit norm, F = 24).
        idx_1_to_2_init: ``[B,HW]`` int64 warm start or None (identity).
        params: :class:`MatchParams` (defaults if None).
    Returns:
        idx_1_to_2 ``[B,HW]`` int64 (pixel of image 1 for every pixel of image 2), valid_match2 ``[B,HW,1]`` bool
        (iter_proj converged and the 3-D distance ``|X11[p] - X21[n]| < dist_thresh``, evaluated before refinement).
    """
    p = params or MatchParams()
    if X11.ndim != 4 or X11.shape != X21.shape or X11.shape[-1] != 3:
        raise ValueError(f"X11/X21 must both be [B,H,W,3], got {tuple(X11.shape)} and {tuple(X21.shape)}")
    B, H, W, _ = X11.shape
    rays_with_grad, pts3d_norm, p_init = prep_for_iter_proj(X11, X21, idx_1_to_2_init)
    p_new, converged = kernels.iter_proj(rays_with_grad, pts3d_norm, p_init, int(p.max_iter), float(p.lambda_init),
                                         float(p.convergence_thresh))
    p1 = p_new.long()  # truncation, as upstream (§4.3 step 1)
    idx_lin = p1[..., 0] + W * p1[..., 1]
    X11_flat = X11.reshape(B, H * W, 3)
    X_at = torch.gather(X11_flat, 1, idx_lin.unsqueeze(-1).expand(B, H * W, 3))
    dists = torch.linalg.norm(X_at - X21.reshape(B, H * W, 3), dim=-1)
    valid = converged.bool() & (dists < p.dist_thresh)
    if p.radius > 0:
        D11h = D11.half().contiguous() if D11.device.type == "cuda" else D11.float().contiguous()
        D21h = D21.reshape(B, H * W, -1)
        D21h = D21h.half().contiguous() if D21.device.type == "cuda" else D21h.float().contiguous()
        p1 = kernels.refine_matches(D11h, D21h, p1.contiguous(), int(p.radius), int(p.dilation_max))
    idx_1_to_2 = p1[..., 0] + W * p1[..., 1]
    return idx_1_to_2, valid.unsqueeze(-1)


def match_confidence(Q11: Tensor, idx_1_to_2: Tensor, Q21: Tensor) -> Tensor:
    """Match weight ``Q[n] = sqrt(Q11[idx_1_to_2[n]] * Q21[n])`` (spec §3.5).

    Args: Q11 ``[B,HW,1]`` (image 1's own Q), idx_1_to_2 ``[B,HW]`` int64, Q21 ``[B,HW,1]`` (image 2's Q in the pair).
    Returns: ``[B,HW,1]`` f32, indexed by image-2 pixel.
    """
    Qg = torch.gather(Q11, 1, idx_1_to_2.unsqueeze(-1))
    return torch.sqrt(Qg * Q21)


# ------------------------------------------------------------------------------------------------------ pair level
@dataclass
class AsymmetricMatch:
    """Result of decoding (frame, keyframe) and matching (spec §5.1 first line). Image 1 = frame f, image 2 = keyframe k.

    ``idx_f2k [HW]`` int64 (frame pixel for every keyframe pixel), ``valid_match_k [HW,1]`` bool, ``Xff [HW,3]``,
    ``Cff [HW,1]``, ``Qff [HW,1]`` (frame in its own camera), ``Xkf [HW,3]``, ``Ckf [HW,1]``, ``Qkf [HW,1]`` (keyframe
    in the frame's camera), ``Qk [HW,1]`` = ``sqrt(Qff[idx_f2k] * Qkf)``.
    """

    idx_f2k: Tensor
    valid_match_k: Tensor
    Xff: Tensor
    Cff: Tensor
    Qff: Tensor
    Xkf: Tensor
    Ckf: Tensor
    Qkf: Tensor
    Qk: Tensor


def ensure_encoded(predictor: Any, frame: Any) -> None:
    """Encode ``frame.img`` once and cache ``frame.feat [1,P,C]`` / ``frame.pos [1,P,2]`` (spec §3.2;
    ``network.inference.ensure_encoded``)."""
    inference.ensure_encoded(predictor, frame)


def mono_inference(predictor: Any, frame: Any) -> tuple[Tensor, Tensor]:
    """Pointmap of a frame paired with itself (spec §3.4 ``mast3r_inference_mono``; ``network.inference.mono``):
    ``X [HW,3]``, ``C [HW,1]`` f32."""
    return inference.mono(predictor, frame)


def match_asymmetric(predictor: Any, frame: Any, keyframe: Any, idx_f2k_init: Tensor | None,
                     params: MatchParams | None = None) -> AsymmetricMatch:
    """Decode (frame, keyframe) and match keyframe pixels to frame pixels (spec §3.4 ``mast3r_match_asymmetric``).

    Args:
        predictor: a Predictor (``encode``/``decode``).
        frame, keyframe: :class:`~mast3r_slam_ros.slam.frame.Frame` of the same image size (encoded on demand).
        idx_f2k_init: ``[1,HW]`` or ``[HW]`` int64 warm start (previous tracking result) or None.
    Returns: :class:`AsymmetricMatch`.
    """
    pred = inference.asymmetric(predictor, frame, keyframe)  # [2,H,W,...]: 0 = ff (frame), 1 = kf (keyframe)
    H, W = pred.X.shape[1:3]
    X11, X21 = pred.X[0:1].float(), pred.X[1:2].float()
    init = None if idx_f2k_init is None else idx_f2k_init.reshape(1, H * W)
    idx, valid = match(X11, X21, pred.D[0:1], pred.D[1:2], init, params)
    Qff = pred.Q[0].reshape(1, H * W, 1).float()
    Qkf = pred.Q[1].reshape(1, H * W, 1).float()
    Qk = match_confidence(Qff, idx, Qkf)
    return AsymmetricMatch(idx_f2k=idx[0], valid_match_k=valid[0], Xff=X11.reshape(-1, 3),
                           Cff=pred.C[0].reshape(-1, 1).float(), Qff=Qff[0], Xkf=X21.reshape(-1, 3),
                           Ckf=pred.C[1].reshape(-1, 1).float(), Qkf=Qkf[0], Qk=Qk[0])


@dataclass
class SymmetricMatch:
    """Result of :func:`match_symmetric` for ``B`` pairs (i_b, j_b) (spec §3.4 ``mast3r_match_symmetric``).

    ``idx_i2j [B,HW]`` (pixel of i for every pixel of j), ``idx_j2i [B,HW]``, ``valid_match_j [B,HW,1]``,
    ``valid_match_i [B,HW,1]``, ``Qii, Qjj, Qji, Qij [B,HW,1]`` (raw Q of each decode), ``Qj = sqrt(Qii[idx_i2j]*Qji)``,
    ``Qi = sqrt(Qjj[idx_j2i]*Qij)`` ``[B,HW,1]``.
    """

    idx_i2j: Tensor
    idx_j2i: Tensor
    valid_match_j: Tensor
    valid_match_i: Tensor
    Qii: Tensor
    Qjj: Tensor
    Qji: Tensor
    Qij: Tensor
    Qj: Tensor
    Qi: Tensor


def match_symmetric(predictor: Any, feat_i: Tensor, pos_i: Tensor, feat_j: Tensor, pos_j: Tensor, true_shape: Tensor,
                    params: MatchParams | None = None) -> SymmetricMatch:
    """Decode every pair both ways and match all ``2B`` directed pairs in one batched call (identity warm start).

    Args:
        feat_i, feat_j: ``[B,P,C]`` cached encoder tokens; pos_i, pos_j ``[B,P,2]`` int64; true_shape ``[1,2]``/``[B,2]``
        (one image size for all). Returns: :class:`SymmetricMatch`.
    """
    if feat_i.shape[0] != feat_j.shape[0]:
        raise ValueError(f"feat_i and feat_j batch sizes differ: {feat_i.shape[0]} vs {feat_j.shape[0]}")
    B = feat_i.shape[0]
    pred = inference.symmetric_batch(predictor, feat_i, pos_i, feat_j, pos_j, true_shape)  # [ii, ji, jj, ij]
    X, D, Qs = pred.X.float(), pred.D, pred.Q.float()
    H, W = X.shape[2:4]
    X11 = torch.cat([X[0], X[2]], dim=0)  # ii, jj
    X21 = torch.cat([X[1], X[3]], dim=0)  # ji, ij
    D11 = torch.cat([D[0], D[2]], dim=0)
    D21 = torch.cat([D[1], D[3]], dim=0)
    idx, valid = match(X11, X21, D11, D21, None, params)
    Qii, Qji, Qjj, Qij = (Qs[k].reshape(B, H * W, 1) for k in range(4))
    idx_i2j, idx_j2i = idx[:B], idx[B:]
    return SymmetricMatch(idx_i2j=idx_i2j, idx_j2i=idx_j2i, valid_match_j=valid[:B], valid_match_i=valid[B:],
                          Qii=Qii, Qjj=Qjj, Qji=Qji, Qij=Qij,
                          Qj=match_confidence(Qii, idx_i2j, Qji), Qi=match_confidence(Qjj, idx_j2i, Qij))
