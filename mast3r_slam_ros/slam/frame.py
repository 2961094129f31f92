"""Per-frame SLAM state (``Frame``) and the system mode enum (``Mode``).

Source: MASt3R-SLAM ``frame.py`` (spec ``upstream_algorithm.md`` §1.2, §1.5, §5.6). A ``Frame`` holds the network input,
the cached encoder tokens, the pose ``T_WC`` (camera -> world, Sim(3)) and the canonical fused pointmap ``X_canon`` in the
frame's own camera coordinates with its accumulated confidence ``C`` and observation count ``N``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mast3r_slam_ros.lie import Sim3
from mast3r_slam_ros.slam.fusion import FILTERING_MODES, fuse


class Mode(enum.IntEnum):
    """SLAM system state (spec §1.2): INIT -> TRACKING <-> RELOC; TERMINATED at the end."""

    INIT = 0
    TRACKING = 1
    RELOC = 2
    TERMINATED = 3


@dataclass
class Frame:
    """One processed image (spec §1.5).

    Attributes:
        frame_id: running index of the frame in the system (0-based, counts every tracked image).
        stamp_ns: input stamp in nanoseconds.
        img: ``[1,3,H,W]`` f32 in [-1,1] on the SLAM device (network input); None after :meth:`release_image`
            (keyframes drop it once encoded: encoding is its only reader).
        true_shape: ``[1,2]`` int32 ``(H, W)`` of ``img``.
        uimg: ``[H,W,3]`` uint8 CPU, the cropped resized RGB image (colours of the map).
        T_WC: ``Sim3 [1]`` camera -> world pose.
        feat, pos: cached encoder tokens ``[1,P,C]`` f32 (or the trunk dtype after :meth:`compact`) / token positions
            ``[1,P,2]`` int64 (None until encoded). ``pos`` is on the SLAM device; ``feat`` too, except for old
            keyframes whose tokens were moved to pinned host memory (:meth:`offload_feat`; read them through
            :meth:`device_feat`).
        X_canon: ``[HW,3]`` f32 canonical pointmap in this camera's frame (None until the first update).
        C: ``[HW,1]`` f32 accumulated confidence (sum over fused observations).
        N: number of fused observations (average confidence = ``C/N``).
        N_updates: number of ``update_pointmap`` calls.
        K: ``[3,3]`` f32 intrinsics of the network image (calibrated mode), else None.
        score: confidence score kept by the ``best_score`` fusion rule.
    """

    frame_id: int
    stamp_ns: int
    img: Tensor | None
    true_shape: Tensor
    uimg: Tensor
    T_WC: Sim3
    feat: Tensor | None = None
    pos: Tensor | None = None
    X_canon: Tensor | None = None
    C: Tensor | None = None
    N: int = 0
    N_updates: int = 0
    K: Tensor | None = None
    score: float = field(default=-math.inf)

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def img_true_shape(self) -> Tensor:
        """Alias of ``true_shape`` (upstream name)."""
        return self.true_shape

    @property
    def img_shape(self) -> Tensor:
        """``[1,2]`` int32 ``(H,W)`` of the pointmap grid (equal to ``true_shape``; no output downsampling)."""
        return self.true_shape

    @property
    def height(self) -> int:
        """H of the network image (from ``img``, or ``true_shape`` once the image is released)."""
        if self.img is not None:
            return int(self.img.shape[-2])
        return int(self.true_shape.reshape(-1)[0])

    @property
    def width(self) -> int:
        """W of the network image (from ``img``, or ``true_shape`` once the image is released)."""
        if self.img is not None:
            return int(self.img.shape[-1])
        return int(self.true_shape.reshape(-1)[1])

    @property
    def device(self) -> torch.device:
        """The SLAM device (of ``img``, else ``X_canon``, else ``pos``, else ``feat``; a keyframe's tokens may live in
        pinned host memory, see :meth:`offload_feat`)."""
        for t in (self.img, self.X_canon, self.pos, self.feat):
            if t is not None:
                return t.device
        raise RuntimeError(f"frame {self.frame_id} holds no device tensor")

    def release_image(self) -> bool:
        """Drop the normalized network image ``img`` if the frame is encoded (``feat``/``pos`` cached); the colours
        stay in ``uimg`` (CPU). Returns True if the image was released (False: already released or not encoded)."""
        if self.img is None or self.feat is None or self.pos is None:
            return False
        self.img = None
        return True

    def compact(self, feat_dtype: torch.dtype | None = None) -> None:
        """Store the encoder tokens in ``feat_dtype`` (e.g. bfloat16 for a bf16 network trunk,
        see :func:`mast3r_slam_ros.slam.keyframes.feat_storage_dtype`) and release the image; None keeps ``feat``."""
        if feat_dtype is not None and self.feat is not None and self.feat.dtype != feat_dtype:
            self.feat = self.feat.to(feat_dtype)
        self.release_image()

    def feat_on_host(self) -> bool:
        """True if the tokens ``feat`` were moved to host memory (:meth:`offload_feat`) while ``pos`` (which always
        stays on the SLAM device) is on an accelerator."""
        return (self.feat is not None and self.pos is not None and self.feat.device.type == "cpu"
                and self.pos.device.type != "cpu")

    def offload_feat(self) -> bool:
        """Move the encoder tokens ``feat [1,P,C]`` to pinned (page-locked) host memory (issue 8: old keyframes'
        tokens are read only by the occasional retrieval-edge / relocalization decode). ``pos`` stays on the device;
        readers get the tokens back on the device through :meth:`device_feat` (a non-blocking copy from pinned memory).

        Returns: True if moved; False when there is nothing to move (no tokens, already on the host, or the frame lives
        on the CPU). One synchronous device->host copy (a host sync of the calling stream).
        """
        if self.feat is None or self.pos is None or self.feat.device.type == "cpu" or self.pos.device.type == "cpu":
            return False
        host = torch.empty(self.feat.shape, dtype=self.feat.dtype, device="cpu", pin_memory=True)
        host.copy_(self.feat)
        self.feat = host
        return True

    def device_feat(self) -> Tensor | None:
        """The tokens on the SLAM device (the device of ``pos``): ``feat`` itself, or a non-blocking host->device copy
        of offloaded tokens (:meth:`offload_feat`; the copy is not cached, the frame keeps the host tokens)."""
        if self.feat is None:
            return None
        if self.pos is not None and self.feat.device != self.pos.device:
            return self.feat.to(self.pos.device, non_blocking=True)
        return self.feat

    def nbytes(self) -> dict[str, int]:
        """Bytes of every tensor this frame holds on its device(s) (``uimg`` included, it lives on the CPU).

        Returns: ``{name: bytes}`` for ``img, feat, pos, X_canon, C, T_WC, K, true_shape, uimg`` (0 for None).
        """
        tensors = {"img": self.img, "feat": self.feat, "pos": self.pos, "X_canon": self.X_canon, "C": self.C,
                   "T_WC": self.T_WC.data if self.T_WC is not None else None, "K": self.K,
                   "true_shape": self.true_shape, "uimg": self.uimg}
        return {k: int(v.nbytes) if isinstance(v, Tensor) else 0 for k, v in tensors.items()}

    def update_pointmap(
        self,
        X: Tensor,
        C: Tensor,
        mode: str = "weighted_pointmap",
        score: str = "median",
        *,
        check_finite: bool = True,
    ) -> None:
        """Fuse a new pointmap observation of this frame into ``X_canon``/``C``/``N`` (spec §5.6).

        Args:
            X: ``[HW,3]`` f32 pointmap in this camera's frame (or ``[1,H,W,3]``/``[H,W,3]``; reshaped).
            C: ``[HW,1]`` f32 confidence (>= 1) (or any shape with HW elements; reshaped).
            mode: ``tracking.filtering_mode``, one of ``weighted_pointmap`` (default), ``weighted_spherical``,
                ``recent``, ``first``, ``best_score``, ``indep_conf``.
            score: ``tracking.filtering_score`` for ``best_score`` (``median`` or ``mean``).
            check_finite: when True (default) reject NaN/inf in ``X``/``C``. The test is a device->host sync; callers
                that already checked finiteness themselves (the tracker, in one packed readback) pass False.
        Raises:
            ValueError: unknown mode, HW different from this frame's image, or (``check_finite``) non-finite values.
        """
        if mode not in FILTERING_MODES:
            raise ValueError(f"unknown filtering_mode {mode!r}; expected one of {FILTERING_MODES}")
        hw = self.height * self.width
        X = X.reshape(-1, 3)
        C = C.reshape(-1, 1)
        if X.shape[0] != hw or C.shape[0] != hw:
            raise ValueError(f"pointmap has {X.shape[0]} points / {C.shape[0]} confidences, frame has H*W={hw}")
        if check_finite and not (torch.isfinite(X).all() and torch.isfinite(C).all()):
            raise ValueError("pointmap or confidence contains NaN/inf")
        res = fuse(self.X_canon, self.C, self.N, self.N_updates, self.score, X.float(), C.float(), mode, score)
        self.X_canon, self.C, self.N, self.score = res.X_canon, res.C, res.N, res.score
        self.N_updates += 1

    def average_conf(self) -> Tensor:
        """``C/N`` ``[HW,1]`` f32, the average confidence per pixel (upstream ``get_average_conf``).

        Raises: RuntimeError if the frame has no pointmap yet.
        """
        if self.C is None or self.N == 0:
            raise RuntimeError(f"frame {self.frame_id} has no pointmap yet (call update_pointmap first)")
        return self.C / self.N

    get_average_conf = average_conf
