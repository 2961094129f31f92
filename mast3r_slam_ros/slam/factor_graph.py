"""Factor graph of keyframe-to-keyframe dense matches and its global Sim(3) Gauss–Newton solve.

Source: MASt3R-SLAM ``global_opt.py:FactorGraph`` (spec/upstream_algorithm.md §6.1–§6.3, §6.7) with the fixes of
§13.5 item 6 delegated to :mod:`mast3r_slam_ros.kernels` (damped retry instead of a silent zero step; failures are
returned in :class:`~mast3r_slam_ros.kernels.GNResult`, logged here and never skipped silently).

Graph state (spec §6.1, only ever appended), for ``E`` undirected edges ``(i, j)``, stored compactly (issue 8,
bounded memory on long runs): ``ii, jj [E]`` int64 global keyframe ids (CPU, tiny); per edge on the SLAM device
``idx_ii2jj [HW]`` int32 (for every pixel of j the matched pixel of i, **−1 where the pixel is not used**: the upstream
``valid_match_j ∧ Q_ii2jj > local_opt.Q_conf`` test is folded in once, in float32, when the edge is added),
``idx_jj2ii [HW]`` int32 likewise, and ``Q_ii2jj, Q_jj2ii [HW]`` match confidences ``Qj = sqrt(Qii[idx_i2j]·Qji)``,
``Qi = sqrt(Qjj[idx_j2i]·Qij)`` in ``q_dtype`` (float16 by default, saturated at 65504; float32 on request).
That is ``2·(4 + 2)·HW`` bytes per edge (2.36 MB at 512x384) instead of ``2·(8 + 1 + 4)·HW`` (5.1 MB) with int64
indices, separate bool masks and float32 Q. Because the Q threshold is already applied, the solve passes
``Q_thresh = −inf`` to the kernels, so float16 rounding of Q changes only the residual weights ``√Q/σ`` (relative
error ≤ 2.5e-4, see ``test_compact_storage_matches_float32_solve``), never which pixels count.

Packed layout (the default, ``q_dtype=None``, whenever ``HW < 2^20``): index and Q of a pixel share one int32,
``(code << b) | idx`` with ``b = HW.bit_length()`` index bits (18 at 512x384) and ``q = 32 − b`` bits (14) of a
logarithmic Q code ``code = round((ln min(Q, 65504) − ln Q_conf) / step)``, ``step = ln(65504/Q_conf)/(2^q − 1)``
(:class:`PackedLayout`); −1 (all bits set, an index ≥ HW) marks an unused pixel. The relative error of Q is at most
``step/2`` (3.3e-4 at 14 bits and Q_conf 1.5; float16: ≤ 4.9e-4), of the weights ``√Q`` half that. ``2·4·HW`` bytes
per edge: 1.57 MB at 512x384.
:meth:`FactorGraph.memory_report` accounts for every stored byte.

Edge acceptance (§6.2): the match fraction of each direction is ``|valid ∧ Q > local_opt.Q_conf| / HW``; an edge is
invalid if ``min(frac_j, frac_i) < min_match_frac`` and it is not consecutive (``ii == jj − 1``: the consecutive
keyframe edge is always kept). In relocalization mode (``is_reloc=True``, config ``reloc.strict``) a single invalid
edge rejects the whole request and nothing is added.

Solve (§6.3): variables are the ``T_WC`` of every keyframe appearing in an edge, sorted by global id; the smallest id
is fixed (gauge, ``local_opt.pin = 1``). Global ids are re-indexed to rows of ``Twc`` with ``searchsorted`` and the
2E directed edges ``(ii|jj, jj|ii)`` are passed to ``kernels.gauss_newton_rays`` (uncalibrated) or
``kernels.gauss_newton_calib`` (``use_calib``, pointmaps first constrained to the camera rays of ``K``, §5.3). The
solved poses of all non-fixed keyframes are written back to the :class:`KeyframeStore`.

Bounded solve memory: the kernels take the whole problem as int64/bool/float32 ``[2E,HW]`` tensors plus the stacked
pointmaps ``[n,HW,3]`` — 13·2E·HW + 16·n·HW bytes (4.6 GB + 0.9 GB at 900 edges / 300 keyframes). When that exceeds
``solve_chunk_bytes`` the same Gauss–Newton loop (``kernels.gn_solve``) runs with a blocks function that expands the
compact edges chunk by chunk (each chunk also stacks only the pointmaps of its own keyframes), so the working set
stays near ``solve_chunk_bytes``. The per-edge 7×7 blocks are the same numbers either way (same kernels, same
per-edge inputs); only the memory they are computed in differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mast3r_slam_ros import kernels
from mast3r_slam_ros.kernels import gn_torch
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


#: largest finite float16 (Q is saturated there before the cast; MASt3R match confidences are far below it)
_F16_MAX = 65504.0
#: default working-set budget of one chunk of the global solve (bytes)
SOLVE_CHUNK_BYTES = 256 * 2**20
#: bytes per pixel of one directed edge as the kernels take it: int64 index + bool mask + float32 Q
_KERNEL_EDGE_BYTES_PER_PIXEL = 8 + 1 + 4
#: bytes per pixel of one keyframe as the kernels take it: float32 X [3] + float32 C [1]
_KERNEL_KF_BYTES_PER_PIXEL = 16
#: fewest bits of a packed edge entry left for the log Q code (else Q is stored apart in float16)
_MIN_Q_BITS = 12
#: lower end of the log Q scale when ``Q_conf <= 0`` (smaller Q are stored as this value)
_Q_LO_MIN = 2.0 ** -14


@dataclass(frozen=True)
class PackedLayout:
    """One packed int32 per pixel and direction: ``(code << idx_bits) | idx``, −1 = pixel not used.

    ``code`` is the logarithmic Q code ``round((ln clamp(Q, lo, 65504) − log_lo) / log_step)`` in ``q_bits`` bits.
    Relative error of the decoded Q: at most ``log_step / 2``.
    """

    idx_bits: int
    q_bits: int
    log_lo: float
    log_step: float

    @classmethod
    def for_pixels(cls, hw: int, Q_conf: float) -> "PackedLayout | None":
        """Layout for ``hw`` pixels per image and the threshold ``Q_conf`` (stored Q are ``> Q_conf``); None when
        fewer than :data:`_MIN_Q_BITS` bits would be left for Q (``hw >= 2^20``)."""
        b = max(1, int(hw).bit_length())  # 2^b - 1 >= hw: the all-ones sentinel is never a real index
        q = 32 - b
        if q < _MIN_Q_BITS:
            return None
        lo = max(float(Q_conf), _Q_LO_MIN)
        log_lo = math.log(lo)
        return cls(b, q, log_lo, (math.log(_F16_MAX) - log_lo) / (2 ** q - 1))

    @property
    def max_rel_error(self) -> float:
        """Largest relative error of a decoded Q in ``[exp(log_lo), 65504]`` (half a code step)."""
        return math.expm1(0.5 * self.log_step)


def pack_edges(idx: Tensor, valid: Tensor, Q: Tensor, Q_conf: float, layout: PackedLayout) -> Tensor:
    """Pack one match direction of ``B`` edges into ``[B,HW]`` int32 (see :class:`PackedLayout`).

    Args:
        idx: ``[B,HW]`` integer pixel indices in ``[0, HW)`` (range checked by the caller).
        valid: ``[B,HW,1]`` (or ``[B,HW]``) bool; Q: ``[B,HW,1]`` (or ``[B,HW]``) float match confidence.
        Q_conf: pixels with ``¬valid ∨ ¬(Q > Q_conf)`` (float32 test, NaN fails) are stored as −1.
    """
    B, HW = idx.shape
    q32 = Q.reshape(B, HW).float()
    use = valid.reshape(B, HW) & (q32 > float(Q_conf))
    code = ((q32.clamp(min=math.exp(layout.log_lo), max=_F16_MAX).log_() - layout.log_lo) / layout.log_step)
    code = code.round_().clamp_(0, 2 ** layout.q_bits - 1).to(torch.int64)
    v = (code << layout.idx_bits) | idx.to(torch.int64)
    v = torch.where(v >= 2 ** 31, v - 2 ** 32, v)  # two's complement of the top bit
    v = torch.where(use, v, torch.full((), -1, dtype=torch.int64, device=v.device))
    return v.to(torch.int32)


def unpack_edges(packed: Tensor, layout: PackedLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel inputs from packed storage ``[B,HW]`` int32 -> ``idx [B,HW]`` int64 (0 where unused), ``valid [B,HW,1]``
    bool, ``Q [B,HW,1]`` float32 (decoded log code; meaningless where unused)."""
    valid = packed != -1
    idx = (packed & (2 ** layout.idx_bits - 1)).to(torch.int64).masked_fill_(~valid, 0)
    code = (packed >> layout.idx_bits) & (2 ** layout.q_bits - 1)  # arithmetic shift, then the q bits only
    Q = code.to(torch.float32).mul_(layout.log_step).add_(layout.log_lo).exp_()
    return idx, valid.unsqueeze(-1), Q.unsqueeze(-1)


def pack_direction(idx: Tensor, valid: Tensor, Q: Tensor, Q_conf: float, q_dtype: torch.dtype = torch.float16
                   ) -> tuple[Tensor, Tensor]:
    """Compact one match direction of ``B`` edges for storage.

    Args:
        idx: ``[B,HW]`` integer pixel indices (matched pixel of the other keyframe).
        valid: ``[B,HW,1]`` (or ``[B,HW]``) bool match validity.
        Q: ``[B,HW,1]`` (or ``[B,HW]``) float match confidence.
        Q_conf: ``local_opt.Q_conf``; pixels with ``¬valid ∨ ¬(Q > Q_conf)`` (float32 test, NaN fails) get index −1.
        q_dtype: storage dtype of Q (float16: saturated at 65504; or float32).
    Returns:
        ``idx32 [B,HW]`` int32 (−1 = pixel not used) and ``q [B,HW]`` ``q_dtype``.
    Raises:
        ValueError: HW does not fit int32.
    """
    B, HW = idx.shape
    if HW >= 2**31:
        raise ValueError(f"HW={HW} does not fit int32 pixel indices")
    q32 = Q.reshape(B, HW).float()
    use = valid.reshape(B, HW) & (q32 > float(Q_conf))
    idx32 = torch.where(use, idx.to(torch.int32), torch.full((), -1, dtype=torch.int32, device=idx.device))
    if q_dtype == torch.float16:
        q = q32.clamp(max=_F16_MAX).to(torch.float16)
    elif q_dtype == torch.float32:
        q = q32.clone()
    else:
        raise ValueError(f"q_dtype must be torch.float16 or torch.float32, got {q_dtype}")
    return idx32, q


def unpack_direction(idx32: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel inputs from compact storage: ``idx32 [B,HW]`` int32, ``q [B,HW]`` -> ``idx [B,HW]`` int64 (0 where
    unused), ``valid [B,HW,1]`` bool, ``Q [B,HW,1]`` float32."""
    valid = idx32 >= 0
    return idx32.clamp_min(0).to(torch.int64), valid.unsqueeze(-1), q.float().unsqueeze(-1)


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
        q_dtype: storage of the match confidences Q: None (default) = packed with the index into one int32
            (:class:`PackedLayout`; float16 if the image has ``>= 2^20`` pixels), ``torch.float16`` or
            ``torch.float32`` = a separate Q tensor (see the module docstring for what the choice changes).
        match_batch: edges per symmetric decode + matching call in :meth:`match` (bounds the decode outputs and the
            matching temporaries, which grow with the batch); None = ``predictor.max_decode_batch // 2`` (the edges
            one graphed decode batch covers) if the predictor has one, else all edges at once.
        solve_chunk_bytes: working-set budget of the global solve; larger problems are solved chunk by chunk
            (:data:`SOLVE_CHUNK_BYTES` default; ``0`` forces one edge per chunk, for tests).

    Raises:
        ValueError: ``use_calib`` without ``K``, a malformed ``K``, or a bad ``q_dtype``/``solve_chunk_bytes``.
    """

    def __init__(self, store: Any, predictor: Any, cfg: Any = None, K: Tensor | None = None, *,
                 q_dtype: torch.dtype | None = None, solve_chunk_bytes: int = SOLVE_CHUNK_BYTES,
                 match_batch: int | None = None):
        self.store, self.predictor, self.cfg = store, predictor, cfg
        self.params = GlobalOptParams.from_config(cfg)
        self.use_calib = bool(getattr(cfg, "use_calib", False)) if cfg is not None else False
        if K is not None:
            K = torch.as_tensor(K, dtype=torch.float32)
            if K.shape != (3, 3):
                raise ValueError(f"K must be [3,3], got {tuple(K.shape)}")
        if self.use_calib and K is None:
            raise ValueError("use_calib is True but no intrinsics K were given to the factor graph")
        if q_dtype not in (None, torch.float16, torch.float32):
            raise ValueError(f"q_dtype must be None (packed), torch.float16 or torch.float32, got {q_dtype}")
        if match_batch is not None and int(match_batch) < 1:
            raise ValueError(f"match_batch must be >= 1 or None, got {match_batch}")
        self.match_batch = None if match_batch is None else int(match_batch)
        if int(solve_chunk_bytes) < 0:
            raise ValueError(f"solve_chunk_bytes must be >= 0, got {solve_chunk_bytes}")
        self.K = K
        self.q_dtype = q_dtype
        self.solve_chunk_bytes = int(solve_chunk_bytes)
        self.last_report = EdgeReport()
        self.last_result: kernels.GNResult | None = None
        self.last_solve_chunks = 0  # number of chunks of the last solve (1 = the whole problem at once)
        self._clear()

    # ------------------------------------------------------------------------------------------------ state
    _EDGE_FIELDS = ("_idx_ii2jj", "_idx_jj2ii", "_Q_ii2jj", "_Q_jj2ii")

    def _clear(self) -> None:
        # per undirected edge (lists of equal length E); device tensors are [HW] rows of the per-call batches
        self._ii: list[int] = []
        self._jj: list[int] = []
        self._idx_ii2jj: list[Tensor] = []  # [HW] int32, -1 = unused pixel of j
        self._idx_jj2ii: list[Tensor] = []  # [HW] int32, -1 = unused pixel of i
        self._Q_ii2jj: list[Tensor] = []    # [HW] q_dtype
        self._Q_jj2ii: list[Tensor] = []    # [HW] q_dtype
        # packed layout (decided by the first add_matches, for the graph's HW); None = idx/Q stored apart
        self._layout: PackedLayout | None = None
        # in the packed layout _idx_* hold the packed int32 rows and _Q_* hold None

    def reset(self) -> None:
        """Remove every edge."""
        self._clear()
        self.last_report = EdgeReport()
        self.last_result = None

    def __len__(self) -> int:
        """Number of undirected edges ``E``."""
        return len(self._ii)

    @property
    def ii(self) -> Tensor:
        """``[E]`` int64 (CPU) global keyframe id of the first end of every edge."""
        return torch.tensor(self._ii, dtype=torch.int64)

    @property
    def jj(self) -> Tensor:
        """``[E]`` int64 (CPU) global keyframe id of the second end of every edge."""
        return torch.tensor(self._jj, dtype=torch.int64)

    def edges(self) -> list[tuple[int, int]]:
        """All edges ``(i, j)`` as Python ints, in insertion order."""
        return list(zip(self._ii, self._jj))

    def edge_tensors(self, e: int) -> dict[str, Tensor]:
        """The stored tensors of edge ``e`` (``idx_ii2jj``, ``idx_jj2ii`` ``[HW]`` int32, ``Q_ii2jj``, ``Q_jj2ii``
        ``[HW]`` q_dtype), as stored (no copy). In the packed layout only ``idx_ii2jj``/``idx_jj2ii`` (packed int32,
        :class:`PackedLayout`); :meth:`edge_matches` decodes either layout."""
        return {name[1:]: t for name in self._EDGE_FIELDS if (t := getattr(self, name)[e]) is not None}

    @property
    def layout(self) -> PackedLayout | None:
        """The packed layout of the stored edges (None: separate ``q_dtype`` Q tensors, or no edge yet)."""
        return self._layout

    def edge_matches(self, e: int) -> dict[str, Tensor]:
        """Decoded edge ``e``: ``idx_ii2jj, idx_jj2ii [HW]`` int64 (0 where unused), ``valid_ii2jj, valid_jj2ii [HW]``
        bool, ``Q_ii2jj, Q_jj2ii [HW]`` float32 (as the solve sees them)."""
        out = {}
        for d in ("ii2jj", "jj2ii"):
            idx, valid, Q = self._decode(torch.stack([getattr(self, "_idx_" + d)[e]]),
                                         None if self._layout is not None else torch.stack([getattr(self, "_Q_" + d)[e]]))
            out["idx_" + d], out["valid_" + d], out["Q_" + d] = idx[0], valid[0, :, 0], Q[0, :, 0]
        return out

    def _decode(self, rows: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel inputs ``idx [B,HW]`` int64, ``valid [B,HW,1]`` bool, ``Q [B,HW,1]`` f32 from stacked stored rows."""
        if self._layout is not None:
            return unpack_edges(rows, self._layout)
        return unpack_direction(rows, q)

    def memory_report(self) -> dict[str, int]:
        """Bytes of every stored device tensor of the graph.

        Returns:
            ``{"edges": E, "total": bytes, "per_edge": total // E (0 if E == 0), "idx": bytes, "Q": bytes}``. Edge
            rows are views of one batch tensor per :meth:`add_matches` call that together cover it exactly, so the sum
            of the rows' ``nbytes`` is the allocated size.
        """
        idx = sum(t.nbytes for t in self._idx_ii2jj) + sum(t.nbytes for t in self._idx_jj2ii)
        q = sum(t.nbytes for t in self._Q_ii2jj if t is not None) + sum(t.nbytes for t in self._Q_jj2ii if t is not None)
        E = len(self)
        total = int(idx + q)
        return {"edges": E, "total": total, "per_edge": total // E if E else 0, "idx": int(idx), "Q": int(q),
                "q_bits": self._layout.q_bits if self._layout is not None else 0}

    def nbytes(self) -> int:
        """Total bytes of the stored edge tensors (``memory_report()["total"]``)."""
        return self.memory_report()["total"]

    def subgraph(self, keep) -> "FactorGraph":
        """A new graph over the same store with only the edges ``(i, j)`` for which ``keep(i, j)`` is True.

        The match tensors are shared (not copied). Used for ablations (e.g. the graph without its loop edges).
        """
        g = FactorGraph(self.store, self.predictor, self.cfg, self.K, q_dtype=self.q_dtype,
                        solve_chunk_bytes=self.solve_chunk_bytes, match_batch=self.match_batch)
        g._layout = self._layout
        for e, (i, j) in enumerate(zip(self._ii, self._jj)):
            if not bool(keep(int(i), int(j))):
                continue
            g._ii.append(i)
            g._jj.append(j)
            for name in self._EDGE_FIELDS:
                getattr(g, name).append(getattr(self, name)[e])
        return g

    # ------------------------------------------------------------------------------------------------ edges
    def match(self, frames_i: Sequence[Any], frames_j: Sequence[Any]):
        """Symmetric decode + matching of pairs ``(frames_i[b], frames_j[b])`` (spec §6.2 steps 1–3).

        Frames must carry ``feat``/``pos`` (encoded on demand with the predictor; tokens kept in host memory by the
        keyframe store's token window are copied to the device of ``pos``). The pairs are decoded and matched
        ``match_batch`` at a time (the decode outputs ``[4,b,H,W,·]`` and the matching temporaries scale with the
        batch; the per-pair results are the same). Returns :class:`~mast3r_slam_ros.slam.matching.SymmetricMatch`
        (``[B,HW]``/``[B,HW,1]`` tensors).
        """
        from mast3r_slam_ros.network import inference
        from mast3r_slam_ros.slam import matching

        if len(frames_i) != len(frames_j) or not frames_i:
            raise ValueError(f"need equally many (>0) frames on both sides, got {len(frames_i)} and {len(frames_j)}")
        params = matching.MatchParams.from_config(self.cfg) if self.cfg is not None else None
        B = len(frames_i)
        step = self.match_batch
        if step is None:
            mdb = getattr(self.predictor, "max_decode_batch", None)
            step = max(1, int(mdb) // 2) if mdb else B
        parts = []
        for s in range(0, B, step):
            fi, fj = list(frames_i[s:s + step]), list(frames_j[s:s + step])
            toks_i = [inference.ensure_encoded(self.predictor, f) for f in fi]  # (feat, pos) on the device
            toks_j = [inference.ensure_encoded(self.predictor, f) for f in fj]
            feat_i, pos_i = torch.cat([t[0] for t in toks_i]), torch.cat([t[1] for t in toks_i])
            feat_j, pos_j = torch.cat([t[0] for t in toks_j]), torch.cat([t[1] for t in toks_j])
            del toks_i, toks_j
            parts.append(matching.match_symmetric(self.predictor, feat_i, pos_i, feat_j, pos_j, fi[0].true_shape,
                                                  params))
            del feat_i, feat_j
        if len(parts) == 1:
            return parts[0]
        import dataclasses

        return type(parts[0])(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                 for f in dataclasses.fields(parts[0])})

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
        HW = int(m.idx_i2j.shape[1])
        fj, fi = self.match_fractions(m)
        q_conf = self.params.Q_conf
        layout = self._layout
        if not self._ii:  # first edges: choose the storage for this graph's image size
            layout = PackedLayout.for_pixels(HW, q_conf) if self.q_dtype is None else None
        if layout is not None:
            # range checks below need the raw index (the packed word hides it): compute them on int32 copies
            idx_j, idx_i = pack_edges(m.idx_i2j, m.valid_match_j, m.Qj, q_conf, layout), \
                pack_edges(m.idx_j2i, m.valid_match_i, m.Qi, q_conf, layout)
            q_j = q_i = None
            raw_j = torch.where(idx_j != -1, m.idx_i2j.to(torch.int32), -1)
            raw_i = torch.where(idx_i != -1, m.idx_j2i.to(torch.int32), -1)
        else:
            qd = self.q_dtype if self.q_dtype is not None else torch.float16
            idx_j, q_j = pack_direction(m.idx_i2j, m.valid_match_j, m.Qj, q_conf, qd)
            idx_i, q_i = pack_direction(m.idx_j2i, m.valid_match_i, m.Qi, q_conf, qd)
            raw_j, raw_i = idx_j, idx_i
        # one readback: the fractions and the range of the used indices (the kernels would read out of bounds)
        imin = torch.minimum(raw_j.min(dim=1).values, raw_i.min(dim=1).values).to(fj.dtype)
        imax = torch.maximum(raw_j.max(dim=1).values, raw_i.max(dim=1).values).to(fj.dtype)
        del raw_j, raw_i
        host = torch.stack([torch.minimum(fj, fi), imin, imax]).cpu()
        frac = host[0]
        if HW and (float(host[1].min()) < -1 or float(host[2].max()) >= HW):
            raise ValueError(f"matched pixel indices must lie in [0, {HW}), got range "
                             f"[{int(host[1].min())}, {int(host[2].max())}]")
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
        if keep.numel() < B:
            kd = keep.to(idx_j.device)
            idx_j, idx_i = idx_j[kd], idx_i[kd]
            if q_j is not None:
                q_j, q_i = q_j[kd], q_i[kd]
        self._layout = layout
        n_keep = int(keep.numel())
        self._ii.extend(ii_t[keep].tolist())
        self._jj.extend(jj_t[keep].tolist())
        self._idx_ii2jj.extend(idx_j.unbind(0))
        self._idx_jj2ii.extend(idx_i.unbind(0))
        self._Q_ii2jj.extend(q_j.unbind(0) if q_j is not None else [None] * n_keep)
        self._Q_jj2ii.extend(q_i.unbind(0) if q_i is not None else [None] * n_keep)
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

    # ---- problem set-up
    def _expand(self, edges: Sequence[int], dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel inputs of the directed edges of ``edges`` (forward ``ii->jj`` block, then backward): ``idx [2e,HW]``
        int64, ``valid [2e,HW,1]`` bool, ``Q [2e,HW,1]`` float32 on ``dev``."""
        rows = torch.stack([self._idx_ii2jj[e] for e in edges] + [self._idx_jj2ii[e] for e in edges]).to(dev)
        q = None
        if self._layout is None:
            q = torch.stack([self._Q_ii2jj[e] for e in edges] + [self._Q_jj2ii[e] for e in edges]).to(dev)
        idx, valid, Q = self._decode(rows, q)
        del rows, q
        return idx.contiguous(), valid.contiguous(), Q.contiguous()

    def _points(self, ids: Sequence[int], dev: torch.device, calib: bool) -> tuple[Tensor, Tensor]:
        """Stacked ``Xs [n,HW,3]`` (constrained to the rays of K when ``calib``, §5.3) and ``Cs [n,HW,1]`` f32."""
        Xs, Cs = self.store.stack_points(list(ids))
        Xs = Xs.float().to(dev)
        if calib:
            from mast3r_slam_ros import geometry

            f0 = self.store[int(ids[0])]
            Xs = geometry.constrain_points_to_ray((f0.height, f0.width), Xs, self.K.to(dev)).float()
        return Xs.contiguous(), Cs.float().to(dev).contiguous()

    def _chunks(self, hw: int) -> list[list[int]]:
        """Split the edges (insertion order) into groups whose kernel working set (expanded directed edges and the
        stacked pointmaps of their keyframes) stays within ``solve_chunk_bytes``; at least one edge per group."""
        budget = self.solve_chunk_bytes
        out: list[list[int]] = []
        cur: list[int] = []
        kfs: set[int] = set()
        for e, (i, j) in enumerate(zip(self._ii, self._jj)):
            k2 = kfs | {i, j}
            need = (2 * (len(cur) + 1) * _KERNEL_EDGE_BYTES_PER_PIXEL + len(k2) * _KERNEL_KF_BYTES_PER_PIXEL) * hw
            if cur and need > budget:
                out.append(cur)
                cur, k2 = [], {i, j}
            cur.append(e)
            kfs = k2
        if cur:
            out.append(cur)
        return out

    def _problem(self):
        """``ids [n]`` (CPU, sorted global ids), ``T [n,8]`` f32, global rows ``ri, rj [2E]`` int64, or None."""
        if not self._ii:
            return None
        unique = sorted(set(self._ii) | set(self._jj))
        if len(unique) <= self.params.pin:
            return None
        ids = torch.tensor(unique, dtype=torch.int64)
        T = self.store.stack_poses(ids).data.reshape(-1, 8).float().contiguous()
        dev = T.device
        row = {g: r for r, g in enumerate(unique)}
        ri = torch.tensor([row[g] for g in self._ii] + [row[g] for g in self._jj], dtype=torch.int64, device=dev)
        rj = torch.tensor([row[g] for g in self._jj] + [row[g] for g in self._ii], dtype=torch.int64, device=dev)
        return ids, T, ri, rj

    def solve_GN_rays(self) -> kernels.GNResult | None:
        """Uncalibrated global solve (ray + distance residuals, spec §6.4)."""
        return self._solve(calib=False)

    def solve_GN_calib(self) -> kernels.GNResult | None:
        """Calibrated global solve (pixel + log-depth residuals, spec §6.5); pointmaps constrained to rays (§5.3)."""
        if self.K is None:
            raise ValueError("solve_GN_calib needs intrinsics K")
        return self._solve(calib=True)

    def _solve(self, calib: bool) -> kernels.GNResult | None:
        prob = self._problem()
        if prob is None:
            return None
        ids, T, ri, rj = prob
        dev = T.device
        hw = int(self._idx_ii2jj[0].numel())
        chunks = self._chunks(hw)
        self.last_solve_chunks = len(chunks)
        p = self.params
        q_thresh = float("-inf")  # the Q test was applied in float32 when the edges were stored
        if len(chunks) == 1:  # the whole problem at once through the public kernel API (its input checks included)
            Xs, Cs = self._points(ids.tolist(), dev, calib)
            idx, valid, Q = self._expand(range(len(self)), dev)
            if calib:
                f0 = self.store[int(ids[0])]
                res = kernels.gauss_newton_calib(T, Xs, Cs, self.K.to(dev), ri, rj, idx, valid, Q, f0.height,
                                                 f0.width, p.pixel_border, p.depth_eps, p.sigma_pixel, p.sigma_depth,
                                                 p.C_conf, q_thresh, p.max_iters, p.delta_norm)
            else:
                res = kernels.gauss_newton_rays(T, Xs, Cs, ri, rj, idx, valid, Q, p.sigma_ray, p.sigma_dist, p.C_conf,
                                                q_thresh, p.max_iters, p.delta_norm)
            del Xs, Cs, idx, valid, Q
            return self._finish(ids, T, res)
        blocks = self._chunked_blocks(ids.tolist(), chunks, calib, dev)
        res = gn_torch.gn_solve(T, ri, rj, blocks, int(p.max_iters), float(p.delta_norm))
        return self._finish(ids, T, res)

    def _chunked_blocks(self, ids: list[int], chunks: list[list[int]], calib: bool, dev: torch.device):
        """``blocks(Twc) -> (Hr [2E,7,7], gr [2E,7], cost [2E])`` for ``gn_torch.gn_solve``, computed chunk by chunk.

        Every chunk stacks the pointmaps of its own keyframes, expands its compact edges to the kernel dtypes, calls
        the per-edge blocks of the selected backend (CUDA extension or PyTorch, as ``kernels.gauss_newton_*``) with
        the rows of ``Twc`` of those keyframes, and writes the per-edge results at the edges' global positions
        (forward edges at ``e``, backward at ``E + e``, the order of the rows ``ri, rj`` of :meth:`_problem`).
        """
        p = self.params
        E = len(self)
        row = {g: r for r, g in enumerate(ids)}
        use_ext = kernels.backend() == "cuda" and dev.type == "cuda"
        ext = kernels._ext.load() if use_ext else None
        K = self.K.to(dev) if calib else None
        f0 = self.store[int(ids[0])]
        H, W = f0.height, f0.width
        q_thresh = float("-inf")
        plan = []
        for ch in chunks:
            loc = sorted({self._ii[e] for e in ch} | {self._jj[e] for e in ch})
            lrow = {g: r for r, g in enumerate(loc)}
            li = [lrow[self._ii[e]] for e in ch]
            lj = [lrow[self._jj[e]] for e in ch]
            plan.append((ch, loc,
                         torch.tensor([row[g] for g in loc], dtype=torch.int64, device=dev),
                         torch.tensor(li + lj, dtype=torch.int64, device=dev),
                         torch.tensor(lj + li, dtype=torch.int64, device=dev),
                         torch.tensor(ch + [E + e for e in ch], dtype=torch.int64, device=dev)))

        def blocks(Twc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            Hr = torch.zeros(2 * E, 7, 7, dtype=torch.float64, device=dev)
            gr = torch.zeros(2 * E, 7, dtype=torch.float64, device=dev)
            cost = torch.zeros(2 * E, dtype=torch.float64, device=dev)
            for ch, loc, grow, ii_c, jj_c, dst in plan:
                Xs, Cs = self._points(loc, dev, calib)
                idx, valid, Q = self._expand(ch, dev)
                Tl = Twc[grow].contiguous()
                if calib and ext is not None:
                    h, g, c = gn_torch.cuda_blocks(ext.gn_calib_blocks, Tl, ii_c, jj_c, Xs, Cs, K, ii_c, jj_c, idx,
                                                   valid, Q, int(H), int(W), int(p.pixel_border), float(p.depth_eps),
                                                   float(p.sigma_pixel), float(p.sigma_depth), float(p.C_conf),
                                                   q_thresh)
                elif calib:
                    h, g, c = gn_torch.gn_blocks_calib_torch(
                        Tl, Xs=Xs, Cs=Cs, K=K, ii=ii_c, jj=jj_c, idx=idx, valid=valid, Q=Q, height=int(H),
                        width=int(W), pixel_border=int(p.pixel_border), z_eps=float(p.depth_eps),
                        sigma_pixel=float(p.sigma_pixel), sigma_depth=float(p.sigma_depth), C_thresh=float(p.C_conf),
                        Q_thresh=q_thresh)
                elif ext is not None:
                    h, g, c = gn_torch.cuda_blocks(ext.gn_rays_blocks, Tl, ii_c, jj_c, Xs, Cs, ii_c, jj_c, idx, valid,
                                                   Q, float(p.sigma_ray), float(p.sigma_dist), float(p.C_conf),
                                                   q_thresh)
                else:
                    h, g, c = gn_torch.gn_blocks_rays_torch(
                        Tl, Xs=Xs, Cs=Cs, ii=ii_c, jj=jj_c, idx=idx, valid=valid, Q=Q, sigma_ray=float(p.sigma_ray),
                        sigma_dist=float(p.sigma_dist), C_thresh=float(p.C_conf), Q_thresh=q_thresh)
                Hr[dst] = h.to(torch.float64)
                gr[dst] = g.to(torch.float64)
                cost[dst] = c.to(torch.float64)
                del Xs, Cs, idx, valid, Q
            return Hr, gr, cost

        return blocks

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
