"""SLAM inference wrappers on any Predictor (spec ``upstream_algorithm.md`` §3.4, ``mast3r_network.md`` §5).

Naming: ``X_ab`` = pointmap of image **a** expressed in camera **b** (the first decoder input defines the frame).
A Predictor has ``encode(img, true_shape) -> (feat, pos)`` and
``decode(feat1, pos1, feat2, pos2, true_shape) -> (res1, res2)`` (:class:`~mast3r_slam_ros.network.HeadOutput`).
Predictors that set ``supports_partial_decode = True`` (the MASt3R model) accept ``need_res2``/``need_desc`` so
the mono wrapper skips head 2 and the descriptor MLP; predictors that set ``supports_batched_decode = True`` get the
symmetric edges decoded in one batch instead of upstream's one-edge-at-a-time loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from .heads import HeadOutput


@runtime_checkable
class Predictor(Protocol):
    """The network API SLAM codes against (docs/interfaces.md); implemented by ``Mast3rModel`` and the oracle."""

    def encode(self, img: Tensor, true_shape: Tensor) -> tuple[Tensor, Tensor]:
        """``img [B,3,H,W]`` f32 in [-1,1], ``true_shape [B,2]`` int -> ``feat [B,P,C]`` f32, ``pos [B,P,2]`` i64."""
        ...

    def decode(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor,
               true_shape: Tensor) -> tuple[HeadOutput, HeadOutput]:
        """``res1`` = view 1 in camera 1 (``X_11``), ``res2`` = view 2 in camera 1 (``X_21``)."""
        ...


@dataclass
class StackedPrediction:
    """Network outputs of several directed pairs stacked on a leading axis (upstream ``X, C, D, Q``).

    Attributes:
        X: ``[n, ..., H, W, 3]`` float32 pointmaps (``X[k]`` in the camera of the k-th pair's first image).
        C: ``[n, ..., H, W]`` float32 pointmap confidence (>= 1).
        D: ``[n, ..., H, W, 24]`` unit descriptors.
        Q: ``[n, ..., H, W]`` float32 descriptor confidence (> 0).
    """

    X: Tensor
    C: Tensor
    D: Tensor
    Q: Tensor


def ensure_encoded(predictor: Any, frame: Any) -> tuple[Tensor, Tensor]:
    """Encode ``frame.img`` once and cache ``frame.feat [1,P,C]`` / ``frame.pos [1,P,2]``; returns them on the device
    of ``pos`` (the SLAM device).

    Old keyframes may keep their tokens in pinned host memory (``Frame.offload_feat``, issue 8 memory bound); those are
    returned as a non-blocking host->device copy (the frame keeps the host tokens, the copy is not cached).
    """
    if getattr(frame, "feat", None) is None or getattr(frame, "pos", None) is None:
        frame.feat, frame.pos = predictor.encode(frame.img, frame.true_shape)
    feat, pos = frame.feat, frame.pos
    if feat.device != pos.device:
        feat = feat.to(pos.device, non_blocking=True)
    return feat, pos


def _stack(results: list) -> StackedPrediction:
    return StackedPrediction(
        X=torch.stack([r.pts3d for r in results]),
        C=torch.stack([r.conf for r in results]),
        D=torch.stack([r.desc for r in results]),
        Q=torch.stack([r.desc_conf for r in results]),
    )


def mono(predictor: Any, frame: Any) -> tuple[Tensor, Tensor]:
    """Pointmap of a frame paired with itself (upstream ``mast3r_inference_mono``).

    Args:
        predictor: a Predictor.
        frame: object with ``img [1,3,H,W]``, ``true_shape [1,2]``, ``feat``/``pos`` (encoded and cached on demand).

    Returns:
        ``X_ii [H*W, 3]`` float32 (frame in its own camera) and ``C_ii [H*W, 1]`` float32.
    """
    feat, pos = ensure_encoded(predictor, frame)
    if getattr(predictor, "supports_partial_decode", False):
        res1, _ = predictor.decode(feat, pos, feat, pos, frame.true_shape, need_res2=False, need_desc=False)
    else:
        res1, _ = predictor.decode(feat, pos, feat, pos, frame.true_shape)
    return res1.pts3d.reshape(-1, 3).float(), res1.conf.reshape(-1, 1).float()


def asymmetric(predictor: Any, frame_i: Any, frame_j: Any) -> StackedPrediction:
    """One decode of (i, j) (upstream ``mast3r_asymmetric_inference``; tracking uses i = frame, j = keyframe).

    Returns:
        :class:`StackedPrediction` with leading axis 2: index 0 = ``ii`` (i in camera i), 1 = ``ji`` (j in camera i);
        each ``[2, H, W, ...]`` (batch axis of size 1 removed).

    Raises:
        ValueError: if the two frames have different image sizes.
    """
    fi, pi = ensure_encoded(predictor, frame_i)
    fj, pj = ensure_encoded(predictor, frame_j)
    if tuple(frame_i.true_shape.reshape(-1).tolist()) != tuple(frame_j.true_shape.reshape(-1).tolist()):
        raise ValueError("frames have different image sizes; both views of a pair must share one size")
    res_ii, res_ji = predictor.decode(fi, pi, fj, pj, frame_i.true_shape)
    out = _stack([res_ii, res_ji])
    return StackedPrediction(X=out.X[:, 0], C=out.C[:, 0], D=out.D[:, 0], Q=out.Q[:, 0])


def symmetric_batch(predictor: Any, feat_i: Tensor, pos_i: Tensor, feat_j: Tensor, pos_j: Tensor,
                    shape: Tensor, max_batch: Optional[int] = None) -> StackedPrediction:
    """Decode every edge (i_b, j_b) both ways (upstream ``mast3r_decode_symmetric_batch``).

    With a batching predictor both directions of all edges run as one batched decode
    (``feat1 = [feat_i; feat_j]``, ``feat2 = [feat_j; feat_i]``), chunked to at most ``max_batch`` decodes.

    Args:
        feat_i, feat_j: ``[B, P, C]`` cached encoder tokens; pos_i, pos_j: ``[B, P, 2]`` int64.
        shape: ``[1, 2]`` or ``[B, 2]`` int (H, W), one size for all images.
        max_batch: maximum decoder batch (default: the predictor's ``max_decode_batch`` if it has one, e.g. the
            largest CUDA-graphed batch of a ``GraphedPredictor``, else all ``2B`` at once).

    Returns:
        :class:`StackedPrediction` with ``X [4, B, H, W, 3]``, ``C/Q [4, B, H, W]``, ``D [4, B, H, W, F]`` in the
        upstream order ``[ii, ji, jj, ij]`` (``ji`` = j in camera i, ``ij`` = i in camera j).

    Raises:
        ValueError: mismatched batch sizes.
    """
    if feat_i.shape[0] != feat_j.shape[0] or pos_i.shape[0] != feat_i.shape[0] or pos_j.shape[0] != feat_j.shape[0]:
        raise ValueError(f"batch sizes differ: feat_i {tuple(feat_i.shape)}, feat_j {tuple(feat_j.shape)}")
    b = feat_i.shape[0]
    shape1 = shape.reshape(-1, 2)[:1]
    if getattr(predictor, "supports_batched_decode", False):
        f1, p1 = torch.cat([feat_i, feat_j]), torch.cat([pos_i, pos_j])
        f2, p2 = torch.cat([feat_j, feat_i]), torch.cat([pos_j, pos_i])
        if max_batch is None:
            max_batch = getattr(predictor, "max_decode_batch", None)
        step = 2 * b if not max_batch else max(1, int(max_batch))
        r1s, r2s = [], []
        for s in range(0, 2 * b, step):
            n = min(step, 2 * b - s)
            r1, r2 = predictor.decode(f1[s:s + n], p1[s:s + n], f2[s:s + n], p2[s:s + n], shape1.expand(n, 2))
            r1s.append(r1)
            r2s.append(r2)
        cat = lambda rs, name: torch.cat([getattr(r, name) for r in rs])  # noqa: E731
        out = {}
        for name in ("pts3d", "conf", "desc", "desc_conf"):
            a1, a2 = cat(r1s, name), cat(r2s, name)
            out[name] = torch.stack([a1[:b], a2[:b], a1[b:], a2[b:]])  # ii, ji, jj, ij
        return StackedPrediction(X=out["pts3d"], C=out["conf"], D=out["desc"], Q=out["desc_conf"])
    per_edge = []
    for k in range(b):
        r_ii, r_ji = predictor.decode(feat_i[k:k + 1], pos_i[k:k + 1], feat_j[k:k + 1], pos_j[k:k + 1], shape1)
        r_jj, r_ij = predictor.decode(feat_j[k:k + 1], pos_j[k:k + 1], feat_i[k:k + 1], pos_i[k:k + 1], shape1)
        per_edge.append(_stack([r_ii, r_ji, r_jj, r_ij]))  # [4, 1, H, W, ...]
    return StackedPrediction(X=torch.cat([e.X for e in per_edge], 1), C=torch.cat([e.C for e in per_edge], 1),
                             D=torch.cat([e.D for e in per_edge], 1), Q=torch.cat([e.Q for e in per_edge], 1))
