"""Keyframe storage that grows on demand (no fixed 512-slot buffer) with a configurable cap.

Replaces upstream ``frame.py:SharedKeyframes`` (spec ``upstream_algorithm.md`` §1.7), which preallocated ~4 GiB for
512 keyframes in CUDA-IPC shared memory and failed with an index error beyond that. Here every keyframe is a
:class:`~mast3r_slam_ros.slam.frame.Frame` whose tensors live on the SLAM device; memory grows with the number of
keyframes up to ``max_keyframes`` (``runtime.max_keyframes``), after which :class:`KeyframeCapacityError` is raised.

Memory (issue 8): a keyframe holds ``X_canon [HW,3]`` f32, ``C [HW,1]`` f32, the encoder tokens ``feat [1,P,C]``
and ``pos``; the normalized image ``img`` is released when the keyframe is added (or compacted) once encoded — its only
reader is encoding (``network.inference.ensure_encoded``), colours stay in the CPU ``uimg``. With ``feat_dtype``
(:func:`feat_storage_dtype`: the network trunk's dtype, bfloat16 for a bf16 trunk — the decoder casts the tokens to it
on entry anyway) the tokens are stored in that dtype by :meth:`KeyframeStore.compact` (the backend calls it after the
retrieval database has read the float32 tokens).
Per keyframe at 512x384 that is 2.36 + 0.79 + 1.57 (bf16 feat; 3.15 f32) + 0.01 MB = 4.7 MB (6.3 MB with f32 feat)
instead of 8.7 MB; :meth:`KeyframeStore.memory_report` accounts for every byte.

Token window (``feat_window``, default 8): only the newest ``feat_window`` keyframes keep their tokens on the device
(tracking decodes against the newest keyframe, the consecutive backend edges use the last two); :meth:`compact` moves the
tokens of older keyframes to pinned host memory (:meth:`Frame.offload_feat`) and every reader (``FactorGraph.match``,
relocalization, the backend, ``network.inference.ensure_encoded``) copies them back non-blocking when a retrieval edge
needs them. That leaves 3.16 MB per keyframe on the device (1.57 MB less with bf16 tokens, 3.15 MB less with f32).

Threading: the core starts no thread. ``lock`` is a re-entrant lock that the ROS layer's multi-threaded executor uses to
serialize the frontend and the backend callbacks; every method below takes it, so callers that need several calls to
be atomic hold ``with store.lock:`` around them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.frame import Frame


def feat_storage_dtype(predictor) -> torch.dtype:
    """Storage dtype for keyframe encoder tokens: the network trunk's compute dtype.

    A Mast3rModel (or a wrapper with ``.model``) with ``precision`` ``"bf16"``/``"fp16"`` runs the decoder under
    autocast, whose first op on the tokens (``decoder_embed``) casts them to that dtype anyway, and with a bf16/fp16
    ``head_precision`` the heads cast their inputs to it too — then storing the tokens rounded changes no decode at
    all. With float32 heads the heads' layer-0 input (the encoder tokens themselves) is rounded to bf16 (relative
    2^-9, far below the bf16 trunk's own error), so decodes are not bitwise equal: the GPU accuracy run checks it.
    Anything else (fp32/tf32 trunk, the oracle, unknown predictors) -> ``torch.float32`` (keep).
    """
    m = getattr(predictor, "model", predictor)
    trunk = getattr(m, "precision", None)
    if trunk == "bf16":
        return torch.bfloat16
    if trunk == "fp16":
        return torch.float16
    return torch.float32


#: Frame fields that live on the host by design (not counted in the device memory)
_HOST_FIELDS = ("uimg", "true_shape")


class KeyframeCapacityError(RuntimeError):
    """Raised when appending a keyframe beyond ``runtime.max_keyframes``."""


class KeyframeStore:
    """Growable list of keyframes (spec §1.7 semantics, without the fixed buffer).

    Args:
        max_keyframes: cap on the number of keyframes (``runtime.max_keyframes``, default 2000); must be >= 1.
        feat_dtype: storage dtype of keyframe encoder tokens applied by :meth:`compact`; None = not decided yet (the
            Backend sets :func:`feat_storage_dtype` of its predictor; until then tokens are kept as they are),
            ``torch.float32`` = keep float32.
        keep_images: keep the normalized image ``img`` of keyframes (default False: released once encoded).
        feat_window: number of newest keyframes whose encoder tokens stay on the device (default 8, >= 2); older ones
            are moved to pinned host memory by :meth:`compact`. None keeps every keyframe's tokens on the device.
    Attributes:
        lock: ``threading.RLock`` guarding the store for multi-threaded ROS executors.
        version: int, bumped whenever keyframes are added/removed or poses/pointmaps change.
    """

    def __init__(self, max_keyframes: int = 2000, *, feat_dtype: torch.dtype | None = None, keep_images: bool = False,
                 feat_window: int | None = 8):
        if int(max_keyframes) < 1:
            raise ValueError(f"max_keyframes must be >= 1, got {max_keyframes}")
        if feat_dtype is not None and not (isinstance(feat_dtype, torch.dtype) and feat_dtype.is_floating_point):
            raise ValueError(f"feat_dtype must be a floating torch.dtype or None, got {feat_dtype!r}")
        if feat_window is not None and int(feat_window) < 2:
            raise ValueError(f"feat_window must be >= 2 (tracking and the consecutive edge) or None, got {feat_window}")
        self.max_keyframes = int(max_keyframes)
        self.feat_window = None if feat_window is None else int(feat_window)
        self.feat_dtype = feat_dtype
        self.keep_images = bool(keep_images)
        self.lock = threading.RLock()
        self._frames: list[Frame] = []
        self._dirty: set[int] = set()
        self.version = 0

    # -------------------------------------------------------------------------------------------------- container
    def __len__(self) -> int:
        with self.lock:
            return len(self._frames)

    def __iter__(self) -> Iterator[Frame]:
        with self.lock:
            return iter(list(self._frames))

    def _check(self, idx: int) -> int:
        n = len(self._frames)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"keyframe index {idx} out of range (store holds {n} keyframes)")
        return i

    def __getitem__(self, idx: int) -> Frame:
        """The keyframe ``idx`` (the object itself; in-place updates are visible to the store)."""
        with self.lock:
            return self._frames[self._check(idx)]

    def __setitem__(self, idx: int, frame: Frame) -> None:
        """Replace keyframe ``idx`` and mark it dirty."""
        if not isinstance(frame, Frame):
            raise TypeError(f"expected a Frame, got {type(frame).__name__}")
        with self.lock:
            i = self._check(idx)
            self._frames[i] = frame
            self.mark_dirty(i)

    def append(self, frame: Frame) -> int:
        """Add a keyframe (it must already have a pointmap); returns its index.

        Raises: TypeError for a non-Frame, ValueError for a frame without ``X_canon``, KeyframeCapacityError at the cap.
        """
        if not isinstance(frame, Frame):
            raise TypeError(f"expected a Frame, got {type(frame).__name__}")
        if frame.X_canon is None or frame.C is None:
            raise ValueError(f"frame {frame.frame_id} has no pointmap; call update_pointmap before adding it")
        with self.lock:
            if len(self._frames) >= self.max_keyframes:
                raise KeyframeCapacityError(
                    f"keyframe store is full ({self.max_keyframes} keyframes, runtime.max_keyframes); raise the cap "
                    "or reduce the keyframe rate (tracking.match_frac_thresh / dataset.subsample)")
            if self._frames and frame.X_canon.shape != self._frames[0].X_canon.shape:
                raise ValueError(f"keyframe pointmap shape {tuple(frame.X_canon.shape)} differs from the store's "
                                 f"{tuple(self._frames[0].X_canon.shape)}")
            self._frames.append(frame)
            idx = len(self._frames) - 1
            if not self.keep_images:
                frame.release_image()
            self.mark_dirty(idx)
            return idx

    def pop_last(self) -> Frame:
        """Remove and return the last keyframe (failed relocalization). Raises IndexError if empty."""
        with self.lock:
            if not self._frames:
                raise IndexError("pop_last on an empty keyframe store")
            f = self._frames.pop()
            self._dirty.discard(len(self._frames))
            self.version += 1
            return f

    def last(self) -> Frame:
        """The most recent keyframe. Raises IndexError if empty."""
        with self.lock:
            if not self._frames:
                raise IndexError("no keyframes yet")
            return self._frames[-1]

    last_keyframe = last

    def clear(self) -> None:
        """Remove all keyframes."""
        with self.lock:
            self._frames.clear()
            self._dirty.clear()
            self.version += 1

    # ------------------------------------------------------------------------------------------------ batch access
    def _indices(self, idx: Sequence[int] | Tensor | None) -> list[int]:
        if idx is None:
            return list(range(len(self._frames)))
        if isinstance(idx, Tensor):
            idx = idx.reshape(-1).tolist()
        return [self._check(i) for i in idx]

    def stack_poses(self, idx: Sequence[int] | Tensor | None = None) -> Sim3:
        """Poses ``T_WC`` of keyframes ``idx`` (all if None) as ``Sim3 [n]`` (a copy)."""
        with self.lock:
            ids = self._indices(idx)
            if not ids:
                raise ValueError("stack_poses needs at least one keyframe index")
            return Sim3(torch.cat([self._frames[i].T_WC.data.reshape(1, 8) for i in ids], dim=0).clone())

    def stack_points(self, idx: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Canonical pointmaps and average confidences of keyframes ``idx`` (all if None).

        Returns: ``X [n,HW,3]`` f32 (camera frames of each keyframe) and ``C/N [n,HW,1]`` f32 (copies).
        """
        with self.lock:
            ids = self._indices(idx)
            if not ids:
                raise ValueError("stack_points needs at least one keyframe index")
            X = torch.stack([self._frames[i].X_canon for i in ids], dim=0)
            C = torch.stack([self._frames[i].average_conf() for i in ids], dim=0)
            return X, C

    def set_poses(self, idx: Sequence[int] | Tensor, T_WC: Sim3) -> None:
        """Write poses ``T_WC`` (``Sim3 [n]`` or ``[n,1]``) to keyframes ``idx`` and mark them dirty."""
        with self.lock:
            ids = self._indices(idx)
            data = T_WC.data.reshape(-1, 8)
            if data.shape[0] != len(ids):
                raise ValueError(f"set_poses got {data.shape[0]} poses for {len(ids)} indices")
            if not torch.isfinite(data).all():
                raise ValueError("set_poses: non-finite pose")
            for k, i in enumerate(ids):
                f = self._frames[i]
                f.T_WC = Sim3(data[k:k + 1].to(device=f.T_WC.data.device, dtype=f.T_WC.data.dtype).clone())
                self.mark_dirty(i)

    update_T_WCs = set_poses

    def mark_dirty(self, idx: int) -> None:
        """Record that keyframe ``idx`` changed (pose or pointmap); bumps ``version``."""
        with self.lock:
            self._dirty.add(int(idx))
            self.version += 1

    def dirty(self) -> list[int]:
        """Sorted indices changed since the previous call (and clears the set)."""
        with self.lock:
            out = sorted(i for i in self._dirty if i < len(self._frames))
            self._dirty.clear()
            return out

    get_dirty_idx = dirty

    # ------------------------------------------------------------------------------------------------ memory
    def compact(self, idx: int) -> None:
        """Store keyframe ``idx``'s tokens in ``feat_dtype`` (if set) and release its image unless ``keep_images``.

        Call after every reader of the float32 tokens is done (the backend: after the retrieval update). Also moves
        the tokens of keyframes older than the newest ``feat_window`` to pinned host memory (:meth:`offload_old_feat`).
        """
        with self.lock:
            f = self._frames[self._check(idx)]
            if self.feat_dtype is not None and f.feat is not None and f.feat.dtype != self.feat_dtype:
                f.feat = f.feat.to(self.feat_dtype)
            if not self.keep_images:
                f.release_image()
            self.offload_old_feat()

    def offload_old_feat(self) -> int:
        """Move the tokens of every keyframe outside the newest ``feat_window`` to pinned host memory.

        Only compacted tokens move (the dtype already ``feat_dtype``, when set) so that the retrieval database, which
        reads a new keyframe's float32 tokens before :meth:`compact`, never finds them on the host. Returns the number
        of keyframes moved (0 on a CPU device, where the tokens are already in host memory, or with
        ``feat_window=None``)."""
        with self.lock:
            if self.feat_window is None:
                return 0
            moved = 0
            for f in self._frames[:max(0, len(self._frames) - self.feat_window)]:
                if f.feat is None or (self.feat_dtype is not None and f.feat.dtype != self.feat_dtype):
                    continue
                moved += int(f.offload_feat())
            return moved

    def memory_report(self) -> dict:
        """Bytes held by the keyframes' tensors.

        Returns:
            ``{"keyframes": n, "device_total": bytes, "per_keyframe": device_total // n (0 if empty),
            "by_field": {name: bytes}, "host_total": bytes, "feat_on_host": count, "feat_host_bytes": bytes}``;
            ``by_field`` sums :meth:`Frame.nbytes` over the keyframes; ``uimg`` and ``true_shape`` (host tensors by
            design) and the tokens of keyframes outside the token window (:meth:`Frame.feat_on_host`, counted in
            ``feat_on_host``/``feat_host_bytes``) count in ``host_total``, every other byte (on the SLAM device) in
            ``device_total``.
        """
        with self.lock:
            by_field: dict[str, int] = {}
            feat_host, n_host = 0, 0
            for f in self._frames:
                for k, b in f.nbytes().items():
                    by_field[k] = by_field.get(k, 0) + b
                if f.feat_on_host():
                    feat_host += int(f.feat.nbytes)
                    n_host += 1
            host = sum(b for k, b in by_field.items() if k in _HOST_FIELDS) + feat_host
            dev_total = sum(b for k, b in by_field.items() if k not in _HOST_FIELDS) - feat_host
            n = len(self._frames)
            return {"keyframes": n, "device_total": dev_total, "per_keyframe": dev_total // n if n else 0,
                    "by_field": by_field, "host_total": host, "feat_on_host": n_host, "feat_host_bytes": feat_host}

    def nbytes(self) -> int:
        """Device bytes of all keyframes (``memory_report()["device_total"]``)."""
        return self.memory_report()["device_total"]

    def frame_ids(self) -> list[int]:
        """``frame_id`` of every keyframe, in keyframe order."""
        with self.lock:
            return [f.frame_id for f in self._frames]
