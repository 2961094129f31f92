"""``SlamSystem``: the MASt3R-SLAM state machine (INIT -> TRACKING <-> RELOC) behind a small single-process API.

Source: MASt3R-SLAM ``main.py`` frontend loop (spec ``upstream_algorithm.md`` §1.2–1.4, upstream branch ``windows`` for
the single-process ordering) and §8 (relocalization). No thread and no process is started here: the caller drives the
frontend with :meth:`SlamSystem.track` and the backend with :meth:`SlamSystem.backend_step` (the ROS node from two
callback groups, the offline ``run`` job from one loop). With ``runtime.sync_backend`` the backend work of each new
keyframe (and each relocalization attempt) is done inside ``track`` before it returns (upstream ``single_thread``).

Trajectory: every tracked frame is stored as ``(stamp_ns, reference keyframe index, T_KC)`` with ``T_KC`` its pose
relative to that keyframe, so :meth:`trajectory` follows later keyframe corrections by the backend.

Stamps: ``track`` requires strictly increasing ``stamp_ns``; an out-of-order or repeated stamp raises
:class:`StampOrderError` (a ``ValueError``) and leaves the system unchanged (callers that prefer dropping catch it).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from mast3r_slam_ros import geometry, kernels
from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.backend import Backend
from mast3r_slam_ros.slam.frame import Frame, Mode
from mast3r_slam_ros.slam.keyframes import KeyframeCapacityError, KeyframeStore
from mast3r_slam_ros.slam.matching import mono_inference
from mast3r_slam_ros.slam.tracker import FrameTracker, TrackOutcome

log = logging.getLogger(__name__)


class StampOrderError(ValueError):
    """``track`` got a stamp that is not strictly greater than the previous one."""


@dataclass
class TrackResult:
    """Result of :meth:`SlamSystem.track`.

    ``stamp_ns`` (input stamp), ``T_WC`` (``Sim3 [1]`` camera -> world at the time of tracking), ``is_keyframe``,
    ``state`` (mode after this frame), ``match_frac`` (fraction of keyframe pixels with a valid match, 0 when not
    tracked), ``frame_id`` (0-based running index), ``message`` (why tracking was lost, else empty).
    """

    stamp_ns: int
    T_WC: Sim3
    is_keyframe: bool
    state: Mode
    match_frac: float
    frame_id: int
    message: str = ""


@dataclass
class _TrajEntry:
    stamp_ns: int
    ref_kf: int          # keyframe index the pose is relative to
    T_KC: Tensor         # [1,8] Sim(3) data, pose relative to the reference keyframe
    frame_id: int
    is_keyframe: bool = False


def _cfg_get(cfg: Any, section: str, key: str, default: Any) -> Any:
    sec = getattr(cfg, section, None)
    return getattr(sec, key, default) if sec is not None else default


def resolve_device(name: str | None) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise ``torch.device(name)`` (ValueError if CUDA is requested but
    unavailable)."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available (use 'cpu' or 'auto')")
    return dev


def _validate_image(image: Any) -> np.ndarray:
    """Return a contiguous ``[H,W,3]`` uint8 RGB array or raise ValueError/TypeError (state must stay unchanged)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array [H,W,3] uint8, got {type(image).__name__}")
    if image.size == 0 or image.ndim not in (2, 3):
        raise ValueError(f"image must be a non-empty [H,W,3] array, got shape {image.shape}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] != 3:
        raise ValueError(f"image must have 3 (RGB) channels, got shape {image.shape}")
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise ValueError(f"image too small: {image.shape[1]}x{image.shape[0]} (need at least 16x16)")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"image must be uint8 RGB (or float RGB in [0,1]), got dtype {image.dtype}")
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or inf values")
        if image.min() < 0.0 or image.max() > 1.0:
            raise ValueError("float images must be RGB in [0,1]")
        image = (image * 255.0).astype(np.uint8)  # truncation, as upstream (spec §2 step 1)
    return np.ascontiguousarray(image)


def native_preprocess(rgb: np.ndarray) -> "geometry.Preprocessed":
    """Identity preprocessing for images already at a network size (H, W multiples of 16): no resize, no crop; the
    same normalization ``(x/255 − 0.5)/0.5`` as ``geometry.preprocess_image``. Used by tests and benchmarks to run the
    whole system on small images (e.g. 128×96) with the oracle predictor.

    Raises: ValueError if H or W is not a multiple of 16.
    """
    H, W = rgb.shape[:2]
    if H % 16 or W % 16:
        raise ValueError(f"native_preprocess needs H and W multiples of 16 (ViT patches), got {W}x{H}")
    uimg = torch.from_numpy(np.ascontiguousarray(rgb).copy())
    img = geometry.normalize_image(uimg)
    tf = geometry.ImageTransform(scale_w=1.0, scale_h=1.0, half_crop_w=0.0, half_crop_h=0.0, in_size=(W, H),
                                 out_size=(W, H))
    return geometry.Preprocessed(img=img, true_shape=torch.tensor([[H, W]], dtype=torch.int32), uimg=uimg,
                                 transform=tf)


class SlamSystem:
    """Dense monocular SLAM on one device in one process.

    Args:
        predictor: object with the Predictor API (``encode``/``decode``; MASt3R model or ``testing.OraclePredictor``).
        cfg: ``SlamConfig`` (``use_calib``, ``matching``, ``tracking``, ``local_opt``, ``retrieval``, ``reloc``,
            ``runtime.{device,kernel_backend,max_keyframes,img_size,sync_backend}``).
        K: optional ``[3,3]`` intrinsics (pixels) of the images passed to :meth:`track` (already undistorted); adjusted
            to the network image with ``geometry.adjust_intrinsics``. Required when ``cfg.use_calib``.
        preprocess: optional ``rgb [H0,W0,3] u8 -> geometry.Preprocessed`` replacing
            ``geometry.preprocess_image(rgb, size=runtime.img_size)`` (e.g. :func:`native_preprocess` in tests).
    Raises: ValueError for use_calib without K, a bad K or an unavailable device.
    """

    def __init__(self, predictor: Any, cfg: Any, K: Any = None, *, preprocess: Callable | None = None):
        self.predictor = predictor
        self._preprocess = preprocess
        self.cfg = cfg
        self.device = resolve_device(_cfg_get(cfg, "runtime", "device", "auto"))
        kb = _cfg_get(cfg, "runtime", "kernel_backend", "auto")
        if kb is not None:
            kernels.set_backend(kb)
        self.use_calib = bool(getattr(cfg, "use_calib", False))
        if K is not None:
            K = torch.as_tensor(np.asarray(K, dtype=np.float64))
            if K.shape != (3, 3) or not torch.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise ValueError(f"K must be a finite [3,3] camera matrix with fx, fy > 0, got {K.tolist()}")
        if self.use_calib and K is None:
            raise ValueError("use_calib=True needs the camera intrinsics K (pass K= or --calib)")
        self.K_input: Tensor | None = K
        self.img_size = int(_cfg_get(cfg, "runtime", "img_size", 512))
        self.sync_backend = bool(_cfg_get(cfg, "runtime", "sync_backend", False))
        self.max_keyframes = int(_cfg_get(cfg, "runtime", "max_keyframes", 2000))
        self.filtering_mode = str(_cfg_get(cfg, "tracking", "filtering_mode", "weighted_pointmap"))
        self.filtering_score = str(_cfg_get(cfg, "tracking", "filtering_score", "median"))
        self.store = KeyframeStore(self.max_keyframes)
        self._version_extra = 0
        self._init_state()

    # ------------------------------------------------------------------------------------------------------ state
    def _init_state(self) -> None:
        self._state = Mode.INIT
        self._traj: list[_TrajEntry] = []
        self._last_stamp: int | None = None
        self._next_frame_id = 0
        self._last_frame: Frame | None = None
        self._reloc_frame: Frame | None = None
        self._reloc_traj_idx: int | None = None
        self._out_shape: tuple[int, int] | None = None
        self.K: Tensor | None = None  # network-image intrinsics (f32, device)
        self.tracker: FrameTracker | None = None
        self.backend: Backend | None = None
        self.last_outcome: TrackOutcome | None = None

    @property
    def state(self) -> Mode:
        """Current mode (INIT, TRACKING or RELOC)."""
        return self._state

    @property
    def map_version(self) -> int:
        """Increases whenever keyframes, their poses or their pointmaps change (for map publishers)."""
        return self.store.version + self._version_extra

    def keyframes(self) -> KeyframeStore:
        """The keyframe store (hold ``store.lock`` while iterating from another thread)."""
        return self.store

    def reset(self) -> None:
        """Forget everything (keyframes, trajectory, backend state); next frame initializes a new map."""
        backend_lock = self.backend.lock if self.backend is not None else contextlib.nullcontext()
        with backend_lock, self.store.lock:  # lock order of the backend: its own lock, then the store's
            self.store.clear()
            if self.backend is not None:
                self.backend.reset()
            self._init_state()
            self._version_extra += 1

    # ------------------------------------------------------------------------------------------------- helpers
    def _make_frame(self, rgb: np.ndarray, stamp_ns: int, T_WC: Sim3) -> Frame:
        if self._preprocess is not None:
            pre = self._preprocess(rgb)
        else:  # normalized on the device from a pinned uint8 upload (no host sync, 4x fewer bytes)
            pre = geometry.preprocess_image(rgb, size=self.img_size, device=self.device)
        H, W = int(pre.true_shape[0, 0]), int(pre.true_shape[0, 1])
        if self._out_shape is not None and (H, W) != self._out_shape:
            raise ValueError(f"image size changed: network image {W}x{H}, previous frames "
                             f"{self._out_shape[1]}x{self._out_shape[0]} (all images of a run must have one size)")
        if self.use_calib and self.K is None:
            self.K = torch.as_tensor(geometry.adjust_intrinsics(self.K_input, pre.transform),
                                     dtype=torch.float32).reshape(3, 3).to(self.device)
        uimg = torch.as_tensor(np.asarray(pre.uimg)).to(torch.uint8).cpu()
        return Frame(frame_id=self._next_frame_id, stamp_ns=int(stamp_ns), img=pre.img.to(self.device).float(),
                     true_shape=torch.as_tensor(pre.true_shape).reshape(1, 2).to(torch.int32), uimg=uimg,
                     T_WC=T_WC, K=self.K)

    def _ensure_components(self) -> None:
        if self.tracker is None:
            self.tracker = FrameTracker(self.predictor, self.store, self.cfg, self.K)
        if self.backend is None:
            self.backend = Backend(self.store, self.predictor, self.cfg, self.K)

    def _add_keyframe(self, frame: Frame) -> int:
        with self.store.lock:
            idx = self.store.append(frame)
        self.backend.queue_keyframe(idx)
        if self.sync_backend:
            while self.backend.has_work():
                if not self.backend.step():
                    break
        return idx

    def _mono(self, frame: Frame) -> None:
        X, C = mono_inference(self.predictor, frame)
        frame.update_pointmap(X, C, self.filtering_mode, self.filtering_score)

    def _reloc_attempt(self) -> bool:
        """One relocalization attempt for the pending RELOC frame (spec §8). True if relocalized.

        The hand-over of the pending frame and the state change happen under ``store.lock`` so a multi-threaded ROS
        executor may call this (through ``backend_step``) concurrently with ``track``."""
        with self.store.lock:
            frame, traj_idx = self._reloc_frame, self._reloc_traj_idx
            self._reloc_frame, self._reloc_traj_idx = None, None
        if frame is None:
            return False
        ok = bool(self.backend.relocalize(frame))
        if ok:
            with self.store.lock:
                self._state = Mode.TRACKING
                self.tracker.reset_idx_f2k()
                if len(self.store) and self.store.last().frame_id == frame.frame_id and traj_idx is not None:
                    e = self._traj[traj_idx]
                    e.ref_kf = len(self.store) - 1
                    e.T_KC = Sim3.identity(1, dtype=torch.float32, device=self.device).data.clone()
                    e.is_keyframe = True
                    if traj_idx == len(self._traj) - 1:
                        self._last_frame = frame  # next frame starts from the relocalized pose
            log.info("relocalized frame %d", frame.frame_id)
        return ok

    def _prev_ref(self) -> tuple[int, Tensor]:
        """Reference keyframe and relative pose of the last processed frame (for untracked RELOC frames)."""
        if self._traj:
            e = self._traj[-1]
            return e.ref_kf, e.T_KC.clone()
        return 0, Sim3.identity(1, dtype=torch.float32, device=self.device).data.clone()

    # ------------------------------------------------------------------------------------------------------ API
    def track(self, image_rgb_u8: Any, stamp_ns: int) -> TrackResult:
        """Process one image (spec §1.3).

        Args:
            image_rgb_u8: ``[H0,W0,3]`` uint8 RGB (``[H0,W0]`` gray is replicated; float RGB in [0,1] is accepted).
            stamp_ns: int nanoseconds, strictly increasing.
        Returns: :class:`TrackResult`.
        Raises:
            ValueError: empty/NaN/wrongly shaped image (system unchanged); StampOrderError (a ValueError) for a stamp
            that is not strictly increasing (system unchanged); TypeError for a wrong type;
            ``KeyframeCapacityError`` when a new keyframe would exceed ``runtime.max_keyframes`` (the frame's tracked pose
            is still recorded, relative to the last keyframe, and the system keeps tracking against that keyframe).
        """
        if self._state == Mode.TERMINATED:
            raise RuntimeError("SlamSystem is terminated; call reset()")
        if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)):
            raise TypeError(f"stamp_ns must be an int (nanoseconds), got {type(stamp_ns).__name__}")
        stamp_ns = int(stamp_ns)
        if self._last_stamp is not None and stamp_ns <= self._last_stamp:
            raise StampOrderError(f"stamp {stamp_ns} ns is not after the previous stamp {self._last_stamp} ns; "
                                  "frame rejected (stamps must be strictly increasing)")
        rgb = _validate_image(image_rgb_u8)

        with torch.inference_mode():
            if self._state == Mode.INIT:
                frame = self._make_frame(rgb, stamp_ns, Sim3.identity(1, dtype=torch.float32, device=self.device))
                self._out_shape = (frame.height, frame.width)
                self._ensure_components()
                self._mono(frame)
                idx = self._add_keyframe(frame)
                self._commit(frame, stamp_ns, idx, None, True)
                self._state = Mode.TRACKING
                return TrackResult(stamp_ns, Sim3(frame.T_WC.data.clone()), True, self._state, 1.0, frame.frame_id)

            T_prev = Sim3(self._last_frame.T_WC.data.clone())
            frame = self._make_frame(rgb, stamp_ns, T_prev)
            if self._state == Mode.TRACKING:
                out = self.tracker.track(frame)
                self.last_outcome = out
                if out.try_reloc:
                    log.warning("frame %d: %s -> RELOC", frame.frame_id, out.message)
                    self._state = Mode.RELOC
                    ref, T_KC = self._prev_ref()
                    self._commit(frame, stamp_ns, ref, T_KC, False)
                    return TrackResult(stamp_ns, Sim3(frame.T_WC.data.clone()), False, self._state, out.match_frac,
                                       frame.frame_id, out.message)
                ref = len(self.store) - 1
                if out.new_kf and len(self.store) >= self.store.max_keyframes:
                    # keep the tracked pose (relative to the last keyframe), then report the full store
                    self._commit(frame, stamp_ns, ref, out.T_CkCf.data.clone(), False)
                    raise KeyframeCapacityError(
                        f"frame {frame.frame_id} needs a new keyframe but the store holds runtime.max_keyframes="
                        f"{self.store.max_keyframes} keyframes; its pose was kept relative to the last keyframe "
                        "(raise runtime.max_keyframes, or reset())")
                if out.new_kf:
                    idx = self._add_keyframe(frame)
                    self._commit(frame, stamp_ns, idx, None, True)
                else:
                    self._commit(frame, stamp_ns, ref, out.T_CkCf.data.clone(), False)
                return TrackResult(stamp_ns, Sim3(frame.T_WC.data.clone()), out.new_kf, self._state, out.match_frac,
                                   frame.frame_id)

            # RELOC: mono prediction, keep the previous pose, one relocalization attempt (now if sync_backend)
            self._mono(frame)
            ref, T_KC = self._prev_ref()
            with self.store.lock:
                self._commit(frame, stamp_ns, ref, T_KC, False)
                self._reloc_frame = frame
                self._reloc_traj_idx = len(self._traj) - 1
            is_kf = False
            if self.sync_backend:
                is_kf = self._reloc_attempt()
            mf = 0.0
            rel = getattr(self.backend, "last_reloc", None) if is_kf else None
            if rel is not None and getattr(rel, "match_frac", None):
                mf = float(max(rel.match_frac))  # two-way match fraction of the accepted relocalization edge
            return TrackResult(stamp_ns, Sim3(frame.T_WC.data.clone()), is_kf, self._state, mf, frame.frame_id,
                               "relocalized" if is_kf else "relocalizing")

    def _commit(self, frame: Frame, stamp_ns: int, ref: int, T_KC: Tensor | None, is_kf: bool) -> None:
        if T_KC is None:
            T_KC = Sim3.identity(1, dtype=torch.float32, device=self.device).data.clone()
        self._traj.append(_TrajEntry(stamp_ns, ref, T_KC.reshape(1, 8), frame.frame_id, is_kf))
        self._last_stamp = stamp_ns
        self._last_frame = frame
        self._next_frame_id += 1

    def backend_step(self) -> bool:
        """Run one unit of backend work: one relocalization attempt in RELOC mode, else one queued keyframe (edges +
        global solve). Returns True if work was done."""
        if self.backend is None:
            return False
        with torch.inference_mode():
            if self._state == Mode.RELOC and self._reloc_frame is not None:
                self._reloc_attempt()
                return True
            if self.backend.has_work():
                return bool(self.backend.step())
        return False

    # --------------------------------------------------------------------------------------------------- outputs
    def trajectory(self) -> list[tuple[int, Sim3]]:
        """Pose of every processed frame as ``[(stamp_ns, T_WC Sim3 [1])]``, recomputed from the current keyframe
        poses (``T_WC = T_WC[ref keyframe] · T_KC``)."""
        with self.store.lock:
            if not self._traj:
                return []
            poses = self.store.stack_poses()
            ref = torch.tensor([e.ref_kf for e in self._traj], dtype=torch.long, device=poses.data.device)
            T_KC = torch.cat([e.T_KC.reshape(1, 8) for e in self._traj]).to(poses.data)
            T_WC = (Sim3(poses.data[ref]) * Sim3(T_KC)).data  # one batched composition [N,8]
            return [(e.stamp_ns, Sim3(T_WC[k:k + 1])) for k, e in enumerate(self._traj)]

    def keyframe_trajectory(self) -> list[tuple[int, Sim3]]:
        """``[(stamp_ns, T_WC Sim3 [1])]`` of every keyframe, in keyframe order."""
        with self.store.lock:
            return [(f.stamp_ns, Sim3(f.T_WC.data.clone())) for f in self.store]

    def frame_stamps(self) -> list[int]:
        """Stamps of all processed frames."""
        return [e.stamp_ns for e in self._traj]

    def map_points(self, conf_threshold: float = 1.5, voxel_size: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World points of all keyframes with average confidence ``C/N > conf_threshold`` (spec §12
        ``save_reconstruction``; calibrated mode constrains points to their pixel rays first).

        Args: conf_threshold (C/N threshold), voxel_size (> 0: average points and colours per voxel of that size,
        in map units). Returns: ``xyz [N,3] float32``, ``rgb [N,3] uint8`` (numpy, CPU).
        """
        if voxel_size < 0:
            raise ValueError(f"voxel_size must be >= 0, got {voxel_size}")
        xyz_all, rgb_all = [], []
        # snapshot under the lock (tracking and the backend replace these tensors, never edit them in place), then
        # compute and copy to the host without it so a multi-threaded executor keeps tracking meanwhile
        with self.store.lock:
            snap = [(f.X_canon, f.C, f.N, f.T_WC, f.uimg, f.height, f.width) for f in self.store
                    if f.X_canon is not None and f.N > 0]
        with torch.inference_mode():
            for X, C, N, T_WC, uimg, H, W in snap:
                if self.use_calib and self.K is not None:
                    X = geometry.constrain_points_to_ray((H, W), X.unsqueeze(0), self.K)[0]
                Xw = T_WC.act(X.to(T_WC.data.dtype))
                mask = ((C / N)[:, 0] > conf_threshold) & torch.isfinite(Xw).all(-1)
                xyz_all.append(Xw[mask].float().cpu().numpy())
                rgb_all.append(uimg.reshape(-1, 3)[mask.cpu()].numpy())
        if not xyz_all:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        xyz = np.concatenate(xyz_all).astype(np.float32)
        rgb = np.concatenate(rgb_all).astype(np.uint8)
        if voxel_size > 0 and len(xyz):
            keys = np.floor(xyz / voxel_size).astype(np.int64)
            _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
            inv = inv.reshape(-1)
            sx = np.zeros((len(counts), 3), np.float64)
            sc = np.zeros((len(counts), 3), np.float64)
            np.add.at(sx, inv, xyz)
            np.add.at(sc, inv, rgb.astype(np.float64))
            xyz = (sx / counts[:, None]).astype(np.float32)
            rgb = np.clip(np.round(sc / counts[:, None]), 0, 255).astype(np.uint8)
        return xyz, rgb

    def terminate(self) -> None:
        """Mark the run finished (state TERMINATED); outputs stay readable."""
        self._state = Mode.TERMINATED
