"""Image retrieval for loop closure and relocalization: ASMK over whitened MASt3R encoder tokens.

Source of the method: MASt3R-SLAM ``retrieval_database.py`` on top of ASMK (Tolias et al., "Learning and aggregating
deep local descriptors for instance-level recognition", ECCV 2020; package ``asmk``), as specified in
spec/upstream_algorithm.md §7 and spec/mast3r_network.md §6.

Which ASMK implementation, and why
-----------------------------------
This module is a **faithful re-implementation** of the ASMK steps that MASt3R-SLAM uses, in PyTorch (quantization on
the run's device, the inverted file on the CPU). The PyPI package ``asmk`` 0.1.1 *does* install on Linux here
(``pip install asmk`` builds its Cython ``hamming`` extension from the sdist and pulls ``faiss-cpu``), but

- it is published as an **sdist only**: on Windows it needs the MSVC Build Tools and Cython to install, which a
  ROS 2 Humble user on Windows usually does not have;
- ``import asmk`` imports ``faiss`` at module level, a large native dependency that SLAM does not use (MASt3R-SLAM
  quantizes with its own torch code and only uses the faiss index for nothing);
- the part SLAM needs is ~100 lines (§7.3): top-m nearest centroids, residual aggregation per visual word, sign
  binarization packed to 32-bit words, normalized Hamming similarity, the ``x**alpha`` selectivity with threshold,
  and per-image normalization by ``sqrt(#words)``.

``test/test_retrieval.py`` checks the scores of this implementation against an independent brute-force reference
and, when the ``asmk`` package is importable (it is in the development environment), against ``asmk``'s own
``ASMKKernel.aggregate_image`` / ``IVF.search`` with the same parameters.

Scoring (spec §7.3), for query image q and database image m::

    S(m) = 1/sqrt(|W_q|) * sum_{w in W_q ∩ W_m} sigma(1 - 2*hamming(b_q,w, b_m,w)/D_pad) / sqrt(|W_m|)
    sigma(x) = x**alpha if x >= sim_thresh else 0     (alpha = 3, sim_thresh = 0, idf = 1)

where ``b_·,w = [sum_{x assigned to w} (x - c_w)] > 0`` packed MSB-first in uint32 words and ``D_pad = 32*ceil(D/32)``
(the same normalization as ``asmk.hamming``). Queries use ``query_assign = 5`` nearest words per descriptor, database
images ``db_assign = 1``; with a codebook trained here queries use 1 word per descriptor
(see :meth:`RetrievalDatabase.effective_query_assign`).

Features
--------
The database works on a keyframe's cached encoder tokens ``feat [1,P,C]`` (never re-encodes). ``feature_fn`` turns
them into the local descriptors: with the MASt3R retrieval checkpoint it is the whitening module of
``network/retrieval.py`` (prewhiten → projector → attention → postwhiten → top-``nfeat`` tokens by attention, §6.2).
Without one (e.g. the oracle predictor in tests/benchmarks) the default ``select_by_norm`` keeps the ``nfeat``
tokens with the largest L2 norm, unwhitened — the same selection rule with an identity whitener.

Codebook
--------
With a codebook file (asmk pickle ``{'type': 'Codebook', 'params': {'size': K}, 'state': {'centroids': [K,D]}}``,
or a ``.npy`` / ``.pt`` array ``[K,D]``) the centroids are fixed. **Without one, the codebook is built from the run's
own features** by k-means++ seeding (fixed seed), *without* Lloyd iterations: Lloyd moves every centroid to the mean of
its training descriptors, so for the images the codebook was trained on the ASMK residual sums ``sum (x - c_w)`` become
~0 and their sign bits pure noise (measured: an image queried against itself scored 1e-4 instead of 1); sampled
descriptors as centroids keep the residuals informative. The database keeps the selected
descriptors of each added image (CPU, float32) and (re)trains when the number of images reaches
``codebook_train_images`` and every doubling of it up to ``codebook_freeze_images``; after each (re)training all
stored images are re-aggregated with the new codebook, so scores stay consistent. After the last training the raw
descriptors are dropped (memory bounded by ``codebook_freeze_images`` images). Until the first training the database
answers every query with no candidates; with the default ``codebook_train_images = 1`` a codebook exists from the
first keyframe on (retrained at 2, 4, 8, 16 and 32 keyframes, then frozen). The number of words is
``min(n_clusters, max(2, n_descriptors // 4))`` (``n_clusters`` = 1024 by default): few descriptors per word, because
with many, every image's residual sum tends to ``n·(mean − c_w)`` and stops depending on the image. Queries then use
one word per descriptor (:meth:`RetrievalDatabase.effective_query_assign`).

Database ids are the keyframe indices passed to :meth:`add` (explicit, so relocalization can never make them diverge
from the keyframe store, fixing spec §8 "latent bug" / §13.5 item 5).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: popcount of every byte value, used for the Hamming distance of packed bits.
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int16)


# ----------------------------------------------------------------------------------------------------------------------
# feature selection, codebook, quantization, aggregation (pure functions)
# ----------------------------------------------------------------------------------------------------------------------


def select_by_norm(feat: Tensor, nfeat: int = 300) -> Tensor:
    """Default local-feature selection without a whitening module: keep the ``nfeat`` tokens of largest L2 norm.

    Args:
        feat: encoder tokens ``[1,P,C]`` (or ``[P,C]``), any float dtype, any device.
        nfeat: number of tokens kept (all if ``P <= nfeat``).

    Returns:
        ``[n,C]`` float32 on ``feat.device``, ``n = min(nfeat, P)``, ordered by decreasing norm (``torch.topk``), the
        ``how_select_local`` rule of spec/mast3r_network.md §6.2 with an identity whitener.

    Raises:
        ValueError: if ``feat`` is not ``[1,P,C]`` or ``[P,C]``, or is empty.
    """
    f = _as_tokens(feat)
    n = min(int(nfeat), f.shape[0])
    idx = torch.topk(f.norm(dim=-1), n, largest=True, sorted=True).indices
    return f[idx]


def _as_tokens(feat: Tensor) -> Tensor:
    if not isinstance(feat, Tensor):
        raise TypeError(f"feat must be a torch.Tensor, got {type(feat).__name__}")
    if feat.dim() == 3:
        if feat.shape[0] != 1:
            raise ValueError(f"feat must be [1,P,C] (one image), got {tuple(feat.shape)}")
        feat = feat[0]
    if feat.dim() != 2 or feat.shape[0] == 0 or feat.shape[1] == 0:
        raise ValueError(f"feat must be [1,P,C] or [P,C] with P,C > 0, got {tuple(feat.shape)}")
    return feat.float()


def kmeans(x: Tensor, n_clusters: int, n_iter: int = 20, seed: int = 0) -> Tensor:
    """k-means (k-means++ seeding, Lloyd iterations) in float32 on ``x.device``.

    Args:
        x: descriptors ``[N,D]`` (converted to float32).
        n_clusters: K, ``1 <= K <= N``.
        n_iter: Lloyd iterations (empty clusters are re-seeded on the farthest points).
        seed: seed of the k-means++ sampling (deterministic for a given input).

    Returns:
        centroids ``[K,D]`` float32.

    Raises:
        ValueError: if ``x`` is not 2-D or ``K`` is out of range.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects [N,D], got {tuple(x.shape)}")
    x = x.float()
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    cent = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, n_clusters):
        p = d2.clamp_min(0).double().cpu()
        if float(p.sum()) <= 0:
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        cent.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    c = torch.stack(cent)
    for _ in range(n_iter):
        assign = _sq_dists(x, c).argmin(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            far = _sq_dists(x, c).min(dim=1).values.topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    """Squared L2 distances ``[N,K]`` as ``|x|^2 + |c|^2 - 2 x c^T`` (upstream ``quantize_custom``)."""
    return (x * x).sum(-1, keepdim=True) + (c * c).sum(-1)[None] - 2.0 * x @ c.T


def quantize(x: Tensor, centroids: Tensor, multiple_assignment: int) -> Tensor:
    """Indices of the ``multiple_assignment`` nearest centroids (squared L2), ``[N,m]`` int64, nearest first."""
    m = min(int(multiple_assignment), centroids.shape[0])
    d = _sq_dists(x.float(), centroids.float())
    return torch.topk(d, m, dim=1, largest=False, sorted=True).indices


def aggregate_binary(x: Tensor, words: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """ASMK aggregation of one image with binarization (``asmk.kernel.ASMKKernel.aggregate_image``, binary=True).

    For each unique word ``w`` among all assignments: ``r_w = sum_{descriptors having w among their words} (x - c_w)``,
    bit = ``r_w > 0``, packed MSB-first into uint32 words (``D_pad = 32*ceil(D/32)`` bits, padding bits 0).

    Args:
        x: descriptors ``[N,D]`` float.
        words: assignments ``[N,m]`` int64.
        centroids: ``[K,D]``.

    Returns:
        ``(bits [U, D_pad/8] uint8 (CPU), word_ids [U] int64 (CPU, sorted))``.
    """
    x = x.float()
    uniq = torch.unique(words)  # sorted
    # membership [U,N]: descriptor n has word u among its assignments (counted once even if repeated)
    member = (words[None, :, :] == uniq[:, None, None]).any(dim=-1).to(x.dtype)
    counts = member.sum(dim=1, keepdim=True)
    resid = member @ x - counts * centroids[uniq].float()
    return pack_bits(resid > 0), uniq.cpu()


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a boolean ``[U,D]`` into ``[U, 4*ceil(D/32)]`` uint8 (CPU), MSB first, zero padded to 32-bit words."""
    u, d = bits.shape
    d_pad = 32 * math.ceil(d / 32)
    b = torch.zeros((u, d_pad), dtype=torch.uint8)
    b[:, :d] = bits.cpu().to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (b.view(u, d_pad // 8, 8) * weights).sum(-1).to(torch.uint8)


def hamming_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ``1 - 2*hamming(a_r, b_r)/D_pad`` for packed uint8 rows ``[R,B]`` (``D_pad = 8*B``), float32 ``[R]``."""
    pc = _POPCOUNT8[torch.bitwise_xor(a, b).long()].sum(-1).float()
    return 1.0 - 2.0 * pc / (8 * a.shape[-1])


def load_codebook(path: str | Path) -> Tensor:
    """Load ASMK centroids ``[K,D]`` float32 from an asmk pickle, ``.npy`` or ``.pt``/``.pth`` file.

    The asmk pickle layout is ``{'type': 'Codebook', 'params': {'size': K}, 'state': {'centroids': ndarray [K,D]}}``
    (spec/mast3r_network.md §6.1). Pickles are read with the network layer's restricted unpickler
    (:func:`mast3r_slam_ros.network.retrieval.load_codebook`: only NumPy arrays and plain containers), so a codebook
    file cannot run code.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on an unknown layout, a disallowed pickle or a non-2-D array.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"retrieval codebook not found: {p}")
    if p.suffix in (".pt", ".pth"):
        t = torch.as_tensor(torch.load(p, map_location="cpu", weights_only=True)).float()
    else:
        from mast3r_slam_ros.network.retrieval import load_codebook as load_codebook_safe

        t = load_codebook_safe(p).float()
    if t.dim() != 2:
        raise ValueError(f"{p}: codebook must be [K,D], got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------------------------------
# database
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _ImageEntry:
    kf_id: int
    bits: Tensor  # [U, B] uint8
    words: Tensor  # [U] int64
    raw: Tensor | None = None  # [n, D] float32 CPU, kept until the codebook is frozen


@dataclass
class RetrievalResult:
    """Top-k retrieval answer: keyframe ids (best first) with their ASMK scores (all above ``min_thresh``)."""

    kf_ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


class RetrievalDatabase:
    """ASMK retrieval database of keyframes (spec §7).

    Args:
        feature_fn: ``feat [1,P,C] -> [n,D]`` (or ``[1,n,D]``) local descriptors; default :func:`select_by_norm`.
        codebook: centroids ``[K,D]`` (tensor) or a path for :func:`load_codebook`; ``None`` ⇒ trained on the run's
            features (see the module docstring).
        k, min_thresh: defaults of :meth:`query` (config ``retrieval.k = 3``, ``retrieval.min_thresh = 5e-3``).
        nfeat: tokens kept by the default feature selection (300 upstream).
        n_clusters: codebook size when trained here (upper bound).
        query_assign, db_assign: multiple assignment of queries (5) and database images (1).
        alpha, sim_thresh: ASMK selectivity exponent (3) and similarity threshold (0).
        codebook_train_images, codebook_freeze_images: training schedule when no codebook is given.
        device: where quantization runs (the inverted file stays on the CPU).
        seed: k-means seed.

    Raises:
        ValueError: on invalid parameters.
    """

    def __init__(self, feature_fn: Callable[[Tensor], Tensor] | None = None, codebook: Tensor | str | Path | None = None,
                 *, k: int = 3, min_thresh: float = 5e-3, nfeat: int = 300, n_clusters: int = 1024,
                 query_assign: int = 5, db_assign: int = 1, alpha: float = 3.0, sim_thresh: float = 0.0,
                 codebook_train_images: int = 1, codebook_freeze_images: int = 32,
                 device: str | torch.device = "cpu", seed: int = 0):
        if k < 1 or nfeat < 1 or n_clusters < 2 or query_assign < 1 or db_assign < 1:
            raise ValueError("k, nfeat, query_assign, db_assign must be >= 1 and n_clusters >= 2")
        if codebook_train_images < 1 or codebook_freeze_images < codebook_train_images:
            raise ValueError("need 1 <= codebook_train_images <= codebook_freeze_images")
        self.k, self.min_thresh, self.nfeat = int(k), float(min_thresh), int(nfeat)
        self.n_clusters, self.query_assign, self.db_assign = int(n_clusters), int(query_assign), int(db_assign)
        self.alpha, self.sim_thresh = float(alpha), float(sim_thresh)
        self.train_images, self.freeze_images = int(codebook_train_images), int(codebook_freeze_images)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.feature_fn = feature_fn
        self.fixed_codebook = codebook is not None
        if isinstance(codebook, (str, Path)):
            codebook = load_codebook(codebook)
        self.centroids: Tensor | None = codebook.float().to(self.device) if codebook is not None else None
        self._entries: list[_ImageEntry] = []
        self._next_train = self.train_images
        self._cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    # -- construction helpers -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg, feature_fn: Callable[[Tensor], Tensor] | None = None,
                    codebook: Tensor | str | Path | None = None, device: str | torch.device | None = None,
                    **kw) -> "RetrievalDatabase":
        """Build from a ``SlamConfig`` (``retrieval.k``, ``retrieval.min_thresh``; device from ``runtime.device``)."""
        r = getattr(cfg, "retrieval", None)
        k = int(getattr(r, "k", 3)) if r is not None else 3
        thr = float(getattr(r, "min_thresh", 5e-3)) if r is not None else 5e-3
        if device is None:
            device = _cfg_device(cfg)
        return cls(feature_fn, codebook, k=k, min_thresh=thr, device=device, **kw)

    # -- features -------------------------------------------------------------------------------------------------

    def prep_features(self, feat: Tensor) -> Tensor:
        """Local descriptors of one image: ``feat [1,P,C]`` → ``[n,D]`` float32 on ``self.device``."""
        if self.feature_fn is None:
            out = select_by_norm(feat, self.nfeat)
        else:
            out = self.feature_fn(feat)
            if out.dim() == 3:
                out = out[0]
        if out.dim() != 2 or out.shape[0] == 0:
            raise ValueError(f"feature_fn must return [n,D] or [1,n,D] with n > 0, got {tuple(out.shape)}")
        if self.centroids is not None and out.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"descriptor dim {out.shape[1]} != codebook dim {self.centroids.shape[1]}")
        return out.float().to(self.device)

    # -- public API -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def ready(self) -> bool:
        """True once a codebook exists (given, or trained on enough images)."""
        return self.centroids is not None

    def effective_query_assign(self) -> int:
        """Multiple assignment used for queries: ``query_assign`` (5) with a given codebook (spec §7.3); 1 with a
        codebook trained on the run's features (at most ``n_clusters`` words, far fewer than the 64k of the release). With a few dozen words the 5 nearest cover a large
        part of the vocabulary, each query word then aggregates most descriptors, and its binary signature no longer
        resembles any database signature (even an identical image scores ~1e-4 instead of 1 with 12 words)."""
        if self.fixed_codebook or self.centroids is None:
            return self.query_assign
        return 1

    def kf_ids(self) -> list[int]:
        """Keyframe ids stored, in insertion order."""
        return [e.kf_id for e in self._entries]

    def query(self, feat: Tensor, k: int | None = None, min_thresh: float | None = None,
              exclude: set[int] | None = None) -> RetrievalResult:
        """Top-``k`` database images for one image's tokens (spec §7.3), scores ``> min_thresh``, best first.

        Args:
            feat: encoder tokens ``[1,P,C]``.
            k: number of candidates (default ``self.k``); ``torch.topk(scores, min(k, n_images))`` as upstream.
            min_thresh: minimum ASMK score (default ``self.min_thresh``).
            exclude: keyframe ids not to return (scored but filtered before the top-k).

        Returns:
            :class:`RetrievalResult`; empty when the database is empty or has no codebook yet.
        """
        x = self.prep_features(feat)
        return self._query_desc(x, k, min_thresh, exclude)

    def add(self, feat: Tensor, kf_id: int) -> None:
        """Insert one keyframe (``db_assign`` words per descriptor) under the keyframe id ``kf_id``.

        Raises:
            ValueError: if ``kf_id`` is already in the database.
        """
        self._add_desc(self.prep_features(feat), int(kf_id))

    def update(self, feat: Tensor, kf_id: int, add_after_query: bool = True, k: int | None = None,
               min_thresh: float | None = None) -> list[int]:
        """Query, then optionally add (upstream ``RetrievalDatabase.update``); returns candidate keyframe ids."""
        x = self.prep_features(feat)
        res = self._query_desc(x, k, min_thresh, None)
        if add_after_query:
            self._add_desc(x, int(kf_id))
        return res.kf_ids

    def reset(self) -> None:
        """Drop all images (and a codebook trained here; a given codebook is kept)."""
        self._entries.clear()
        self._cache = None
        self._next_train = self.train_images
        if not self.fixed_codebook:
            self.centroids = None

    # -- internals ------------------------------------------------------------------------------------------------

    def _query_desc(self, x: Tensor, k: int | None, min_thresh: float | None,
                    exclude: set[int] | None) -> RetrievalResult:
        k = self.k if k is None else int(k)
        thr = self.min_thresh if min_thresh is None else float(min_thresh)
        if not self._entries or self.centroids is None:
            return RetrievalResult()
        words = quantize(x, self.centroids, self.effective_query_assign())
        bits_q, words_q = aggregate_binary(x, words, self.centroids)
        scores = self._scores(bits_q, words_q)  # [n_images] float64, entry order
        ids = torch.tensor([e.kf_id for e in self._entries], dtype=torch.int64)
        if exclude:
            keep = torch.tensor([i not in exclude for i in ids.tolist()], dtype=torch.bool)
            scores, ids = scores[keep], ids[keep]
        if scores.numel() == 0:
            return RetrievalResult()
        top = torch.topk(scores, min(k, scores.numel()))
        sel = top.values > thr
        return RetrievalResult(ids[top.indices[sel]].tolist(), top.values[sel].tolist())

    def _scores(self, bits_q: Tensor, words_q: Tensor) -> Tensor:
        db_bits, db_words, db_img, n_words = self._flat()
        scores = torch.zeros(len(self._entries), dtype=torch.float64)
        sel = torch.isin(db_words, words_q)
        if bool(sel.any()):
            rows = torch.searchsorted(words_q, db_words[sel])
            sim = hamming_similarity(bits_q[rows], db_bits[sel]).double()
            ok = sim >= self.sim_thresh
            s = torch.where(ok, sim.clamp_min(0) ** self.alpha, torch.zeros_like(sim))
            img = db_img[sel]
            s = s / torch.sqrt(n_words[img])
            scores.index_add_(0, img, s)
        return scores / math.sqrt(words_q.numel())

    def _flat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._cache is None:
            bits = torch.cat([e.bits for e in self._entries])
            words = torch.cat([e.words for e in self._entries])
            img = torch.cat([torch.full((e.words.numel(),), i, dtype=torch.int64)
                             for i, e in enumerate(self._entries)])
            n_words = torch.tensor([float(e.words.numel()) for e in self._entries], dtype=torch.float64)
            self._cache = (bits, words, img, n_words)
        return self._cache

    def _add_desc(self, x: Tensor, kf_id: int) -> None:
        if any(e.kf_id == kf_id for e in self._entries):
            raise ValueError(f"keyframe {kf_id} is already in the retrieval database")
        keep_raw = not self.fixed_codebook and len(self._entries) < self.freeze_images
        entry = _ImageEntry(kf_id, torch.zeros((0, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                            x.detach().to("cpu", torch.float32).clone() if keep_raw else None)
        if self.centroids is not None:
            entry.bits, entry.words = self._aggregate_db(x)
        self._entries.append(entry)
        self._cache = None
        if not self.fixed_codebook and len(self._entries) >= self._next_train \
                and self._next_train <= self.freeze_images:
            self._train()

    def _aggregate_db(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return aggregate_binary(x, quantize(x, self.centroids, self.db_assign), self.centroids)

    def _train(self) -> None:
        raws = [e.raw for e in self._entries if e.raw is not None]
        data = torch.cat(raws).float().to(self.device)
        n_cl = min(self.n_clusters, max(2, data.shape[0] // 4))
        self.centroids = kmeans(data, n_cl, n_iter=0, seed=self.seed)  # k-means++ seeds only, see module docstring
        for e in self._entries:
            if e.raw is not None:
                e.bits, e.words = self._aggregate_db(e.raw.float().to(self.device))
        self._cache = None
        log.info("retrieval: trained a %d-word codebook on %d descriptors of %d keyframes",
                 n_cl, data.shape[0], len(self._entries))
        self._next_train *= 2
        if self._next_train > self.freeze_images:
            for e in self._entries:
                e.raw = None


def _cfg_device(cfg) -> torch.device:
    rt = getattr(cfg, "runtime", None)
    dev = getattr(rt, "device", "cpu") if rt is not None else "cpu"
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)
