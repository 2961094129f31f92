"""Backend of the SLAM system: factor-graph edges for new keyframes, global solve, loop closure, relocalization.

Source: MASt3R-SLAM ``main.py:run_backend`` (spec/upstream_algorithm.md §1.4) in the single-process form of upstream's
``windows`` branch: every call of :meth:`Backend.step` performs exactly **one** unit of work (one queued keyframe:
retrieval + edges + global solve), so ``SlamSystem.backend_step()`` can be interleaved with tracking by one executor.

One keyframe ``idx`` (§1.4, §7.4):

1. ``cands = retrieval.update(kf.feat, idx, add_after_query=True, k=retrieval.k, min_thresh=retrieval.min_thresh)``;
2. edges ``(c, idx)`` for ``c ∈ {idx−1} ∪ cands`` (de-duplicated, ``idx`` removed) through
   ``FactorGraph.add_factors(..., local_opt.min_match_frac)`` — the consecutive edge is always kept, a retrieval edge
   only if both match directions reach the minimum fraction;
3. global Gauss–Newton over all keyframes of the graph (``solve_GN_calib`` if ``use_calib`` else ``solve_GN_rays``).

Memory (issue 8): right after step 1 the keyframe is compacted (``KeyframeStore.compact``: image released, tokens in
``store.feat_dtype``, tokens of keyframes outside the store's ``feat_window`` moved to pinned host memory; the edge
decodes copy them back through ``FactorGraph.match``). If the store has no ``feat_dtype`` set (None), the backend sets it to
:func:`~mast3r_slam_ros.slam.keyframes.feat_storage_dtype` of the predictor (bfloat16 for a bf16 network trunk, else
float32); construct the store with ``feat_dtype=torch.float32`` to keep float32 tokens.

Loop closures: an accepted retrieval edge to a keyframe at least :attr:`Backend.loop_min_gap` (5) keyframes older
than the new one is counted in :attr:`Backend.loop_closures` (upstream does not count; the gap separates revisits from
the ordinary local edges to the last few keyframes). With ``runtime.loop_closure = False`` such edges are not added
(retrieval candidates closer than the gap still are), which isolates the effect of loop closure on the trajectory.

Retrieval features: ``feature_fn`` (if given), else the predictor's ``retrieval_features(feat)`` (the MASt3R
retrieval whitening, ``network/retrieval.py``) if it has one, else the norm-based token selection of
:mod:`mast3r_slam_ros.slam.retrieval`. Codebook: ``retrieval.codebook`` from the config when set, else the predictor's
``retrieval_codebook`` attribute, else trained on the run's own features (see :mod:`mast3r_slam_ros.slam.retrieval`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from mast3r_slam_ros.slam.factor_graph import FactorGraph
from mast3r_slam_ros.slam.keyframes import feat_storage_dtype
from mast3r_slam_ros.slam.reloc import RelocParams, RelocResult, relocalize
from mast3r_slam_ros.slam.retrieval import RetrievalDatabase

log = logging.getLogger(__name__)


class Backend:
    """One-unit-at-a-time backend driven by ``SlamSystem.backend_step()``.

    Args:
        store: the :class:`~mast3r_slam_ros.slam.keyframes.KeyframeStore`.
        predictor: the Predictor (symmetric decodes for edges, mono inference for relocalization).
        cfg: ``SlamConfig`` (``use_calib``, ``local_opt``, ``matching``, ``retrieval``, ``reloc``,
            ``runtime.loop_closure``) or None for upstream defaults.
        K: ``[3,3]`` network-image intrinsics (needed if ``use_calib``).
        retrieval: a prepared :class:`RetrievalDatabase` (default: built from ``cfg`` and the predictor).
        feature_fn: retrieval feature function ``feat [1,P,C] -> [n,D]`` (see the module docstring).

    Attributes:
        graph: the :class:`FactorGraph`. retrieval: the database. loop_closures: accepted loop edges (int).
        last_result: the last ``GNResult`` (or None). last_reloc: the last :class:`RelocResult` (or None).
        n_solve_failures: number of global solves that reported ``ok=False``.
        n_relocalizations: successful relocalizations.
        lock: re-entrant lock held for a whole :meth:`step`, :meth:`relocalize` or :meth:`reset` (lock order: this
            lock, then ``store.lock``). The store lock is held only for short reads/writes, so tracking in another
            executor thread is not blocked by the network decodes and the global solve.
    """

    loop_min_gap = 5

    def __init__(self, store: Any, predictor: Any, cfg: Any = None, K=None,
                 retrieval: RetrievalDatabase | None = None, feature_fn: Callable | None = None):
        self.store, self.predictor, self.cfg, self.K = store, predictor, cfg, K
        self.graph = FactorGraph(store, predictor, cfg, K)
        if getattr(store, "feat_dtype", "absent") is None:  # tokens in the network trunk's dtype
            store.feat_dtype = feat_storage_dtype(predictor)
        self.retrieval = retrieval if retrieval is not None else self._make_retrieval(feature_fn)
        self.reloc_params = RelocParams.from_config(cfg)
        rt = getattr(cfg, "runtime", None) if cfg is not None else None
        self.loop_closure = bool(getattr(rt, "loop_closure", True)) if rt is not None else True
        tr = getattr(cfg, "tracking", None) if cfg is not None else None
        self.filtering_mode = str(getattr(tr, "filtering_mode", "weighted_pointmap")) if tr is not None \
            else "weighted_pointmap"
        self.lock = threading.RLock()  # one backend step / relocalization / reset at a time (taken BEFORE store.lock)
        self.queue: list[int] = []
        self.loop_closures = 0
        self.loop_edges: list[tuple[int, int]] = []
        self.last_result = None
        self.last_reloc: RelocResult | None = None
        self.n_solve_failures = 0
        self.n_relocalizations = 0

    def _make_retrieval(self, feature_fn: Callable | None) -> RetrievalDatabase:
        fn = feature_fn if feature_fn is not None else getattr(self.predictor, "retrieval_features", None)
        sec = getattr(self.cfg, "retrieval", None) if self.cfg is not None else None
        codebook = getattr(sec, "codebook", None) if sec is not None else None
        if not codebook:
            codebook = getattr(self.predictor, "retrieval_codebook", None)
        dev = None
        try:
            dev = self.store[0].device if len(self.store) else None
        except Exception:  # noqa: BLE001 - device is only a hint
            dev = None
        return RetrievalDatabase.from_config(self.cfg, feature_fn=fn if callable(fn) else None,
                                             codebook=codebook or None, device=dev)

    # ------------------------------------------------------------------------------------------------ queue
    def queue_keyframe(self, idx: int) -> None:
        """Queue keyframe ``idx`` for edge creation + global solve (upstream ``queue_global_optimization``)."""
        self.queue.append(int(idx))

    def has_work(self) -> bool:
        """True if a keyframe is waiting."""
        return bool(self.queue)

    def step(self) -> bool:
        """Process one queued keyframe: retrieval, edges, global solve (spec §1.4). Returns True if work was done.

        A failed solve is logged (``logging.ERROR`` by the factor graph) and counted in ``n_solve_failures``; the
        keyframe is dequeued either way (upstream pops the task after the solve).
        """
        with self.lock:
            if not self.queue:
                return False
            idx = self.queue.pop(0)
            from mast3r_slam_ros.slam import matching

            with self.store.lock:  # short: the keyframe and its tokens
                kf = self.store[idx]
                matching.ensure_encoded(self.predictor, kf)
                # on the device even if the store already moved them to the host (backend far behind tracking)
                feat = kf.device_feat() if hasattr(kf, "device_feat") else kf.feat
            cands = self.retrieval.update(feat, idx, add_after_query=True)  # backend-owned database: no store lock
            if hasattr(self.store, "compact"):  # retrieval has read the float32 tokens: store them compactly
                with self.store.lock:
                    self.store.compact(idx)
            # edges (network decodes) and the global solve run WITHOUT the store lock, so a multi-threaded executor
            # keeps tracking meanwhile: they read keyframe tensors that tracking only ever replaces (never edits in
            # place) and write poses through store.set_poses, which takes the lock itself; the tracker anchors each
            # frame to its keyframe's pose at the end of tracking (spec §1.4 runs the backend concurrently too).
            if not self.loop_closure:
                cands = [c for c in cands if idx - c < self.loop_min_gap]
            kf_idx = sorted(({idx - 1} if idx >= 1 else set()) | set(cands) - {idx})
            if kf_idx:
                self.graph.add_factors(kf_idx, [idx] * len(kf_idx), self.graph.params.min_match_frac)
                rep = self.graph.last_report
                for i, acc in zip(rep.ii, rep.accepted):
                    if acc and i in cands and idx - i >= self.loop_min_gap:
                        self.loop_closures += 1
                        self.loop_edges.append((i, idx))
                        log.info("loop closure: keyframe %d <-> %d", i, idx)
            res = self.graph.solve()
            self.last_result = res
            if res is not None and not res.ok:
                self.n_solve_failures += 1
            return True

    # ------------------------------------------------------------------------------------------------ reloc
    def relocalize(self, frame: Any) -> bool:
        """One relocalization attempt for a lost frame (spec §8, :func:`~mast3r_slam_ros.slam.reloc.relocalize`).

        Returns True if the frame was registered; it is then the newest keyframe of the store (already in the graph
        and the retrieval database, so it is not queued again).
        """
        if len(self.store) == 0:
            return False
        with self.lock, self.store.lock:
            self.last_reloc = relocalize(frame, self.store, self.graph, self.retrieval, self.predictor,
                                         self.reloc_params, self.filtering_mode)
        if self.last_reloc.success:
            self.last_result = self.graph.last_result
            self.n_relocalizations += 1
        return self.last_reloc.success

    def reset(self) -> None:
        """Forget all queued work, edges and database entries (waits for a running :meth:`step`)."""
        with self.lock:
            self._reset()

    def _reset(self) -> None:
        self.queue.clear()
        self.graph.reset()
        self.retrieval.reset()
        self.loop_closures = 0
        self.loop_edges.clear()
        self.last_result = None
        self.last_reloc = None
        self.n_solve_failures = 0
        self.n_relocalizations = 0

