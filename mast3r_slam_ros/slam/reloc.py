"""Relocalization of a lost frame against the keyframe map (spec/upstream_algorithm.md §8).

Source: MASt3R-SLAM ``main.py:relocalization``. One attempt:

1. the lost frame carries a mono pointmap (``X_canon``, ``C``; computed here with the predictor if missing) and its
   encoder tokens;
2. retrieval candidates: ``retrieval.query(frame.feat, k=retrieval.k, min_thresh=retrieval.min_thresh)`` — the frame
   is *not* added to the database yet;
3. strict two-way match check: symmetric decode + matching of (frame, candidate) for every candidate; with
   ``reloc.strict`` every candidate edge needs a two-way match fraction ``>= reloc.min_match_frac`` (0.3), otherwise
   at least one (upstream ``add_factors(..., is_reloc=strict)``);
4. on success: the frame's pose := the best-scoring candidate's ``T_WC``, the frame becomes a keyframe (appended to
   the store), the accepted edges are added to the factor graph, the frame is added to the retrieval database under
   its keyframe index, and the global Gauss–Newton solve runs.

Differences from upstream (deliberate, §13.5 items 4, 5, 10): the match check runs *before* the frame is appended,
so a failed attempt never touches the keyframe store (no append + ``pop_last``); the relocalized keyframe keeps its
real observation count (``N >= 1``, not 0); database ids are explicit keyframe indices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mast3r_slam_ros.lie import Sim3

log = logging.getLogger(__name__)


@dataclass
class RelocParams:
    """``reloc.min_match_frac`` (0.3), ``reloc.strict`` (True), ``retrieval.k`` (3), ``retrieval.min_thresh`` (5e-3)."""

    min_match_frac: float = 0.3
    strict: bool = True
    k: int = 3
    min_thresh: float = 5e-3

    @classmethod
    def from_config(cls, cfg: Any) -> "RelocParams":
        """Read ``cfg.reloc`` and ``cfg.retrieval`` (missing keys keep the upstream defaults)."""
        r = getattr(cfg, "reloc", None) if cfg is not None else None
        q = getattr(cfg, "retrieval", None) if cfg is not None else None
        return cls(min_match_frac=float(getattr(r, "min_match_frac", 0.3)), strict=bool(getattr(r, "strict", True)),
                   k=int(getattr(q, "k", 3)), min_thresh=float(getattr(q, "min_thresh", 5e-3)))


@dataclass
class RelocResult:
    """Outcome of one relocalization attempt.

    ``success``; ``kf_idx`` (index of the new keyframe, or -1); ``candidates`` (retrieved keyframe ids, best first);
    ``scores`` (their ASMK scores); ``match_frac`` (two-way match fraction per candidate, min of both directions);
    ``message`` (why it failed).
    """

    success: bool
    kf_idx: int = -1
    candidates: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    match_frac: list[float] = field(default_factory=list)
    message: str = ""

    def __bool__(self) -> bool:
        return self.success


def relocalize(frame: Any, store: Any, graph: Any, retrieval: Any, predictor: Any, params: RelocParams,
               filtering_mode: str = "weighted_pointmap") -> RelocResult:
    """One relocalization attempt (spec §8); see the module docstring for the steps.

    Args:
        frame: the lost :class:`~mast3r_slam_ros.slam.frame.Frame` (same image size as the keyframes).
        store: :class:`~mast3r_slam_ros.slam.keyframes.KeyframeStore`.
        graph: :class:`~mast3r_slam_ros.slam.factor_graph.FactorGraph` over ``store``.
        retrieval: :class:`~mast3r_slam_ros.slam.retrieval.RetrievalDatabase` holding the keyframes.
        predictor: Predictor used for a missing encoding / mono pointmap.
        params: :class:`RelocParams`.
        filtering_mode: fusion rule for a missing mono pointmap (``tracking.filtering_mode``).

    Returns:
        :class:`RelocResult` (truthy on success). On success ``frame`` is the new last keyframe of ``store`` and
        its ``T_WC`` is the solved pose.

    Raises:
        ValueError: if the store is empty.
    """
    from mast3r_slam_ros.slam import matching

    if len(store) == 0:
        raise ValueError("cannot relocalize against an empty keyframe map")
    matching.ensure_encoded(predictor, frame)
    if frame.X_canon is None:
        X, C = matching.mono_inference(predictor, frame)
        frame.update_pointmap(X, C, filtering_mode)
    feat = frame.device_feat() if hasattr(frame, "device_feat") else frame.feat  # tokens on the SLAM device
    res = retrieval.query(feat, k=params.k, min_thresh=params.min_thresh)
    cands = [c for c in res.kf_ids if 0 <= c < len(store)]
    if not cands:
        return RelocResult(False, message="no retrieval candidate above the score threshold")
    m = graph.match([frame] * len(cands), [store[c] for c in cands])
    fj, fi = graph.match_fractions(m)
    frac = torch.minimum(fj, fi).cpu()
    passed = frac >= params.min_match_frac
    ok = bool(passed.all()) if params.strict else bool(passed.any())
    out = RelocResult(False, candidates=cands, scores=list(res.scores[:len(cands)]), match_frac=frac.tolist())
    if not ok:
        out.message = (f"match check failed: two-way match fractions {[round(f, 3) for f in frac.tolist()]} vs "
                       f"reloc.min_match_frac {params.min_match_frac} ({'strict' if params.strict else 'any'})")
        log.info("relocalization of frame %d failed: %s", frame.frame_id, out.message)
        return out
    with store.lock:
        frame.T_WC = Sim3(store[cands[0]].T_WC.data.clone().reshape(1, 8))
        idx = store.append(frame)
        added = graph.add_matches([idx] * len(cands), cands, m, params.min_match_frac, is_reloc=params.strict)
        if not added:  # cannot happen after the check above; keep the store consistent if it ever does
            store.pop_last()
            out.message = "factor graph rejected the relocalization edges"
            log.error("relocalization of frame %d: %s", frame.frame_id, out.message)
            return out
        retrieval.add(feat, idx)
        if hasattr(store, "compact"):  # tokens in the storage dtype, image released (issue 8 memory bound)
            store.compact(idx)
        result = graph.solve()
    if result is not None and not result.ok:
        log.warning("relocalization of frame %d: global solve reported: %s", frame.frame_id, result.message)
    out.success, out.kf_idx = True, idx
    log.info("relocalized frame %d as keyframe %d against keyframes %s (match fractions %s)", frame.frame_id, idx,
             cands, [round(f, 3) for f in frac.tolist()])
    return out
