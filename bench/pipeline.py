#!/usr/bin/env python3
"""End-to-end SLAM pipeline benchmark: FPS, per-stage latency and peak memory of ``SlamSystem`` (issue 8).

What runs: a synthetic camera path (``testing.scenes.sequence_poses('loop', N)``, one lap with a revisit at the end)
through the full ``SlamSystem`` (INIT -> TRACKING, keyframes, backend edges + global Gauss-Newton, loop closure) with
``backend_step()`` called once after every ``track()`` (the single-threaded executor's interleaving, backend in the
same process).

Predictor (the "hybrid"): every ``encode``/``decode`` runs the **full-size MASt3R network** (688 M parameters, random
weights: same kernels and FLOPs as real weights) at the requested precision, eager or CUDA-graphed
(``network/graphs.py``), and then **replaces its outputs** by exact ones from a GPU ray-caster of a box room (the
``testing.scenes`` room: walls, table, cube, cabinet) so tracking stays in TRACKING instead of falling into RELOC on
random-weight pointmaps. The substitute outputs are computed on the GPU without host synchronization; their cost is
timed separately ("oracle") and included in the FPS (so the FPS is slightly pessimistic). ``--network none`` runs the
same pipeline with the oracle only (the non-network cost of SLAM).

Numbers:

* ``fps``: frames / wall time of the ``track`` + ``backend_step`` loop over all frames after ``--warmup-frames``
  (graph capture and cuBLAS warm-up happen in those), a ``torch.cuda.synchronize`` at the end;
* ``track_fps``: the same counting only ``track`` calls (backend excluded);
* per-stage ms (a second, profiled pass over ``--profile-frames`` frames that synchronizes around every stage, so its
  total is slightly above the unprofiled frame time): preprocess (``SlamSystem._make_frame``: resize/crop/normalize +
  upload), encode, decode (decoder + heads; in eager runs also split into decoder and heads), oracle (the substitute
  outputs), match (``slam.matching.match`` incl. iter_proj and refine), iter_proj, refine, tracking solve
  (``opt_pose_*_sim3``), fusion (``Frame.update_pointmap``), backend step (mean over the frames that did backend
  work), track total;
* ``peak_mem_gib``: ``torch.cuda.max_memory_allocated`` over the run (model weights included);
* ``network_step_ms``: median of encode + decode (both heads) per tracked frame from the profiled pass, and its ratio
  to the 28.8 ms reference step (upstream, H100, TF32: encoder 8.0 + decoder 13.8 + two heads 3.4 each).

Usage::

    python bench/pipeline.py --json out.json                            # default variants on the GPU
    python bench/pipeline.py --variants eager-tf32,graph-bf16+cl+ph --frames 500
    python bench/pipeline.py --variants graph-bf16+cl+ph --kernel-backends cuda,torch
    python bench/pipeline.py --memory-keyframes 300                     # a run where every frame is a keyframe
    python bench/pipeline.py --device cpu --config tiny --size 128x96 --frames 12 --profile-frames 6  # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mast3r_slam_ros import kernels
from mast3r_slam_ros.config import load_config
from mast3r_slam_ros.network.heads import HeadOutput
from mast3r_slam_ros.network.model import Mast3rConfig, Mast3rModel
from mast3r_slam_ros.slam import matching as matching_mod
from mast3r_slam_ros.slam import system as system_mod
from mast3r_slam_ros.slam import tracker as tracker_mod
from mast3r_slam_ros.slam.frame import Frame, Mode
from mast3r_slam_ros.slam.system import SlamSystem, native_preprocess

#: upstream H100 TF32 network step (spec mast3r_network.md §7): encoder 8.0 + decoder 13.8 + 2 x head 3.4
REFERENCE_STEP_MS = 28.8

# room of testing/scenes.py (inside box) and its solid boxes
ROOM = ((-2.5, -2.0, 0.0), (2.5, 2.0, 2.6))
SOLIDS = (((-0.6, -0.4, 0.0), (0.6, 0.4, 0.75)), ((-0.05, -0.15, 0.75), (0.25, 0.15, 1.05)),
          ((-2.5, 0.7, 0.0), (-2.05, 1.8, 1.2)))


# --------------------------------------------------------------------------------------------------- GPU oracle
class BoxRoomOracle:
    """Exact MASt3R-like outputs of a box room, computed on the device from camera poses (no host sync).

    Args: T_WC ``[N,4,4]`` float64 poses (OpenCV optical axes), K ``[3,3]`` (pixels), (H, W), device.
    Outputs of :meth:`pair` follow the Predictor frames: view 1 in camera 1, view 2 in camera 1; ``conf`` 10 on pixels
    of view 2 that project into image 1 (else 2), ``desc`` the 24-D world-point embedding of
    ``testing.oracle.descriptor_embedding`` (so true correspondences have equal descriptors), ``desc_conf`` 10 / 0.1.
    """

    def __init__(self, T_WC: np.ndarray, K: np.ndarray, hw: tuple[int, int], device: torch.device) -> None:
        from mast3r_slam_ros.testing.oracle import _desc_frequencies

        self.H, self.W = int(hw[0]), int(hw[1])
        self.dev = device
        self.T = torch.as_tensor(T_WC, dtype=torch.float32, device=device)
        self.K = torch.as_tensor(K, dtype=torch.float32, device=device)
        self.freq = torch.as_tensor(_desc_frequencies(0.03, 1.0), dtype=torch.float32, device=device)  # [12,3]
        v, u = torch.meshgrid(torch.arange(self.H, device=device, dtype=torch.float32),
                              torch.arange(self.W, device=device, dtype=torch.float32), indexing="ij")
        fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
        self.rays = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], -1)  # [H,W,3], z = 1
        self.room_lo = torch.tensor(ROOM[0], device=device)
        self.room_hi = torch.tensor(ROOM[1], device=device)
        self.solid_lo = torch.tensor([s[0] for s in SOLIDS], device=device)
        self.solid_hi = torch.tensor([s[1] for s in SOLIDS], device=device)
        self._cache: dict[int, tuple] = {}

    def raycast(self, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``T [B,4,4]`` -> (camera points ``Xc [B,H,W,3]``, world points ``Pw [B,H,W,3]``)."""
        R, t = T[:, :3, :3], T[:, :3, 3]
        d = torch.einsum("bij,hwj->bhwi", R, self.rays)  # world direction with camera z = 1 -> t is the depth
        o = t[:, None, None, :]
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t1, t2 = (self.room_lo - o) * inv, (self.room_hi - o) * inv
        z = torch.maximum(t1, t2).amin(-1)  # exit of the room
        for lo, hi in zip(self.solid_lo, self.solid_hi):
            s1, s2 = (lo - o) * inv, (hi - o) * inv
            tn, tf = torch.minimum(s1, s2).amax(-1), torch.maximum(s1, s2).amin(-1)
            hit = (tn <= tf) & (tn > 1e-4)
            z = torch.where(hit & (tn < z), tn, z)
        Xc = self.rays * z[..., None]
        return Xc, o + d * z[..., None]

    def frame_data(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Xc, Pw, desc)`` ``[1,H,W,*]`` of frame ``i`` (host index), kept in a small LRU cache."""
        hit = self._cache.pop(i, None)
        if hit is None:
            Xc, Pw = self.raycast(self.T[i:i + 1])
            hit = (Xc, Pw, self.embed(Pw))
        self._cache[i] = hit
        while len(self._cache) > 4:
            self._cache.pop(next(iter(self._cache)))
        return hit

    def pair_host(self, i: int, j: int, need_res2: bool = True, need_desc=True
                  ) -> tuple[HeadOutput, HeadOutput | None]:
        """:meth:`pair` for host indices, reusing cached per-frame ray casts (the keyframe's is reused by every
        tracked frame)."""
        nd1, nd2 = (need_desc, need_desc) if isinstance(need_desc, bool) else need_desc
        X1, _, D1 = self.frame_data(i)
        ones = torch.full((1, self.H, self.W), 10.0, device=self.dev)
        res1 = HeadOutput(X1.clone(), ones, D1.clone() if nd1 else None, ones.clone() if nd1 else None)
        if not need_res2:
            return res1, None
        _, P2, D2 = self.frame_data(j)
        return res1, self._view2(self.T[i:i + 1], P2, D2.clone() if nd2 else None, nd2)

    def _view2(self, T1: torch.Tensor, P2: torch.Tensor, D2: torch.Tensor | None, nd2: bool) -> HeadOutput:
        R1, t1 = T1[:, :3, :3], T1[:, :3, 3]
        X21 = torch.einsum("bji,bhwj->bhwi", R1, P2 - t1[:, None, None, :])  # R1^T (P - t1)
        z = X21[..., 2]
        zs = z.clamp_min(1e-6)
        u = self.K[0, 0] * X21[..., 0] / zs + self.K[0, 2]
        v = self.K[1, 1] * X21[..., 1] / zs + self.K[1, 2]
        vis = (z > 1e-3) & (u >= 0) & (u <= self.W - 1) & (v >= 0) & (v <= self.H - 1)
        conf2 = torch.where(vis, 10.0, 2.0)
        q2 = torch.where(vis, 10.0, 0.1)
        return HeadOutput(X21, conf2, D2, q2 if nd2 else None)

    def embed(self, Pw: torch.Tensor) -> torch.Tensor:
        ph = Pw @ self.freq.T
        return torch.cat([torch.cos(ph), torch.sin(ph)], -1) * (1.0 / math.sqrt(12.0))

    def colors(self, i: int) -> np.ndarray:
        """``[H,W,3]`` uint8 image of frame ``i`` (a smooth texture of the world point)."""
        _, Pw = self.raycast(self.T[i:i + 1])
        c = 127.5 + 100.0 * torch.sin(Pw * torch.tensor([7.0, 11.0, 5.0], device=self.dev) + Pw.sum(-1, keepdim=True))
        return c[0].clamp(0, 255).to(torch.uint8).cpu().numpy()

    def pair(self, idx1: torch.Tensor, idx2: torch.Tensor, need_res2: bool = True, need_desc=True
             ) -> tuple[HeadOutput, HeadOutput | None]:
        """Outputs of the pairs ``(idx1[b], idx2[b])`` (device long tensors ``[B]``)."""
        nd1, nd2 = (need_desc, need_desc) if isinstance(need_desc, bool) else need_desc
        T1 = self.T[idx1]
        X1, P1 = self.raycast(T1)
        B = X1.shape[0]
        ones = torch.full((B, self.H, self.W), 10.0, device=self.dev)
        res1 = HeadOutput(X1, ones, self.embed(P1) if nd1 else None, ones.clone() if nd1 else None)
        if not need_res2:
            return res1, None
        _, P2 = self.raycast(self.T[idx2])
        return res1, self._view2(T1, P2, self.embed(P2) if nd2 else None, nd2)


def _write_index(feat: torch.Tensor, i: int) -> None:
    """Tag encoder tokens with the sequence index as two base-128 digits (exact even after the keyframe store keeps
    the tokens in bfloat16, which holds integers only up to 256)."""
    feat[:, 0, 0] = float(i // 128)
    feat[:, 0, 1] = float(i % 128)


def _read_index(feat: torch.Tensor) -> torch.Tensor:
    """``[B]`` long sequence indices written by :func:`_write_index` (read on the device, no host sync)."""
    return (feat[:, 0, 0].float().round() * 128 + feat[:, 0, 1].float().round()).long()


class HybridPredictor:
    """Predictor: full network compute (timing) + oracle outputs (see the module docstring).

    ``next_index`` must be set to the sequence index of the image before ``SlamSystem.track``; ``encode`` writes it
    into token 0, channel 0 of the returned features, where ``decode`` reads it back on the device.
    """

    supports_partial_decode = True
    supports_batched_decode = True

    def __init__(self, network: Any | None, oracle: BoxRoomOracle, feat_dim: int = 1024,
                 timer: "StageTimer | None" = None) -> None:
        self.network = network
        self.oracle = oracle
        self.feat_dim = feat_dim
        self.next_index = 0
        self.timer = timer
        self._index_of: dict[int, tuple] = {}  # data_ptr -> (weakref to the encoded feat, sequence index)

    @property
    def max_decode_batch(self) -> int | None:
        """The wrapped network's graphed decoder batch (the backend splits its symmetric decodes into it)."""
        return getattr(self.network, "max_decode_batch", None)

    @property
    def model(self) -> Any:
        """The wrapped Mast3rModel (None without a network): the keyframe store reads its trunk precision to store
        encoder tokens in that dtype, as with the real predictor."""
        return getattr(self.network, "model", self.network)

    def _host_index(self, feat: torch.Tensor) -> int | None:
        if feat.shape[0] != 1:
            return None
        hit = self._index_of.get(feat.data_ptr())
        return hit[1] if hit is not None and hit[0]() is feat else None

    def _t(self, name: str, fn: Callable[[], Any]) -> Any:
        return self.timer.time(name, fn) if self.timer is not None else fn()

    def encode(self, img: torch.Tensor, true_shape: torch.Tensor):
        if self.network is not None:
            feat, pos = self._t("encode", lambda: self.network.encode(img, true_shape))
        else:
            B, _, H, W = img.shape
            feat = torch.randn(B, (H // 16) * (W // 16), 16, device=img.device)
            pos = torch.zeros(B, (H // 16) * (W // 16), 2, dtype=torch.long, device=img.device)
        _write_index(feat, self.next_index)
        if feat.shape[0] == 1:
            import weakref

            self._index_of = {k: v for k, v in self._index_of.items() if v[0]() is not None}
            self._index_of[feat.data_ptr()] = (weakref.ref(feat), self.next_index)
        return feat, pos

    def decode(self, feat1, pos1, feat2, pos2, true_shape, *, need_res2: bool = True, need_desc=True):
        if self.network is not None:
            self._t("decode", lambda: self.network.decode(feat1, pos1, feat2, pos2, true_shape,
                                                          need_res2=need_res2, need_desc=need_desc))
        i1, i2 = self._host_index(feat1), self._host_index(feat2)
        if i1 is not None and i2 is not None:
            return self._t("oracle", lambda: self.oracle.pair_host(i1, i2, need_res2, need_desc))
        idx1, idx2 = _read_index(feat1), _read_index(feat2)
        return self._t("oracle", lambda: self.oracle.pair(idx1, idx2, need_res2, need_desc))


# --------------------------------------------------------------------------------------------------- stage timer
class StageTimer:
    """Wall time of named stages with a device synchronize before and after each (profiled pass only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.frame: dict[str, float] = defaultdict(float)
        self.frames: list[dict[str, float]] = []
        self.depth = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.frame[name] += (time.perf_counter() - t0) * 1e3
        return out

    def next_frame(self) -> None:
        self.frames.append(dict(self.frame))
        self.frame = defaultdict(float)

    def summary(self, skip: int = 0) -> dict[str, dict[str, float]]:
        frames = self.frames[skip:]
        names = sorted({k for f in frames for k in f})
        out = {}
        for k in names:
            vals = [f[k] for f in frames if k in f]
            out[k] = {"median_ms": statistics.median(vals), "mean_ms": statistics.fmean(vals),
                      "calls_frac": len(vals) / max(1, len(frames))}
        return out


def install_profiling(timer: StageTimer, system: SlamSystem, model: Any | None) -> Callable[[], None]:
    """Wrap the stage functions with ``timer``; returns a function that undoes it."""
    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)

        def timed(*a, **kw):
            return timer.time(name, lambda: orig(*a, **kw))

        setattr(owner, attr, timed)
        undo.append(lambda: setattr(owner, attr, orig))

    wrap(system, "_make_frame", "preprocess")
    wrap(matching_mod, "match", "match")
    wrap(kernels, "iter_proj", "iter_proj")
    wrap(kernels, "refine_matches", "refine")
    wrap(tracker_mod, "opt_pose_ray_dist_sim3", "tracking_solve")
    wrap(tracker_mod, "opt_pose_calib_sim3", "tracking_solve")
    wrap(Frame, "update_pointmap", "fusion")
    wrap(system, "backend_step", "backend_step")
    wrap(system, "track", "track_total")
    if isinstance(model, Mast3rModel):  # eager only: inside a graph replay these are not called
        wrap(model, "decoder_tokens", "decoder")
        for h in ("downstream_head1", "downstream_head2"):
            head = getattr(model, h)
            wrap(head, "forward", "heads")

    def restore() -> None:
        for u in reversed(undo):
            u()

    return restore


# --------------------------------------------------------------------------------------------------- one variant
#: variant suffixes: channels-last heads, parallel heads, decoder streams, bf16 / fp16 heads, eager tracker GN
VARIANT_FLAGS = {"cl", "ph", "ds", "bh", "fh", "eagergn"}


def build_network(variant: str, model: Mast3rModel | None):
    """``eager-<prec>`` -> the model; ``graph-<prec>`` -> GraphedPredictor; ``none`` -> None. Suffixes: ``+cl``
    channels-last heads, ``+ph`` parallel heads, ``+ds`` decoder branches on two streams (graph only), ``+bh`` / ``+fh``
    bf16 / fp16 heads (eager and graph); ``+eagergn`` is handled by :func:`run_variant`."""
    flags = set(variant.split("+")[1:])
    if flags - VARIANT_FLAGS:
        raise ValueError(f"unknown variant suffix(es) {sorted(flags - VARIANT_FLAGS)} in {variant!r}; "
                         f"known: {sorted(VARIANT_FLAGS)}")
    if {"bh", "fh"} <= flags:
        raise ValueError(f"variant {variant!r}: +bh and +fh exclude each other")
    head_precision = "bf16" if "bh" in flags else "fp16" if "fh" in flags else "fp32"
    variant = variant.split("+", 1)[0]
    if variant == "none" or model is None:
        return None
    mode, prec = variant.split("-", 1)
    if mode == "eager":
        model.set_precision(prec)
        model.set_head_precision(head_precision)
        return model
    if mode == "graph":
        from mast3r_slam_ros.network.graphs import GraphedPredictor

        model.set_precision(prec)
        return GraphedPredictor(model, heads_channels_last="cl" in flags, parallel_heads="ph" in flags,
                                decoder_streams="ds" in flags, head_precision=head_precision)
    raise ValueError(f"unknown variant {variant!r} (eager-<prec>, graph-<prec> or none)")


def release_network(net: Any) -> None:
    """Undo a variant's head cast and a GraphedPredictor's trunk cast (restores float32 weights), drop its graphs."""
    if net is not None and hasattr(net, "set_head_precision"):
        net.set_head_precision("fp32")
    if net is not None and hasattr(net, "_graphs"):
        net.set_precision("fp32")
        for h in ("downstream_head1", "downstream_head2"):
            getattr(net.model, h).to(memory_format=torch.contiguous_format)
        net._graphs.clear()
        net._pool = None


def run_variant(args, variant: str, kb: str, model: Mast3rModel | None, oracle: BoxRoomOracle, images: list,
                stamps: list, dev: torch.device, n_frames: int, keyframe_every_frame: bool = False) -> dict:
    overrides = {"runtime.device": str(dev), "runtime.kernel_backend": kb, "runtime.sync_backend": False,
                 "use_calib": bool(args.calib)}
    if keyframe_every_frame:
        overrides["tracking.match_frac_thresh"] = 1.01  # min(match_frac, unique_frac) < 1.01 always
        overrides["runtime.max_keyframes"] = n_frames + 10
    cfg = load_config(None, overrides)
    pre = None if (oracle.W, oracle.H) == (512, 384) else native_preprocess
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    net = build_network(variant, model)
    hyb = HybridPredictor(net, oracle)
    graphed_gn = tracker_mod._graphed_gn_loop
    if variant.endswith("+eagergn"):  # A/B: the tracker's eager Gauss-Newton loop instead of the graphed one
        tracker_mod._graphed_gn_loop = lambda *a, **k: None
    K = oracle.K.double().cpu().numpy() if args.calib else None
    system = SlamSystem(hyb, cfg, K=K, preprocess=pre)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ---- FPS pass
    t_track = 0.0
    n_kf_work = 0
    states = defaultdict(int)
    iters: list[int] = []
    sync()
    t_start = None
    for i in range(n_frames):
        if i == args.warmup_frames:
            sync()
            t_start = time.perf_counter()
            t_track = 0.0
        hyb.next_index = i
        t0 = time.perf_counter()
        res = system.track(images[i], int(stamps[i]))
        t_track += time.perf_counter() - t0
        states[Mode(res.state).name] += 1
        lo = system.last_outcome
        if lo is not None and i >= args.warmup_frames:
            iters.append(lo.iterations)
        system.last_outcome = None
        n_kf_work += int(system.backend_step())
    sync()
    elapsed = time.perf_counter() - (t_start if t_start is not None else time.perf_counter())
    n_timed = n_frames - args.warmup_frames
    n_kf = len(system.keyframes())
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    backend = system.backend
    out = {"variant": variant, "kernel_backend": kernels.backend(), "frames": n_frames, "timed_frames": n_timed,
           "fps": n_timed / elapsed if elapsed > 0 else None, "frame_ms": 1e3 * elapsed / max(1, n_timed),
           "track_fps": n_timed / t_track if t_track > 0 else None, "keyframes": n_kf,
           "backend_steps_with_work": n_kf_work,
           "gn_iterations_mean": statistics.fmean(iters) if iters else None, "states": dict(states),
           "peak_mem_gib": peak,
           "loop_closures": getattr(backend, "loop_closures", None),
           "edges": int(len(backend.graph.ii)) if backend is not None and hasattr(backend.graph, "ii") else None}
    if hasattr(net, "stats"):
        st = net.stats
        out["graphs"] = {"captured": st.captured, "replays": st.replays, "eager": st.eager, "failed": st.failed}
    if keyframe_every_frame:  # --memory-keyframes: where the device bytes of the SLAM state are (issue 8)
        g = backend.graph if backend is not None else None
        out["memory_report"] = {
            "keyframe_store": system.store.memory_report(),
            "factor_graph": g.memory_report() if hasattr(g, "memory_report") else None,
            "last_solve_chunks": getattr(g, "last_solve_chunks", None),
            "current_mem_gib": torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    # trajectory error against the poses (the oracle is exact, so this checks the pipeline, not the network)
    try:
        out["ate_rmse_m"] = ate_rmse(system, oracle, stamps)
    except Exception as e:  # noqa: BLE001 - informative only
        out["ate_rmse_m"] = f"n/a ({type(e).__name__}: {e})"

    # ---- profiled pass (fresh system, synchronized stage timers)
    if args.profile_frames > 0 and not keyframe_every_frame:
        timer = StageTimer(dev)
        hyb2 = HybridPredictor(net, oracle, timer=timer)
        system2 = SlamSystem(hyb2, cfg, K=K, preprocess=pre)
        restore = install_profiling(timer, system2, net)
        try:
            for i in range(min(args.profile_frames, n_frames)):
                hyb2.next_index = i
                system2.track(images[i], int(stamps[i]) + 1)
                system2.backend_step()
                timer.next_frame()
        finally:
            restore()
        skip = min(args.warmup_frames, max(0, len(timer.frames) - 1))
        stages = timer.summary(skip=skip)
        out["stages"] = stages
        steps = [f.get("encode", 0.0) + f.get("decode", 0.0) for f in timer.frames[skip:]
                 if "encode" in f and "decode" in f]
        if steps:
            out["network_step_ms"] = statistics.median(steps)
            out["ratio_to_reference_step"] = out["network_step_ms"] / REFERENCE_STEP_MS
        bk = [f["backend_step"] for f in timer.frames[skip:] if f.get("backend_step", 0.0) > 1.0]
        out["backend_step_with_work_ms"] = statistics.median(bk) if bk else None
    release_network(net)
    tracker_mod._graphed_gn_loop = graphed_gn
    return out


def ate_rmse(system: SlamSystem, oracle: BoxRoomOracle, stamps: list) -> float:
    """RMSE (metres) of the camera centres after a Sim(3) Umeyama alignment to the ground truth."""
    traj = system.trajectory()
    idx = {int(s): k for k, s in enumerate(stamps)}
    est, gt = [], []
    Tgt = oracle.T.double().cpu().numpy()
    for s, T in traj:
        if s in idx:
            est.append(T.translation().reshape(-1).double().cpu().numpy())
            gt.append(Tgt[idx[s], :3, 3])
    A, B = np.asarray(est), np.asarray(gt)
    mu_a, mu_b = A.mean(0), B.mean(0)
    a, b = A - mu_a, B - mu_b
    U, S, Vt = np.linalg.svd(b.T @ a / len(A))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (a * a).sum(1).mean()
    err = B - (s * (R @ a.T).T + mu_b)
    return float(np.sqrt((err * err).sum(1).mean()))


# --------------------------------------------------------------------------------------------------- network step
def _median_ms(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_network_step(model: Mast3rModel, variants: list[str], hw: tuple[int, int], dev: torch.device,
                       repeats: int = 20) -> list[dict]:
    """Wall time (synchronized, median) of one tracking step's network work per variant: ``encode`` of the frame,
    ``decode`` of (frame, keyframe) with both heads and descriptors, and ``mono`` (head 1 without descriptors); plus
    the deviation of the tracking outputs from eager fp32 (max |dpts3d| / max |pts3d|, max |ddesc|)."""
    H, W = hw
    g = torch.Generator(device="cpu").manual_seed(0)
    img = (torch.rand(1, 3, H, W, generator=g) * 2 - 1).to(dev)
    img2 = torch.roll(img, W // 21, dims=-1)
    shape = torch.tensor([[H, W]], dtype=torch.int32)
    rows, ref = [], None
    for v in ["eager-fp32"] + [x for x in variants if x != "eager-fp32"]:
        net = build_network(v, model)
        with torch.inference_mode():
            fk, pk = net.encode(img2, shape)
            f1, p1 = net.encode(img, shape)
            r = {"variant": v,
                 "encode_ms": _median_ms(lambda: net.encode(img, shape), dev, 3, repeats),
                 "decode_ms": _median_ms(lambda: net.decode(f1, p1, fk, pk, shape), dev, 3, repeats),
                 "mono_ms": _median_ms(lambda: net.decode(f1, p1, f1, p1, shape, need_res2=False, need_desc=False),
                                       dev, 3, repeats)}
            r["step_ms"] = r["encode_ms"] + r["decode_ms"]
            r["ratio_to_reference_step"] = r["step_ms"] / REFERENCE_STEP_MS
            a, b = net.decode(f1, p1, fk, pk, shape)
            outs = [t.float() for t in (a.pts3d, b.pts3d, a.desc, b.desc)]
        if ref is None:
            ref = outs
        r["rel_err_pts3d"] = max(float((o - q).abs().max() / q.abs().max()) for o, q in zip(outs[:2], ref[:2]))
        r["max_err_desc"] = max(float((o - q).abs().max()) for o, q in zip(outs[2:], ref[2:]))
        if dev.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if hasattr(net, "stats"):
            r["graphs_captured"] = net.stats.captured
            r["graphs_failed"] = net.stats.failed
        rows.append(r)
        print(json.dumps(r), flush=True)
        release_network(net)
    return rows


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", default="full", choices=("full", "tiny"))
    ap.add_argument("--size", default="512x384", help="W x H of the images (512x384 uses preprocess_image)")
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--warmup-frames", type=int, default=10)
    ap.add_argument("--profile-frames", type=int, default=120)
    ap.add_argument("--variants", default="eager-tf32,graph-tf32+cl+ph,graph-bf16+cl+ph",
                    help="comma list of eager-<prec>, graph-<prec> (prec fp32/tf32/bf16/fp16) or none; suffix "
                    "'+eagergn' runs the tracker's eager Gauss-Newton loop (A/B of its CUDA graph), '+cl' "
                    "channels-last heads, '+ph' parallel heads, '+ds' decoder branches on two streams, '+bh'/'+fh' "
                    "bf16/fp16 DPT heads")
    ap.add_argument("--kernel-backends", default="auto",
                    help="comma list of auto/cuda/torch; every variant is run with every kernel backend")
    ap.add_argument("--memory-keyframes", type=int, default=0,
                    help="also run this many frames with every frame a keyframe (last variant), report memory")
    ap.add_argument("--calib", action="store_true", help="use_calib=True (pixel + log-depth residuals)")
    ap.add_argument("--network-only", action="store_true",
                    help="only time the network part of one tracking step per variant (no SLAM run)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    W, H = (int(v) for v in args.size.lower().split("x"))
    from mast3r_slam_ros.testing.scenes import intrinsics_for, sequence_poses

    n_max = max(args.frames, args.memory_keyframes)
    poses = sequence_poses("loop", args.frames)
    K = intrinsics_for((W, H))
    oracle = BoxRoomOracle(poses, K, (H, W), dev)
    images = [oracle.colors(i) for i in range(args.frames)]
    stamps = [1_700_000_000 * 10**9 + i * 33_333_333 for i in range(n_max)]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    model = None
    if any(v != "none" for v in variants):
        cfg = Mast3rConfig.full() if args.config == "full" else Mast3rConfig.tiny()
        with torch.device(dev):
            model = Mast3rModel(cfg)
        model.eval()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    if args.network_only:
        rows = bench_network_step(model, variants, (H, W), dev)
        print(f"\nnetwork step on {name}, MASt3R {args.config}, {W}x{H}, median of 20 (ms, synchronized wall time)")
        print(f"{'variant':<14}{'encode':>9}{'decode':>9}{'step':>9}{'x ref':>7}{'mono':>9}{'rel err X':>11}"
              f"{'err desc':>10}")
        for r in rows:
            print(f"{r['variant']:<14}{r['encode_ms']:>9.2f}{r['decode_ms']:>9.2f}{r['step_ms']:>9.2f}"
                  f"{r['ratio_to_reference_step']:>7.2f}{r['mono_ms']:>9.2f}{r['rel_err_pts3d']:>11.2e}"
                  f"{r['max_err_desc']:>10.2e}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "size": [W, H],
                                             "network_step": rows}, indent=1), encoding="utf-8")
        return 0
    results = []
    for kb in [k.strip() for k in args.kernel_backends.split(",") if k.strip()]:
        for v in variants:
            r = run_variant(args, v, kb, model, oracle, images, stamps, dev, args.frames)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("variant", "kernel_backend", "fps", "track_fps", "keyframes",
                                                "peak_mem_gib", "network_step_ms", "states") if k in r}),
                  flush=True)
    mem = None
    if args.memory_keyframes > 0:
        mposes = sequence_poses("loop", args.memory_keyframes)
        moracle = BoxRoomOracle(mposes, K, (H, W), dev)
        mimages = [moracle.colors(i) for i in range(args.memory_keyframes)]
        mem = run_variant(args, variants[-1], "auto", model, moracle, mimages, stamps, dev, args.memory_keyframes,
                          keyframe_every_frame=True)
        print(json.dumps({k: mem[k] for k in ("variant", "keyframes", "peak_mem_gib", "fps")}), flush=True)
        mr = mem.get("memory_report") or {}
        ks, fgr = mr.get("keyframe_store") or {}, mr.get("factor_graph") or {}
        print(json.dumps({"per_keyframe_bytes": ks.get("per_keyframe"), "keyframe_bytes_by_field": ks.get("by_field"),
                          "per_edge_bytes": fgr.get("per_edge"), "edges": fgr.get("edges"),
                          "graph_total_bytes": fgr.get("total"), "solve_chunks": mr.get("last_solve_chunks"),
                          "current_mem_gib": mr.get("current_mem_gib")}), flush=True)

    # ---- table
    print(f"\nSlamSystem pipeline on {name} ({dev.type}), {W}x{H}, {args.frames} frames "
          f"(timed after {args.warmup_frames}), MASt3R {args.config} + exact GPU oracle outputs")
    cols = ["preprocess", "encode", "decode", "decoder", "heads", "oracle", "match", "iter_proj", "refine",
            "tracking_solve", "fusion", "track_total"]
    print(f"{'variant':<14}{'kernels':>8}{'FPS':>8}{'trackFPS':>9}{'net ms':>8}{'x ref':>7}{'KF':>5}{'GiB':>7}  "
          + " ".join(f"{c[:10]:>10}" for c in cols) + f"{'backend*':>10}")
    for r in results:
        st = r.get("stages", {})
        cells = " ".join(f"{st[c]['median_ms']:>10.2f}" if c in st else f"{'-':>10}" for c in cols)
        bk = r.get("backend_step_with_work_ms")
        print(f"{r['variant']:<14}{r['kernel_backend']:>8}{r['fps']:>8.1f}{r['track_fps']:>9.1f}"
              f"{r.get('network_step_ms', float('nan')):>8.2f}{r.get('ratio_to_reference_step', float('nan')):>7.2f}"
              f"{r['keyframes']:>5}{(r['peak_mem_gib'] or float('nan')):>7.2f}  {cells}"
              f"{(bk if bk is not None else float('nan')):>10.1f}")
    print("stage columns: median ms per frame of the profiled pass; backend*: median of backend steps that did work")
    if mem:
        print(f"memory run: {mem['keyframes']} keyframes ({mem['variant']}), peak {mem['peak_mem_gib']} GiB, "
              f"{mem['fps']:.1f} FPS")
    if args.json:
        payload = {"device": name, "device_type": dev.type, "torch": torch.__version__, "size": [W, H],
                   "config": args.config, "frames": args.frames, "warmup_frames": args.warmup_frames,
                   "profile_frames": args.profile_frames, "reference_step_ms": REFERENCE_STEP_MS,
                   "results": results, "memory_run": mem, "argv": sys.argv[1:]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
