"""CUDA-graph replay of MASt3R ``encode`` / ``decode`` for fixed shapes, with an eager fallback.

Why: at 512x384 (768 tokens) one tracking step of ViT-L + 2x ViT-B + two DPT heads is about 0.6 TFLOP, i.e. a few ms
of tensor-core math on an H100/H200, but the eager step launches thousands of small kernels from Python and is bound by
launch and dispatch overhead (bf16 was measured *slower* than TF32 eagerly, ``docs/perf_logs``). A CUDA graph records
the kernels of one call once and replays them with one launch (PyTorch ``torch.cuda.CUDAGraph``; NVIDIA CUDA
Programming Guide, "CUDA Graphs").

:class:`GraphedPredictor` wraps a :class:`~mast3r_slam_ros.network.model.Mast3rModel` and implements the same Predictor
API (``encode`` / ``decode`` of ``docs/interfaces.md``, including ``need_res2`` / ``need_desc``). Per input signature
(batch, image or token shape, flags, precision) it captures one graph lazily on the first call; later calls copy the
inputs into the graph's static buffers, replay, and return **clones** of the outputs (the caller owns them, as with the
eager model). Signatures beyond ``max_graphs`` and batch sizes not in ``graph_batches`` run eagerly.

Fallback: graphs are used only for CUDA inputs when ``torch.cuda.is_available()``, ``enabled`` is not False and the
environment variable ``MAST3R_SLAM_ROS_CUDA_GRAPHS`` is not ``0``; a capture that raises (old driver, an op that
cannot be captured, ...) is logged once and that signature runs eagerly from then on. Results equal the eager model's
(same kernels; tests compare them).

bf16/fp16: with ``cast_trunk`` (default) the Linear/Conv weights of the encoder and decoders are stored in the autocast
dtype once, so no weight cast runs per call. Autocast casts those weights to the same dtype anyway, so the results are
bit-identical to the autocast path with float32 weights; LayerNorms, RoPE tables (float32 angles) and the heads stay
float32. Switching such a wrapper back to fp32/tf32 restores float32 weights from a CPU copy kept at cast time.

Reduced-precision heads (``head_precision="bf16" | "fp16"``, ``runtime.head_precision``): the DPT convolutions and the
local-feature MLP of both heads run in that dtype (weights stored once, channels-last), the final output convs and
the post-processing stay float32 (``Mast3rModel.set_head_precision``). Not bit-identical to float32 heads; the
deviation is measured by ``test/test_head_precision.py`` and ``bench/network.py``.

Decoder streams (``decoder_streams``, default on): inside a captured decode the two decoder branches run on two
streams with one join per layer (``Mast3rModel.decoder_tokens(side_stream=...)``); same kernels, same values.

Concurrency: a lock serializes copy-in, replay and clone-out, so two executor threads (``executor: multi_threaded``)
may share one wrapper. No thread is started here.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .heads import HeadOutput
from .precision import autocast_dtype, check_head_precision, check_precision

log = logging.getLogger(__name__)

#: environment switch: "0" disables graph capture everywhere (eager fallback)
ENV_SWITCH = "MAST3R_SLAM_ROS_CUDA_GRAPHS"

#: trunk sub-modules of Mast3rModel whose Linear/Conv weights run under autocast
TRUNK_MODULES = ("patch_embed", "enc_blocks", "decoder_embed", "dec_blocks", "dec_blocks2")


def graphs_available(device: torch.device | str | None = None) -> bool:
    """True if CUDA graphs can be used for tensors on ``device`` (a CUDA device, CUDA available, not disabled by
    ``MAST3R_SLAM_ROS_CUDA_GRAPHS=0``)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    if not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def cast_trunk_(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the Linear/Conv2d parameters of the encoder/decoder trunk of ``model`` to ``dtype`` in place.

    LayerNorms and the heads are left untouched. Returns the number of parameters cast.
    Raises: ValueError if ``model`` lacks the trunk modules of :class:`Mast3rModel`.
    """
    n = 0
    for name in TRUNK_MODULES:
        mod = getattr(model, name, None)
        if mod is None:
            raise ValueError(f"model has no trunk module {name!r}; cast_trunk_ needs a Mast3rModel")
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                for p in m.parameters(recurse=False):
                    if p.dtype != dtype:
                        p.data = p.data.to(dtype)
                        n += p.numel()
    return n


@dataclass
class _Graph:
    graph: Any
    inputs: list[Tensor]
    outputs: Any
    calls: int = 0


@dataclass
class GraphStats:
    """Counters: ``captured`` graphs, ``replays``, ``eager`` calls, ``failed`` signatures (capture raised)."""

    captured: int = 0
    replays: int = 0
    eager: int = 0
    failed: list = field(default_factory=list)


def _clone_out(out: Any) -> Any:
    if out is None:
        return None
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, HeadOutput):
        return HeadOutput(*(None if t is None else t.clone() for t in (out.pts3d, out.conf, out.desc, out.desc_conf)))
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_out(o) for o in out)
    raise TypeError(f"cannot clone graph output of type {type(out).__name__}")


class GraphedPredictor:
    """Predictor that replays CUDA graphs of a MASt3R model's ``encode``/``decode`` (see the module docstring).

    Args:
        model: the :class:`~mast3r_slam_ros.network.model.Mast3rModel` (its ``precision`` is used; eval mode).
        enabled: None = automatic (:func:`graphs_available` for the model's device), False = always eager,
            True = like None (graphs when available).
        graph_batches: decoder batch sizes that get graphs (default ``(1, 2)``: tracking and mono decode one pair,
            the backend's symmetric decodes are split into batches of :attr:`max_decode_batch` = ``max(graph_batches)``
            by ``network.inference.symmetric_batch``, so they replay a graph too instead of running eagerly with a
            batch-size-dependent activation peak).
        max_graphs: at most this many captured signatures (each holds its static buffers).
        cast_trunk: for bf16/fp16, store the trunk Linear/Conv weights in that dtype (see module docstring).
        warmup: eager runs on a side stream before each capture (cuBLAS/cuDNN workspace and algorithm selection).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` during warm-up and capture (restored after). Off by
            default: on an H200 it did not speed up the step (13.24 ms both ways) and raised the peak memory of a
            SLAM run from 2.8 to 34.5 GiB (benchmark workspaces kept in the graph pool), see docs/performance.md.
        heads_channels_last: store the DPT head convolution weights channels-last (NHWC) in place, so cuDNN runs the
            float32/TF32 head convolutions without layout transposes (values unchanged; H200: decode 9.82 -> 8.90 ms).
        parallel_heads: in captured decodes run head 2 on a second CUDA stream next to head 1 (the graph keeps the
            fork/join); same kernels and values, the two heads only overlap on the GPU.
        head_precision: ``"fp32" | "bf16" | "fp16"`` for the heads' convolutions and MLP
            (``Mast3rModel.set_head_precision``); None keeps the model's current setting.
        decoder_streams: in captured decodes run decoder branch 2 on a second CUDA stream, joined once per layer
            (same kernels and values as the sequential decoder).

    Raises:
        TypeError: ``model`` lacks ``encode``/``decode``.
        ValueError: unknown ``head_precision``, or a reduced one for a model without ``set_head_precision``.
    """

    supports_partial_decode = True
    supports_batched_decode = True

    def __init__(self, model: Any, enabled: bool | None = None, graph_batches: Sequence[int] = (1, 2),
                 max_graphs: int = 8, cast_trunk: bool = True, warmup: int = 2, cudnn_benchmark: bool = False,
                 heads_channels_last: bool = True, parallel_heads: bool = True, head_precision: str | None = None,
                 decoder_streams: bool = True) -> None:
        if not (hasattr(model, "encode") and hasattr(model, "decode")):
            raise TypeError(f"model must have encode/decode, got {type(model).__name__}")
        self.model = model
        self.enabled = enabled is not False
        self.graph_batches = tuple(int(b) for b in graph_batches)
        self.max_graphs = int(max_graphs)
        self.cast_trunk = bool(cast_trunk)
        self.warmup = int(warmup)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.heads_channels_last = bool(heads_channels_last)
        self.parallel_heads = bool(parallel_heads)
        self.decoder_streams = bool(decoder_streams)
        self._head_stream = None
        self._decoder_stream = None
        if self.heads_channels_last:
            for h in ("downstream_head1", "downstream_head2"):
                if hasattr(model, h):
                    getattr(model, h).to(memory_format=torch.channels_last)
        self.stats = GraphStats()
        self._graphs: dict[tuple, _Graph] = {}
        self._failed: set[tuple] = set()
        self._pool = None
        self._lock = threading.Lock()
        self._fp32_trunk: dict[str, Tensor] | None = None
        self._apply_trunk_dtype(getattr(model, "precision", "fp32"))
        if head_precision is not None:
            self._apply_head_precision(head_precision)

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally: retrieval_features, retrieval_codebook, config, device, ...
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def precision(self) -> str:
        return self.model.precision

    @property
    def head_precision(self) -> str:
        return getattr(self.model, "head_precision", "fp32")

    def set_head_precision(self, head_precision: str) -> None:
        """Switch the heads' compute precision (``"fp32" | "bf16" | "fp16"``); drops the captured graphs."""
        with self._lock:
            self._graphs.clear()
            self._failed.clear()
            self._apply_head_precision(head_precision)

    def _apply_head_precision(self, head_precision: str) -> None:
        p = check_head_precision(head_precision)
        if not hasattr(self.model, "set_head_precision"):
            if p != "fp32":
                raise ValueError(f"head_precision={p!r} needs a model with set_head_precision (a Mast3rModel)")
            return
        self.model.set_head_precision(p)

    def set_precision(self, precision: str) -> None:
        """Switch the model's precision; drops captured graphs and re-casts the trunk weights if needed."""
        p = check_precision(precision)
        with self._lock:
            self._graphs.clear()
            self._failed.clear()
            self.model.set_precision(p)
            self._apply_trunk_dtype(p)

    def _apply_trunk_dtype(self, precision: str) -> None:
        if not self.cast_trunk or not all(hasattr(self.model, n) for n in TRUNK_MODULES):
            return
        dtype = autocast_dtype(precision)
        if dtype is not None:
            if self._fp32_trunk is None:
                self._fp32_trunk = {k: v.detach().to("cpu", copy=True) for k, v in self._trunk_params().items()
                                    if v.dtype == torch.float32}
            cast_trunk_(self.model, dtype)
        elif self._fp32_trunk is not None:
            for k, p in self._trunk_params().items():
                if k in self._fp32_trunk:
                    p.data = self._fp32_trunk[k].to(p.device)
            self._fp32_trunk = None

    def _trunk_params(self) -> dict[str, Tensor]:
        out = {}
        for name in TRUNK_MODULES:
            for m_name, m in getattr(self.model, name).named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    for p_name, p in m.named_parameters(recurse=False):
                        out[f"{name}.{m_name}.{p_name}"] = p
        return out

    # ------------------------------------------------------------------ graph machinery
    def _use_graph(self, key: tuple, tensors: Sequence[Tensor]) -> bool:
        if not self.enabled or key in self._failed:
            return False
        if autocast_dtype(self.model.precision) is not None and self._fp32_trunk is None:
            return False  # autocast's weight-cast cache must not live inside a capture (torch.cuda.graph docs)
        if not all(t.is_cuda for t in tensors) or not graphs_available(tensors[0].device):
            return False
        return key in self._graphs or len(self._graphs) < self.max_graphs

    def _run(self, key: tuple, fn: Callable[..., Any], inputs: list[Tensor]) -> Any:
        """Replay (capturing first if needed) the graph of ``fn(*static_inputs)`` for ``key``; eager on failure."""
        with self._lock:
            g = self._graphs.get(key)
            if g is None:
                try:
                    g = self._capture(fn, inputs)
                except Exception as e:  # noqa: BLE001 - any capture error -> eager fallback for this signature
                    self._failed.add(key)
                    self.stats.failed.append(str(key))
                    log.warning("CUDA graph capture failed for %s (%s: %s); running eagerly", key,
                                type(e).__name__, e)
                    torch.cuda.synchronize()
                    self.stats.eager += 1
                    return fn(*inputs)
                self._graphs[key] = g
                self.stats.captured += 1
            for dst, src in zip(g.inputs, inputs):
                dst.copy_(src, non_blocking=True)
            g.graph.replay()
            g.calls += 1
            self.stats.replays += 1
            return _clone_out(g.outputs)

    def _capture(self, fn: Callable[..., Any], inputs: list[Tensor]) -> _Graph:
        with torch.inference_mode(False):  # normal tensors: copy_ works inside and outside inference mode
            static = [t.detach().clone() for t in inputs]
        bench_flag = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark  # fixed shapes: let cuDNN time its conv algorithms
        try:
            return self._capture_static(fn, static)
        finally:
            torch.backends.cudnn.benchmark = bench_flag

    def _capture_static(self, fn: Callable[..., Any], static: list[Tensor]) -> _Graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # one shared pool: graphs are replayed one at a time (lock) and outputs are cloned right after each replay
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*static)
        return _Graph(graph, static, outputs)

    @property
    def max_decode_batch(self) -> int | None:
        """Largest graphed decoder batch (callers with many pairs split their decodes into batches of this size);
        None when graphs are off (then one eager batch is fastest)."""
        return max(self.graph_batches) if self.enabled and self.graph_batches else None

    # ------------------------------------------------------------------ Predictor API
    def encode(self, img: Tensor, true_shape: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Same contract as ``Mast3rModel.encode``: ``img [B,3,H,W]`` f32 in [-1,1] -> ``feat [B,P,Ce]`` f32,
        ``pos [B,P,2]`` int64 (fresh tensors owned by the caller)."""
        if not isinstance(img, Tensor) or img.ndim != 4:
            return self.model.encode(img, true_shape)  # the model raises the documented error
        img = img.to(self.model.device, torch.float32)
        key = ("encode", tuple(img.shape), self.model.precision)
        if not self._use_graph(key, [img]):
            self.stats.eager += 1
            return self.model.encode(img, true_shape)
        return self._run(key, lambda x: self.model.encode(x), [img])

    def decode(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor, true_shape: Tensor | Sequence[int],
               *, need_res2: bool = True, need_desc: bool | tuple[bool, bool] = True
               ) -> tuple[HeadOutput, HeadOutput | None]:
        """Same contract as ``Mast3rModel.decode`` (``need_res2`` / ``need_desc`` included)."""
        kw = dict(need_res2=need_res2, need_desc=need_desc)
        tensors = [feat1, pos1, feat2, pos2]
        if not all(isinstance(t, Tensor) and t.ndim == 3 for t in tensors) or feat1.shape[0] not in self.graph_batches:
            self.stats.eager += 1
            return self.model.decode(feat1, pos1, feat2, pos2, true_shape, **kw)
        from .model import _shape_hw

        hw = _shape_hw(true_shape)
        nd = (need_desc, need_desc) if isinstance(need_desc, bool) else tuple(bool(v) for v in need_desc)
        key = ("decode", tuple(feat1.shape), tuple(feat2.shape), str(feat1.dtype), hw, bool(need_res2), nd,
               self.model.precision, self.head_precision)
        if not self._use_graph(key, tensors):
            self.stats.eager += 1
            return self.model.decode(feat1, pos1, feat2, pos2, true_shape, **kw)
        split = all(hasattr(self.model, n) for n in ("decoder_tokens", "downstream_head1", "downstream_head2"))
        par_heads = self.parallel_heads and need_res2 and split
        dec_streams = self.decoder_streams and split
        if par_heads or dec_streams:
            fn = lambda f1, p1, f2, p2: self._decode_streams(f1, p1, f2, p2, hw, nd, need_res2,  # noqa: E731
                                                             par_heads, dec_streams)
        else:
            fn = lambda f1, p1, f2, p2: self.model.decode(f1, p1, f2, p2, hw, **kw)  # noqa: E731
        return self._run(key + (par_heads, dec_streams), fn, tensors)

    def _decode_streams(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor, hw: tuple[int, int],
                        nd: tuple[bool, bool], need_res2: bool, parallel_heads: bool, decoder_streams: bool
                        ) -> tuple[HeadOutput, HeadOutput | None]:
        """``Mast3rModel.decode`` with decoder branch 2 (``decoder_streams``) and/or head 2 (``parallel_heads``) on
        side streams; the same kernels as the sequential decode. CUDA tensors only (used under graph capture)."""
        from .precision import precision_context

        m = self.model
        dev = feat1.device.type
        if self._head_stream is None:
            self._head_stream = torch.cuda.Stream(device=feat1.device)
        if self._decoder_stream is None:
            self._decoder_stream = torch.cuda.Stream(device=feat1.device)
        main, side = torch.cuda.current_stream(feat1.device), self._head_stream
        with torch.no_grad():
            with precision_context(m.precision, dev, "trunk"):
                dec1, dec2 = m.decoder_tokens(feat1, pos1, feat2, pos2,
                                              side_stream=self._decoder_stream if decoder_streams else None)
            with precision_context(m.precision, dev, "head"):
                res2 = None
                if parallel_heads:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        res2 = m.downstream_head2([t.float() for t in dec2], hw, need_desc=nd[1])
                res1 = m.downstream_head1([t.float() for t in dec1], hw, need_desc=nd[0])
                if parallel_heads:
                    main.wait_stream(side)
                elif need_res2:
                    res2 = m.downstream_head2([t.float() for t in dec2], hw, need_desc=nd[1])
        return res1, res2

    def forward(self, img1: Tensor, img2: Tensor, true_shape: Tensor | Sequence[int] | None = None):
        """Pair inference through the graphed ``encode``/``decode``."""
        f1, p1 = self.encode(img1)
        f2, p2 = self.encode(img2)
        shape = true_shape if true_shape is not None else tuple(img1.shape[-2:])
        return self.decode(f1, p1, f2, p2, shape)

    __call__ = forward


class GraphedFunction:
    """A pure tensor function replayed from a CUDA graph: ``out = f(*inputs)`` for one fixed input signature.

    Used for the fixed-shape inner loops of SLAM (one Gauss–Newton linearization of the tracker: thousands of small
    kernels per iteration whose launch cost dominates). ``__call__`` copies the inputs into static buffers, replays
    and returns the graph's **static** outputs: consume (e.g. ``.cpu()``) or clone them before the next call.

    Args:
        fn: function of tensors only, no host synchronization inside (capture would fail).
        inputs: example inputs (CUDA tensors) defining the signature.
        warmup: eager runs on a side stream before capture.

    Raises:
        RuntimeError: capture failed (the caller falls back to eager; see :func:`graphed_function`).
    """

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[Tensor], warmup: int = 2) -> None:
        with torch.inference_mode(False):
            self.inputs = [t.detach().clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)
        self._lock = threading.Lock()

    def __call__(self, *inputs: Tensor) -> Any:
        with self._lock:
            for dst, src in zip(self.inputs, inputs):
                if src is not dst:
                    dst.copy_(src, non_blocking=True)
            self.graph.replay()
            return self.outputs


_FUNCTION_GRAPHS: dict[tuple, GraphedFunction | None] = {}


def graphed_function(key: tuple, fn: Callable[..., Any], inputs: Sequence[Tensor], max_entries: int = 8
                     ) -> GraphedFunction | None:
    """Cached :class:`GraphedFunction` for ``key`` + the inputs' shapes/dtypes/device, or None when CUDA graphs are
    unavailable (CPU tensors, no CUDA, ``MAST3R_SLAM_ROS_CUDA_GRAPHS=0``) or the capture failed (logged once; that
    signature then stays eager)."""
    if not inputs or not all(isinstance(t, Tensor) and t.is_cuda for t in inputs) \
            or not graphs_available(inputs[0].device):
        return None
    full = (key, tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs))
    if full in _FUNCTION_GRAPHS:
        return _FUNCTION_GRAPHS[full]
    if sum(v is not None for v in _FUNCTION_GRAPHS.values()) >= max_entries:
        return None
    try:
        g: GraphedFunction | None = GraphedFunction(fn, inputs)
    except Exception as e:  # noqa: BLE001 - eager fallback
        log.warning("CUDA graph capture of %s failed (%s: %s); running eagerly", key, type(e).__name__, e)
        torch.cuda.synchronize()
        g = None
    _FUNCTION_GRAPHS[full] = g
    return g


def load_predictor(path_or_repo_id: str | None = None, device: str | torch.device = "cuda", precision: str = "fp32",
                   cuda_graphs: bool = True, head_precision: str = "fp32") -> Any:
    """Load MASt3R (:func:`~mast3r_slam_ros.network.loader.load_model`) and wrap it for SLAM inference.

    On a CUDA device with graphs available (:func:`graphs_available`) and ``cuda_graphs`` true, returns a
    :class:`GraphedPredictor` (replayed encode/decode, see docs/performance.md); otherwise the eager model. Both
    implement the Predictor API of docs/interfaces.md, so callers do not need to know which one they got.
    ``head_precision`` (``"fp32" | "bf16" | "fp16"``) is applied to both (``Mast3rModel.set_head_precision``).

    Raises:
        FileNotFoundError / ValueError: from ``load_model`` (missing file, offline download, wrong architecture);
        ValueError for an unknown ``head_precision`` (checked before loading).
    """
    from .loader import DEFAULT_REPO_ID, load_model

    hp = check_head_precision(head_precision)
    model = load_model(path_or_repo_id or DEFAULT_REPO_ID, device=device, precision=precision)
    if cuda_graphs and graphs_available(device):
        return GraphedPredictor(model, head_precision=hp)
    model.set_head_precision(hp)
    return model
