"""Factor graph of keyframe-to-keyframe dense matches and its global Sim(3) Gauss–Newton solve.

Source: MASt3R-SLAM ``global_opt.py:FactorGraph`` (spec/upstream_algorithm.md §6.1–§6.3, §6.7) with the fixes of
§13.5 item 6 delegated to :mod:`mast3r_slam_ros.kernels` (damped retry instead of a silent zero step; failures are
returned in :class:`~mast3r_slam_ros.kernels.GNResult`, logged here and never skipped silently).

Graph state (all on the SLAM device, only ever appended, spec §6.1), for ``E`` undirected edges ``(i, j)``:
``ii, jj [E]`` int64 global keyframe ids; ``idx_ii2jj [E,HW]`` (for every pixel of j the matched pixel of i),
``idx_jj2ii [E,HW]``; ``valid_match_j, valid_match_i [E,HW,1]`` bool; ``Q_ii2jj, Q_jj2ii [E,HW,1]`` f32 match
confidences ``Qj = sqrt(Qii[idx_i2j]·Qji)``, ``Qi = sqrt(Qjj[idx_j2i]·Qij)``.

Edge acceptance (§6.2): the match fraction of each direction is ``|valid ∧ Q > local_opt.Q_conf| / HW``; an edge is
invalid if ``min(frac_j, frac_i) < min_match_frac`` and it is not consecutive (``ii == jj − 1``: the consecutive
keyframe edge is always kept). In relocalization mode (``is_reloc=True``, config ``reloc.strict``) a single invalid
edge rejects the whole request and nothing is added.

Solve (§6.3): variables are the ``T_WC`` of every keyframe appearing in an edge, sorted by global id; the smallest id
is fixed (gauge, ``local_opt.pin = 1``). Global ids are re-indexed to rows of ``Twc`` with ``searchsorted`` and the
2E directed edges ``(ii|jj, jj|ii)`` are passed to ``kernels.gauss_newton_rays`` (uncalibrated) or
``kernels.gauss_newton_calib`` (``use_calib``, pointmaps first constrained to the camera rays of ``K``, §5.3). The
solved poses of all non-fixed keyframes are written back to the :class:`KeyframeStore`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mast3r_slam_ros import kernels
from mast3r_slam_ros.lie import Sim3

log = logging.getLogger(__name__)


def _section(cfg: Any, name: str) -> Any:
    return getattr(cfg, name, None) if cfg is not None else None


def _get(sec: Any, key: str, default):
    if sec is None:
        return default
    if isinstance(sec, dict):
        return type(default)(sec.get(key, default))
    return type(default)(getattr(sec, key, default))


@dataclass
class GlobalOptParams:
    """Global-optimization parameters (config section ``local_opt``; defaults of upstream ``base.yaml``, spec §10.1)."""

    pin: int = 1
    C_conf: float = 0.0
    Q_conf: float = 1.5
    min_match_frac: float = 0.1
    pixel_border: int = -10
    depth_eps: float = 1e-6
    max_iters: int = 10
    sigma_ray: float = 0.003
    sigma_dist: float = 10.0
    sigma_pixel: float = 1.0
    sigma_depth: float = 10.0
    delta_norm: float = 1e-8

    @classmethod
    def from_config(cls, cfg: Any) -> "GlobalOptParams":
        """Read ``cfg.local_opt`` (a dataclass, namespace or dict); missing keys keep the upstream defaults."""
        sec = _section(cfg, "local_opt")
        return cls(**{k: _get(sec, k, getattr(cls, k)) for k in cls.__dataclass_fields__})


@dataclass
class EdgeReport:
    """What the last :meth:`FactorGraph.add_matches` call decided, per requested edge (same order as the request)."""

    ii: list[int] = field(default_factory=list)
    jj: list[int] = field(default_factory=list)
    match_frac: list[float] = field(default_factory=list)  # min of both directions
    accepted: list[bool] = field(default_factory=list)


class FactorGraph:
    """Keyframe factor graph with symmetric dense-match edges and a global Sim(3) solve (spec §6).

    Args:
        store: the :class:`~mast3r_slam_ros.slam.keyframes.KeyframeStore` (poses are read from and written to it).
        predictor: a Predictor (``encode``/``decode``), used by :meth:`add_factors` for the symmetric decodes.
        cfg: ``SlamConfig`` (reads ``use_calib``, ``local_opt.*``, ``matching.*``) or None for upstream defaults.
        K: ``[3,3]`` intrinsics of the network image, required when ``cfg.use_calib`` is True.

    Raises:
        ValueError: ``use_calib`` without ``K``, or a malformed ``K``.
    """

    def __init__(self, store: Any, predictor: Any, cfg: Any = None, K: Tensor | None = None):
        self.store, self.predictor, self.cfg = store, predictor, cfg
        self.params = GlobalOptParams.from_config(cfg)
        self.use_calib = bool(getattr(cfg, "use_calib", False)) if cfg is not None else False
        if K is not None:
            K = torch.as_tensor(K, dtype=torch.float32)
            if K.shape != (3, 3):
                raise ValueError(f"K must be [3,3], got {tuple(K.shape)}")
        if self.use_calib and K is None:
            raise ValueError("use_calib is True but no intrinsics K were given to the factor graph")
        self.K = K
        self.last_report = EdgeReport()
        self.last_result: kernels.GNResult | None = None
        self._clear()

    # ------------------------------------------------------------------------------------------------ state
    def _clear(self) -> None:
        self._ii: list[Tensor] = []
        self._jj: list[Tensor] = []
        self._idx_ii2jj: list[Tensor] = []
        self._idx_jj2ii: list[Tensor] = []
        self._valid_j: list[Tensor] = []
        self._valid_i: list[Tensor] = []
        self._Q_ii2jj: list[Tensor] = []
        self._Q_jj2ii: list[Tensor] = []

    def reset(self) -> None:
        """Remove every edge."""
        self._clear()
        self.last_report = EdgeReport()
        self.last_result = None

    def __len__(self) -> int:
        """Number of undirected edges ``E``."""
        return int(sum(t.numel() for t in self._ii))

    @property
    def ii(self) -> Tensor:
        """``[E]`` int64 global keyframe id of the first end of every edge."""
        return torch.cat(self._ii) if self._ii else torch.zeros(0, dtype=torch.int64)

    @property
    def jj(self) -> Tensor:
        """``[E]`` int64 global keyframe id of the second end of every edge."""
        return torch.cat(self._jj) if self._jj else torch.zeros(0, dtype=torch.int64)

    def edges(self) -> list[tuple[int, int]]:
        """All edges ``(i, j)`` as Python ints, in insertion order."""
        return list(zip(self.ii.tolist(), self.jj.tolist()))

    def subgraph(self, keep) -> "FactorGraph":
        """A new graph over the same store with only the edges ``(i, j)`` for which ``keep(i, j)`` is True.

        The match tensors are shared (not copied). Used for ablations (e.g. the graph without its loop edges).
        """
        g = FactorGraph(self.store, self.predictor, self.cfg, self.K)
        for k in range(len(self._ii)):
            mask = torch.tensor([bool(keep(int(i), int(j))) for i, j in zip(self._ii[k].tolist(), self._jj[k].tolist())],
                                dtype=torch.bool, device=self._ii[k].device)
            if not bool(mask.any()):
                continue
            for name in ("_ii", "_jj", "_idx_ii2jj", "_idx_jj2ii", "_valid_j", "_valid_i", "_Q_ii2jj", "_Q_jj2ii"):
                getattr(g, name).append(getattr(self, name)[k][mask])
        return g

    # ------------------------------------------------------------------------------------------------ edges
    def match(self, frames_i: Sequence[Any], frames_j: Sequence[Any]):
        """Symmetric decode + matching of pairs ``(frames_i[b], frames_j[b])`` (spec §6.2 steps 1–3).

        Frames must carry ``feat``/``pos`` (encoded on demand with the predictor). Returns
        :class:`~mast3r_slam_ros.slam.matching.SymmetricMatch` (``[B,HW]``/``[B,HW,1]`` tensors).
        """
        from mast3r_slam_ros.slam import matching

        if len(frames_i) != len(frames_j) or not frames_i:
            raise ValueError(f"need equally many (>0) frames on both sides, got {len(frames_i)} and {len(frames_j)}")
        for f in list(frames_i) + list(frames_j):
            matching.ensure_encoded(self.predictor, f)
        feat_i = torch.cat([f.feat for f in frames_i])
        pos_i = torch.cat([f.pos for f in frames_i])
        feat_j = torch.cat([f.feat for f in frames_j])
        pos_j = torch.cat([f.pos for f in frames_j])
        params = matching.MatchParams.from_config(self.cfg) if self.cfg is not None else None
        return matching.match_symmetric(self.predictor, feat_i, pos_i, feat_j, pos_j, frames_i[0].true_shape, params)

    def add_factors(self, ii: Sequence[int], jj: Sequence[int], min_match_frac: float, is_reloc: bool = False) -> bool:
        """Decode, match and add edges ``(ii[b], jj[b])`` between keyframes of the store (spec §6.2).

        Args:
            ii, jj: global keyframe ids, equal length (backend: ``ii`` = older candidates, ``jj`` = the new keyframe).
            min_match_frac: minimum two-way match fraction (``local_opt.min_match_frac`` 0.1, reloc 0.3).
            is_reloc: strict mode: any invalid edge ⇒ nothing is added and False is returned.

        Returns:
            True if at least one edge was added. Details in :attr:`last_report`.

        Raises:
            ValueError: mismatched lengths or a self-edge. IndexError: unknown keyframe id.
        """
        ii, jj = [int(i) for i in ii], [int(j) for j in jj]
        if len(ii) != len(jj):
            raise ValueError(f"ii and jj must have equal length, got {len(ii)} and {len(jj)}")
        if not ii:
            self.last_report = EdgeReport()
            return False
        m = self.match([self.store[i] for i in ii], [self.store[j] for j in jj])
        return self.add_matches(ii, jj, m, min_match_frac, is_reloc)

    def match_fractions(self, m) -> tuple[Tensor, Tensor]:
        """Per-edge match fractions ``(frac_j [B], frac_i [B])`` = ``|valid ∧ Q > Q_conf| / HW`` (spec §6.2 step 4)."""
        q = self.params.Q_conf
        fj = (m.valid_match_j & (m.Qj > q)).float().mean(dim=(1, 2))
        fi = (m.valid_match_i & (m.Qi > q)).float().mean(dim=(1, 2))
        return fj, fi

    def add_matches(self, ii: Sequence[int], jj: Sequence[int], m, min_match_frac: float,
                    is_reloc: bool = False) -> bool:
        """Add already matched pairs (``m``: a ``SymmetricMatch`` of ``B = len(ii)`` pairs) with the §6.2 rules.

        Used by :meth:`add_factors` and by relocalization (which matches the lost frame before it becomes a keyframe).
        Returns True if at least one edge was added; :attr:`last_report` lists the per-edge decision.
        """
        ii_t = torch.as_tensor([int(i) for i in ii], dtype=torch.int64)
        jj_t = torch.as_tensor([int(j) for j in jj], dtype=torch.int64)
        B = ii_t.numel()
        if jj_t.numel() != B or m.idx_i2j.shape[0] != B:
            raise ValueError(f"edge lists ({B}, {jj_t.numel()}) and matches ({m.idx_i2j.shape[0]}) disagree")
        if bool((ii_t == jj_t).any()):
            raise ValueError("a factor-graph edge cannot connect a keyframe to itself")
        fj, fi = self.match_fractions(m)
        frac = torch.minimum(fj, fi).cpu()
        consecutive = ii_t == jj_t - 1
        invalid = (frac < float(min_match_frac)) & ~consecutive
        accepted = ~invalid
        self.last_report = EdgeReport(ii_t.tolist(), jj_t.tolist(), frac.tolist(), accepted.tolist())
        if is_reloc and bool(invalid.any()):
            log.info("factor graph: relocalization edges rejected (match fractions %s < %.3f)",
                     [round(f, 3) for f in frac.tolist()], min_match_frac)
            self.last_report.accepted = [False] * B
            return False
        if not bool(accepted.any()):
            return False
        keep = accepted.nonzero().reshape(-1)
        dev = m.idx_i2j.device
        kd = keep.to(dev)
        self._ii.append(ii_t[keep].to(dev))
        self._jj.append(jj_t[keep].to(dev))
        self._idx_ii2jj.append(m.idx_i2j[kd])
        self._idx_jj2ii.append(m.idx_j2i[kd])
        self._valid_j.append(m.valid_match_j[kd])
        self._valid_i.append(m.valid_match_i[kd])
        self._Q_ii2jj.append(m.Qj[kd].float())
        self._Q_jj2ii.append(m.Qi[kd].float())
        log.debug("factor graph: added edges %s (match fractions %s)",
                  list(zip(ii_t[keep].tolist(), jj_t[keep].tolist())), [round(float(frac[k]), 3) for k in keep.tolist()])
        return True

    # ------------------------------------------------------------------------------------------------ solve
    def solve(self) -> kernels.GNResult | None:
        """Global Gauss–Newton over all keyframes in the graph (calib or rays per ``use_calib``, spec §6.3).

        Returns:
            The kernel's :class:`~mast3r_slam_ros.kernels.GNResult`, or None when there is nothing to solve (no edge,
            or only ``pin`` keyframes). On ``ok=False`` the error is logged and the last good poses (kept by the
            kernel) are written back; non-finite poses are never written (logged as an error).
        """
        return self.solve_GN_calib() if self.use_calib else self.solve_GN_rays()

    def _problem(self):
        if not self._ii:
            return None
        ii, jj = torch.cat(self._ii), torch.cat(self._jj)
        unique = torch.unique(torch.cat([ii, jj]), sorted=True)
        if unique.numel() <= self.params.pin:
            return None
        ids = unique.cpu()
        T = self.store.stack_poses(ids).data.reshape(-1, 8).float()
        Xs, Cs = self.store.stack_points(ids)
        dev = T.device
        ii2 = torch.cat([ii, jj]).to(dev)
        jj2 = torch.cat([jj, ii]).to(dev)
        u = unique.to(dev)
        rows_i = torch.searchsorted(u, ii2)
        rows_j = torch.searchsorted(u, jj2)
        idx = torch.cat([torch.cat(self._idx_ii2jj), torch.cat(self._idx_jj2ii)]).to(dev)
        valid = torch.cat([torch.cat(self._valid_j), torch.cat(self._valid_i)]).to(dev)
        Q = torch.cat([torch.cat(self._Q_ii2jj), torch.cat(self._Q_jj2ii)]).to(dev).float()
        return ids, T.contiguous(), Xs.float().to(dev).contiguous(), Cs.float().to(dev).contiguous(), \
            rows_i.contiguous(), rows_j.contiguous(), idx.contiguous(), valid.contiguous(), Q.contiguous()

    def solve_GN_rays(self) -> kernels.GNResult | None:
        """Uncalibrated global solve (ray + distance residuals, spec §6.4)."""
        prob = self._problem()
        if prob is None:
            return None
        ids, T, Xs, Cs, ri, rj, idx, valid, Q = prob
        p = self.params
        res = kernels.gauss_newton_rays(T, Xs, Cs, ri, rj, idx, valid, Q, p.sigma_ray, p.sigma_dist, p.C_conf,
                                        p.Q_conf, p.max_iters, p.delta_norm)
        return self._finish(ids, T, res)

    def solve_GN_calib(self) -> kernels.GNResult | None:
        """Calibrated global solve (pixel + log-depth residuals, spec §6.5); pointmaps constrained to rays (§5.3)."""
        if self.K is None:
            raise ValueError("solve_GN_calib needs intrinsics K")
        prob = self._problem()
        if prob is None:
            return None
        from mast3r_slam_ros import geometry

        ids, T, Xs, Cs, ri, rj, idx, valid, Q = prob
        f0 = self.store[int(ids[0])]
        H, W = f0.height, f0.width
        K = self.K.to(T.device)
        Xs = geometry.constrain_points_to_ray((H, W), Xs, K).float().contiguous()
        p = self.params
        res = kernels.gauss_newton_calib(T, Xs, Cs, K, ri, rj, idx, valid, Q, H, W, p.pixel_border, p.depth_eps,
                                         p.sigma_pixel, p.sigma_depth, p.C_conf, p.Q_conf, p.max_iters, p.delta_norm)
        return self._finish(ids, T, res)

    def _finish(self, ids: Tensor, T: Tensor, res: kernels.GNResult) -> kernels.GNResult:
        self.last_result = res
        if not res.ok:
            log.error("global optimization over %d keyframes failed after %d iterations: %s",
                      ids.numel(), res.iterations, res.message)
        if not bool(torch.isfinite(T).all()):
            log.error("global optimization produced non-finite poses; keyframe poses NOT updated (%s)", res.message)
            res.ok = False
            return res
        self.store.set_poses(ids[1:], Sim3(T[1:]))  # row 0 is the kernel's fixed gauge
        log.debug("global optimization: %d keyframes, %d edges, %d iterations, cost %.4g -> %.4g",
                  ids.numel(), len(self), res.iterations, res.cost_initial, res.cost)
        return res
