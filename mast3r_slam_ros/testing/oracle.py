"""Oracle predictor: MASt3R-like outputs computed from the ground truth of a ``SyntheticSequence``.

Implements the Predictor API of ``docs/interfaces.md`` (``encode`` / ``decode``) so SLAM tests and benchmarks can run
the whole system without network weights. What it returns mirrors the MASt3R heads (spec ``upstream_algorithm.md``
§3.3–3.5):

- ``encode(img, true_shape)``: identifies which sequence frame the network image is (exact match of the image
  re-quantized to uint8, else the nearest registered frame within a tolerance) and returns encoder-like tokens
  ``feat [B,P,C]`` that are a pure function of the image content (a fixed random projection of each 16x16 patch, so
  retrieval on the tokens can find revisits; the token norm grows with the patch contrast) and ``pos [B,P,2]`` =
  (row, col) of the token grid.
- ``decode(feat1, pos1, feat2, pos2, true_shape) -> (res1, res2)``: ``res1`` = frame-1 points in camera 1 (``X_11``),
  ``res2`` = frame-2 points in camera 1 (``X_21``), both with one per-pair scale; ``conf`` C >= 1 (high on textured,
  frontal surfaces, low on the plain wall, at grazing angles and depth edges, lower for frame-2 pixels that camera 1
  does not see); ``desc`` unit 24-D descriptors that are a smooth function of the world point, so true correspondences
  get near-identical descriptors; ``desc_conf`` Q (about ``q_max`` > 1.5 on visible textured pixels, ``q_floor`` < 1.5
  on the plain wall and on pixels not co-visible in the pair).
- Noise (``OracleNoise``): multiplicative per-pixel depth noise (larger where the image is flat), a smooth low-frequency
  depth bias, a per-pair log-normal scale (MASt3R pointmaps are only defined up to scale per pair), an optional error of
  the relative pose used for ``X_21``, and descriptor noise. Noise is deterministic per ordered pair (i, j).

Sizes: outputs have the network image size ``true_shape`` (H, W). When it equals the sequence image size (224x224 with
``img_size=224``, 512x384 with ``img_size=512``: ``preprocess_image`` is then the identity) the sequence's ``K`` and
depth are used directly. Otherwise the oracle runs ``geometry.preprocess_image`` on the sequence images itself, takes
``geometry.adjust_intrinsics`` of ``K`` (spec §2, no half-pixel shift, like the SLAM calibrated path) and re-renders
the exact depth at that size with those intrinsics.

Used only by tests and benchmarks, never by the runtime.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import Tensor

from mast3r_slam_ros.testing.scenes import SyntheticSequence

try:  # the network package defines the canonical container; keep a field-identical fallback while it is absent
    from mast3r_slam_ros.network import HeadOutput  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on the build order of the package

    @dataclass
    class HeadOutput:  # type: ignore[no-redef]
        """One view's outputs in the camera of the first decoder input (docs/interfaces.md)."""

        pts3d: Tensor  # [B,H,W,3] f32
        conf: Tensor  # [B,H,W] f32 >= 1
        desc: Tensor  # [B,H,W,24] f32 unit norm
        desc_conf: Tensor  # [B,H,W] f32 >= 0


__all__ = ["OracleNoise", "OraclePredictor", "HeadOutput", "descriptor_embedding"]

PATCH = 16
DESC_DIM = 24


@dataclass(frozen=True)
class OracleNoise:
    """Noise model of the oracle (all deterministic given ``seed`` and the ordered frame pair).

    Attributes:
        depth_rel: std of the per-pixel multiplicative log-depth noise (0.01 = 1 %).
        depth_bias: std of a smooth (4x5 control grid, bicubic) multiplicative log-depth bias per view and pair.
        scale_log_sigma: std of the per-pair log scale applied to both outputs of a pair (0.05 = about 5 %).
        rot_deg: std (degrees) of a random rotation error of the relative pose used for ``X_21``.
        trans_rel: std of the translation error of that relative pose, relative to the baseline length.
        desc_sigma: std of the Gaussian noise added per descriptor component before renormalization.
        textureless_gain: depth and descriptor noise are multiplied by ``1 + gain * (1 - texture)`` (texture in [0,1]).
        seed: base seed.
    """

    depth_rel: float = 0.0
    depth_bias: float = 0.0
    scale_log_sigma: float = 0.05
    rot_deg: float = 0.0
    trans_rel: float = 0.0
    desc_sigma: float = 0.0
    textureless_gain: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("depth_rel", "depth_bias", "scale_log_sigma", "rot_deg", "trans_rel", "desc_sigma",
                  "textureless_gain"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"OracleNoise.{k} must be a finite number >= 0, got {v!r}")

    @classmethod
    def none(cls, seed: int = 0) -> "OracleNoise":
        """No noise at all: exact ground-truth geometry, unit scale."""
        return cls(scale_log_sigma=0.0, seed=seed)

    @classmethod
    def realistic(cls, seed: int = 0) -> "OracleNoise":
        """Noise levels of the spec's oracle plan (test_data.md §5b): 1 % pixel depth noise, 3 % smooth bias,
        10 % per-pair scale, 0.5 deg / 5 % relative-pose error, descriptor noise 0.03."""
        return cls(depth_rel=0.01, depth_bias=0.03, scale_log_sigma=0.1, rot_deg=0.5, trans_rel=0.05,
                   desc_sigma=0.03, seed=seed)


def descriptor_embedding(points_w: np.ndarray, lambda_min: float = 0.03, lambda_max: float = 1.0) -> np.ndarray:
    """Unit 24-D descriptor of world points: ``[cos(w_k . P), sin(w_k . P)] / sqrt(12)`` for 12 fixed random directions
    with wavelengths log-spaced in ``[lambda_min, lambda_max]`` metres.

    The dot product of two descriptors is ``mean_k cos(w_k . (P - P'))``: a shift-invariant kernel equal to 1 only at
    ``P = P'`` and falling off within about ``lambda_min``. ``points_w [...,3]`` float (metres) -> ``[...,24]`` float32.
    """
    w = _desc_frequencies(lambda_min, lambda_max)  # [12,3]
    phase = np.asarray(points_w, dtype=np.float64) @ w.T
    phase = np.mod(phase, 2.0 * np.pi).astype(np.float32)
    d = np.concatenate([np.cos(phase), np.sin(phase)], axis=-1)
    d *= np.float32(1.0 / math.sqrt(DESC_DIM // 2))
    return d


@functools.lru_cache(maxsize=8)
def _desc_frequencies(lambda_min: float, lambda_max: float) -> np.ndarray:
    rng = np.random.default_rng(24_24_24)
    dirs = rng.normal(size=(DESC_DIM // 2, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lam = np.geomspace(lambda_min, lambda_max, DESC_DIM // 2)
    return dirs * (2.0 * np.pi / lam)[:, None]


def _backproject(z: np.ndarray, K: np.ndarray) -> np.ndarray:
    H, W = z.shape
    uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    x = (uu - K[0, 2]) / K[0, 0]
    y = (vv - K[1, 2]) / K[1, 1]
    return np.stack([x * z, y * z, z], axis=-1)


def _rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(v, dtype=np.float64).reshape(3, 1))[0]


@dataclass
class _FrameGT:
    """Ground truth of one frame at one network size."""

    depth: np.ndarray  # [H,W] f64 z-depth (m)
    Xc: np.ndarray  # [H,W,3] f64 points in the camera frame
    Pw: np.ndarray  # [H,W,3] f64 world points
    tex: np.ndarray  # [H,W] f64 texture weight in [0,1] (from the image)
    geo: np.ndarray  # [H,W] f64 geometric reliability in [0,1] (incidence angle, depth edges)


@dataclass
class _ViewSet:
    """All sequence frames as seen at one network size."""

    H: int
    W: int
    K: np.ndarray  # [3,3] f64 intrinsics of the network image
    uimgs: np.ndarray  # [T,H,W,3] u8 network images
    native: bool  # True: same size as the sequence images (no preprocessing)
    keys: dict = field(default_factory=dict)  # sha1 of u8 image -> first frame index
    thumbs: np.ndarray | None = None  # [T,D] f32
    cache: OrderedDict = field(default_factory=OrderedDict)


class OraclePredictor:
    """Predictor (``encode`` / ``decode``) backed by the ground truth of a ``SyntheticSequence``.

    Args:
        sequence: the rendered sequence whose frames will be fed to SLAM (images must come from it, possibly through
            ``geometry.preprocess_image``).
        noise: ``OracleNoise`` (default ``OracleNoise()``: only a mild 5 % per-pair scale; ``OracleNoise.none()`` for
            exact outputs, ``OracleNoise.realistic()`` for the spec's noise levels).
        feat_dim: token feature size C (1024 like ViT-L).
        conf_max: C on a fully textured, frontal pixel (C lies in ``[1, conf_max]``).
        q_max, q_floor: Q on a reliable co-visible pixel / on a flat or non-co-visible pixel.
        match_tol: mean absolute difference (grey levels) under which an unregistered image is matched to its nearest
            frame; beyond it ``encode`` raises ``ValueError``.
        cache_size: frames whose ground truth is kept per network size.
    """

    def __init__(
        self,
        sequence: SyntheticSequence,
        noise: OracleNoise | None = None,
        feat_dim: int = 1024,
        conf_max: float = 20.0,
        q_max: float = 10.0,
        q_floor: float = 0.1,
        match_tol: float = 6.0,
        cache_size: int = 128,
    ) -> None:
        if not isinstance(sequence, SyntheticSequence):
            raise TypeError(f"sequence must be a SyntheticSequence, got {type(sequence).__name__}")
        if feat_dim < 8:
            raise ValueError(f"feat_dim must be >= 8, got {feat_dim}")
        if not (conf_max >= 1.0 and q_max > 0 and q_floor >= 0):
            raise ValueError("need conf_max >= 1, q_max > 0, q_floor >= 0")
        self.seq = sequence
        self.noise = OracleNoise() if noise is None else noise
        if not isinstance(self.noise, OracleNoise):
            raise TypeError(f"noise must be an OracleNoise, got {type(self.noise).__name__}")
        self.feat_dim = int(feat_dim)
        self.conf_max = float(conf_max)
        self.q_max = float(q_max)
        self.q_floor = float(q_floor)
        self.match_tol = float(match_tol)
        self.cache_size = int(cache_size)
        self._views: dict[tuple[int, int], _ViewSet] = {}
        # fixed random projection of pooled patch content -> token features
        rng = np.random.default_rng(1234)
        self._proj = rng.normal(size=(51, self.feat_dim)).astype(np.float32) * np.float32(1.5 / math.sqrt(51))
        self._bias = rng.normal(size=(self.feat_dim,)).astype(np.float32) * np.float32(0.5)
        # token-signature registry: sha1 -> (frame, H, W); plus matrices for approximate lookup per size
        self._sig_keys: dict[bytes, tuple[int, int, int]] = {}
        self._sig_mats: dict[tuple[int, int], tuple[list[int], list[np.ndarray]]] = {}
        self.n_encode = 0
        self.n_decode = 0

    # ------------------------------------------------------------------------------------------------ registry / GT
    def _view(self, H: int, W: int) -> _ViewSet:
        key = (int(H), int(W))
        if key in self._views:
            return self._views[key]
        if H % PATCH or W % PATCH:
            raise ValueError(f"network image size {W}x{H} is not a multiple of {PATCH}")
        seqW, seqH = self.seq.size
        if (H, W) == (seqH, seqW):
            vs = _ViewSet(H, W, self.seq.K.copy(), self.seq.images, True)
        else:
            vs = self._preprocessed_view(H, W)
        for t in range(len(vs.uimgs) - 1, -1, -1):  # first index wins for identical images
            vs.keys[hashlib.sha1(np.ascontiguousarray(vs.uimgs[t]).tobytes()).digest()] = t
        vs.thumbs = np.stack([self._thumb(u) for u in vs.uimgs])
        self._views[key] = vs
        return vs

    def _preprocessed_view(self, H: int, W: int) -> _ViewSet:
        try:
            from mast3r_slam_ros.geometry import adjust_intrinsics, preprocess_image
        except ImportError as e:  # pragma: no cover - only before the geometry module exists
            raise ValueError(
                f"network size {W}x{H} differs from the sequence size {self.seq.size}; the oracle needs "
                f"mast3r_slam_ros.geometry.preprocess_image to map them ({e})") from e
        for size in (512, 224):
            pre = preprocess_image(self.seq.images[0], size=size)
            if tuple(int(v) for v in np.asarray(pre.true_shape).reshape(-1)[:2]) == (H, W):
                break
        else:
            raise ValueError(f"no preprocess_image size (512 or 224) maps the sequence images "
                             f"{self.seq.size[0]}x{self.seq.size[1]} to {W}x{H}")
        if self.seq.scene is None:
            raise ValueError("re-rendering ground truth at another size needs sequence.scene")
        uimgs = np.stack([np.asarray(preprocess_image(im, size=size).uimg) for im in self.seq.images])
        K = np.asarray(adjust_intrinsics(np.asarray(self.seq.K, dtype=np.float64), pre.transform), dtype=np.float64)
        return _ViewSet(H, W, K, uimgs, False)

    @staticmethod
    def _thumb(u8: np.ndarray) -> np.ndarray:
        return cv2.resize(u8, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)

    def network_K(self, true_shape: tuple[int, int] | Tensor | np.ndarray) -> np.ndarray:
        """``K [3,3] float64`` of the network image of size ``true_shape = (H, W)``."""
        H, W = (int(v) for v in np.asarray(true_shape).reshape(-1)[:2])
        return self._view(H, W).K.copy()

    def gt_pose(self, i: int) -> np.ndarray:
        """Ground-truth ``T_WC [4,4] float64`` of sequence frame ``i``."""
        return self.seq.T_WC_gt[int(i)].copy()

    def frame_gt(self, i: int, true_shape: tuple[int, int]) -> _FrameGT:
        """Ground truth of frame ``i`` at network size ``true_shape = (H, W)`` (cached)."""
        H, W = (int(v) for v in np.asarray(true_shape).reshape(-1)[:2])
        vs = self._view(H, W)
        i = int(i)
        if not 0 <= i < len(self.seq):
            raise IndexError(f"frame {i} out of range [0, {len(self.seq)})")
        if i in vs.cache:
            vs.cache.move_to_end(i)
            return vs.cache[i]
        if vs.native:
            depth = self.seq.depths[i].astype(np.float64)
            face = self.seq.faces[i] if self.seq.faces is not None else None
            if face is None and self.seq.scene is not None:
                face = self.seq.scene.render(self.seq.T_WC_gt[i], vs.K, (W, H), with_color=False)[2]
        else:
            _, d, face = self.seq.scene.render(self.seq.T_WC_gt[i], vs.K, (W, H), with_color=False)
            depth = d.astype(np.float64)
        Xc = _backproject(depth, vs.K)
        T = self.seq.T_WC_gt[i]
        Pw = Xc @ T[:3, :3].T + T[:3, 3]
        # texture weight from the image: blurred gradient magnitude (grey levels / px), 0 on flat paint, 1 on photos
        g = cv2.cvtColor(vs.uimgs[i], cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) / 8.0
        blur = cv2.GaussianBlur(mag, (0, 0), 1.5).astype(np.float64)
        tex = np.clip((blur - 0.75) / 2.25, 0.0, 1.0)
        # geometric reliability: incidence angle and depth discontinuities
        ray = Xc / np.linalg.norm(Xc, axis=-1, keepdims=True)
        n_w = self.seq.scene.face_normal[face] if (self.seq.scene is not None and face is not None) else None
        if n_w is not None:
            n_c = n_w @ T[:3, :3]  # world normal -> camera frame (R^T n)
            cos_inc = np.abs(np.sum(n_c * ray, axis=-1))
        else:
            cos_inc = np.ones_like(depth)
        inc = np.clip((cos_inc - 0.1) / 0.3, 0.0, 1.0)
        logz = np.log(np.maximum(depth, 1e-6)).astype(np.float32)
        jump = np.maximum(np.abs(cv2.Sobel(logz, cv2.CV_32F, 1, 0, ksize=1)),
                          np.abs(cv2.Sobel(logz, cv2.CV_32F, 0, 1, ksize=1)))
        edge = cv2.dilate((jump > 0.08).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        geo = inc * np.where(edge, 0.1, 1.0)
        gt = _FrameGT(depth, Xc, Pw, tex, geo)
        vs.cache[i] = gt
        if len(vs.cache) > self.cache_size:
            vs.cache.popitem(last=False)
        return gt

    # ------------------------------------------------------------------------------------------------ identification
    def identify(self, img: Tensor) -> int:
        """Sequence frame index of one network image ``img [3,H,W]`` f32 in [-1,1] (or ``[1,3,H,W]``).

        Exact match of the image re-quantized to uint8, else the nearest frame by a 16x16 thumbnail if its mean
        absolute difference is below ``match_tol`` grey levels. Raises ``ValueError`` if no frame matches.
        """
        if img.dim() == 4:
            if img.shape[0] != 1:
                raise ValueError(f"identify takes one image, got batch {tuple(img.shape)}")
            img = img[0]
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"expected img [3,H,W], got {tuple(img.shape)}")
        H, W = int(img.shape[1]), int(img.shape[2])
        vs = self._view(H, W)
        u8 = ((img.detach().float().cpu().permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)
        u8 = u8.astype(np.uint8)
        t = vs.keys.get(hashlib.sha1(np.ascontiguousarray(u8).tobytes()).digest())
        if t is not None:
            return int(t)
        d = np.abs(vs.thumbs - self._thumb(u8)[None]).mean(axis=1)
        best = int(np.argmin(d))
        err = float(np.abs(vs.uimgs[best].astype(np.float32) - u8.astype(np.float32)).mean())
        if err > self.match_tol:
            raise ValueError(f"image {W}x{H} matches no frame of sequence '{self.seq.name}' (nearest frame {best}: "
                             f"mean abs difference {err:.1f} > match_tol {self.match_tol} grey levels)")
        return best

    def _signature(self, feat_b: Tensor) -> np.ndarray:
        P = feat_b.shape[0]
        step = max(1, P // 64)
        return feat_b[::step, :32].detach().float().cpu().numpy().reshape(-1)

    def _frame_of_feat(self, feat_b: Tensor, H: int, W: int) -> int:
        sig = self._signature(feat_b)
        hit = self._sig_keys.get(hashlib.sha1(sig.astype(np.float32).tobytes()).digest())
        if hit is not None and hit[1:] == (H, W):
            return hit[0]
        frames, sigs = self._sig_mats.get((H, W), ([], []))
        if not frames:
            raise ValueError(f"decode got features of size {W}x{H} that this oracle never encoded")
        S = np.stack(sigs)
        d = np.linalg.norm(S - sig[None], axis=1)
        best = int(np.argmin(d))
        if d[best] > 0.02 * (np.linalg.norm(sig) + 1e-6):
            raise ValueError("decode got features that do not come from this oracle's encode "
                             f"(nearest encoded frame {frames[best]}, relative distance "
                             f"{d[best] / (np.linalg.norm(sig) + 1e-6):.3f})")
        return frames[best]

    # ------------------------------------------------------------------------------------------------ Predictor API
    def _patch_features(self, img: Tensor) -> Tensor:
        """``img [3,H,W]`` -> ``[P,C]`` f32 tokens from pooled patch content (pure function of the image)."""
        _, H, W = img.shape
        x = img.detach().float().cpu().numpy()
        h, w = H // PATCH, W // PATCH
        # 4x4 average pooling inside every 16x16 patch -> [P, 3*4*4]
        p = x.reshape(3, h, 4, 4, w, 4, 4).mean(axis=(3, 6)).transpose(1, 4, 0, 2, 3).reshape(h * w, 48)
        mean = p.mean(axis=1, keepdims=True)
        std = p.std(axis=1, ddof=1, keepdims=True)
        color = x.reshape(3, h, PATCH, w, PATCH).mean(axis=(2, 4)).transpose(1, 2, 0).reshape(h * w, 3)
        f = np.concatenate([(p - mean) / (std + 0.1), 2.0 * color], axis=1).astype(np.float32)
        # token norm grows with the patch contrast (like attention on informative tokens), so norm-based token
        # selection keeps textured patches
        contrast = x.reshape(3, h, PATCH, w, PATCH).std(axis=(0, 2, 4)).reshape(h * w, 1)
        weight = 0.3 + 0.7 * np.minimum(1.0, contrast / 0.1)
        return torch.from_numpy((weight * np.tanh(f @ self._proj + self._bias)).astype(np.float32))

    @torch.no_grad()
    def encode(self, img: Tensor, true_shape: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder stand-in.

        Args:
            img: ``[B,3,H,W]`` f32 in [-1,1], each image a (preprocessed) frame of the sequence; H, W multiples of 16.
            true_shape: ``[B,2]`` int (H, W).
        Returns:
            ``feat [B,P,C]`` f32 (P = H*W/256, C = ``feat_dim``) on ``img.device``, ``pos [B,P,2]`` int64 (row, col).
        Raises:
            ValueError: bad shapes, or an image that is not a frame of the sequence.
        """
        if not isinstance(img, Tensor) or img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"img must be a tensor [B,3,H,W], got {getattr(img, 'shape', type(img))}")
        B, _, H, W = img.shape
        ts = torch.as_tensor(true_shape).reshape(-1, 2)
        if ts.shape[0] not in (1, B) or any(int(ts[k, 0]) != H or int(ts[k, 1]) != W for k in range(ts.shape[0])):
            raise ValueError(f"true_shape {ts.tolist()} does not match img {tuple(img.shape)}")
        if H % PATCH or W % PATCH:
            raise ValueError(f"image size {W}x{H} is not a multiple of {PATCH}")
        feats = []
        for b in range(B):
            t = self.identify(img[b])
            f = self._patch_features(img[b])
            sig = self._signature(f)
            self._sig_keys.setdefault(hashlib.sha1(sig.astype(np.float32).tobytes()).digest(), (t, H, W))
            frames, sigs = self._sig_mats.setdefault((H, W), ([], []))
            if t not in frames:
                frames.append(t)
                sigs.append(sig)
            feats.append(f)
        self.n_encode += B
        h, w = H // PATCH, W // PATCH
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1).to(torch.int64)
        return torch.stack(feats).to(img.device), pos[None].expand(B, -1, -1).contiguous().to(img.device)

    supports_partial_decode = True  # decode accepts need_res2 / need_desc like the network model

    @torch.no_grad()
    def decode(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor, true_shape: Tensor,
               need_res2: bool = True, need_desc: bool = True) -> tuple[HeadOutput, HeadOutput | None]:
        """Decoder + heads stand-in (spec §3.3): ``res1`` = view 1 in camera 1, ``res2`` = view 2 in camera 1.

        Args:
            feat1, feat2: ``[B,P,C]`` tokens from ``encode`` (any float dtype / device).
            pos1, pos2: ``[B,P,2]`` int64 token grid (checked for shape only).
            true_shape: ``[B,2]`` or ``[2]`` int (H, W) of the network images.
            need_res2: False returns ``res2 = None``. need_desc: False returns ``desc = desc_conf = None``.
        Returns:
            ``(res1, res2)`` ``HeadOutput`` with ``pts3d [B,H,W,3]``, ``conf [B,H,W]`` (>= 1), ``desc [B,H,W,24]``
            (unit), ``desc_conf [B,H,W]`` (>= 0), float32 on ``feat1.device``.
        Raises:
            ValueError: shape mismatch or features not produced by this oracle.
        """
        if feat1.dim() != 3 or feat1.shape != feat2.shape:
            raise ValueError(f"feat1/feat2 must both be [B,P,C], got {tuple(feat1.shape)} / {tuple(feat2.shape)}")
        B, P, _ = feat1.shape
        if pos1.shape[:2] != (B, P) or pos2.shape[:2] != (B, P):
            raise ValueError("pos1/pos2 must be [B,P,2] matching the features")
        ts = torch.as_tensor(true_shape).reshape(-1, 2)
        H, W = int(ts[0, 0]), int(ts[0, 1])
        if (H // PATCH) * (W // PATCH) != P:
            raise ValueError(f"true_shape {H}x{W} does not match P={P} tokens")
        outs = [[], []]
        for b in range(B):
            i = self._frame_of_feat(feat1[b], H, W)
            j = self._frame_of_feat(feat2[b], H, W)
            r1, r2 = self.pair_outputs(i, j, (H, W), need_desc=need_desc)
            outs[0].append(r1)
            outs[1].append(r2)
        self.n_decode += B
        dev = feat1.device

        def pack(rs: list[dict]) -> HeadOutput:
            return HeadOutput(*(torch.from_numpy(np.stack([r[k] for r in rs])).to(dev) if rs[0][k] is not None
                                else None for k in ("pts3d", "conf", "desc", "desc_conf")))

        return pack(outs[0]), (pack(outs[1]) if need_res2 else None)

    # ------------------------------------------------------------------------------------------------ the pair model
    def _visibility(self, src: _FrameGT, T_WC_src: np.ndarray, dst: _FrameGT, T_WC_dst: np.ndarray, K: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """For every pixel of ``src``: is its surface point seen by camera ``dst`` (in view, not occluded), and the
        linear index ``u + W*v`` of the nearest ``dst`` pixel. Returns ``(visible [H,W] bool, idx [H,W] int64)``."""
        H, W = src.depth.shape
        T_dst_inv = np.linalg.inv(T_WC_dst)
        Xd = src.Pw @ T_dst_inv[:3, :3].T + T_dst_inv[:3, 3]
        z = Xd[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = K[0, 0] * Xd[..., 0] / z + K[0, 2]
            v = K[1, 1] * Xd[..., 1] / z + K[1, 2]
        ui = np.rint(np.nan_to_num(u, nan=-1.0, posinf=-1.0, neginf=-1.0)).astype(np.int64)
        vi = np.rint(np.nan_to_num(v, nan=-1.0, posinf=-1.0, neginf=-1.0)).astype(np.int64)
        inside = (z > 1e-6) & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
        uc, vc = np.clip(ui, 0, W - 1), np.clip(vi, 0, H - 1)
        zd = dst.depth[vc, uc]
        visible = inside & (np.abs(zd - z) < 0.02 * np.maximum(z, 1e-6) + 1e-3)
        return visible, (uc + W * vc)

    def gt_matches(self, i: int, j: int, true_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth correspondences of the pair: for every pixel n of frame ``j`` (linear index), the pixel of
        frame ``i`` (``u + W*v``) that sees the same surface point, and whether it is visible and not occluded there.
        This is what ``matching.match(X_ii, X_ji, ...)`` should recover (``idx_i2j`` indexed by frame-j pixel).
        Returns ``(idx [H*W] int64, valid [H*W] bool)``."""
        H, W = (int(v) for v in np.asarray(true_shape).reshape(-1)[:2])
        K = self._view(H, W).K
        gi, gj = self.frame_gt(i, (H, W)), self.frame_gt(j, (H, W))
        vis, idx = self._visibility(gj, self.seq.T_WC_gt[j], gi, self.seq.T_WC_gt[i], K)
        return idx.reshape(-1), vis.reshape(-1)

    def _rng(self, i: int, j: int) -> np.random.Generator:
        return np.random.default_rng([int(self.noise.seed), 7, int(i), int(j)])

    def _noisy_depth(self, gt: _FrameGT, rng: np.random.Generator) -> np.ndarray:
        nz = self.noise
        H, W = gt.depth.shape
        log_noise = np.zeros((H, W))
        if nz.depth_rel > 0:
            sigma = nz.depth_rel * (1.0 + nz.textureless_gain * (1.0 - gt.tex))
            log_noise += sigma * rng.standard_normal((H, W))
        if nz.depth_bias > 0:
            ctrl = rng.standard_normal((4, 5)).astype(np.float32)
            log_noise += nz.depth_bias * cv2.resize(ctrl, (W, H), interpolation=cv2.INTER_CUBIC).astype(np.float64)
        return gt.depth * np.exp(log_noise)

    def _descriptors(self, gt: _FrameGT, rng: np.random.Generator) -> np.ndarray:
        d = descriptor_embedding(gt.Pw)
        if self.noise.desc_sigma > 0:
            sigma = (self.noise.desc_sigma * (1.0 + self.noise.textureless_gain * (1.0 - gt.tex))).astype(np.float32)
            d = d + sigma[..., None] * rng.standard_normal(d.shape, dtype=np.float32)
            d /= np.linalg.norm(d, axis=-1, keepdims=True)
        return d

    def pair_outputs(self, i: int, j: int, true_shape: tuple[int, int], need_desc: bool = True) -> tuple[dict, dict]:
        """NumPy outputs of ``decode`` for the ordered frame pair (i, j) at network size ``(H, W)``.

        Returns two dicts (view i in camera i, view j in camera i) with ``pts3d [H,W,3]``, ``conf [H,W]``,
        ``desc [H,W,24]``, ``desc_conf [H,W]`` float32 (``desc`` / ``desc_conf`` None without ``need_desc``).
        Deterministic for a given pair and ``noise.seed`` (descriptor noise is drawn last, so ``need_desc`` does not
        change the geometry).
        """
        H, W = (int(v) for v in np.asarray(true_shape).reshape(-1)[:2])
        K = self._view(H, W).K
        gi, gj = self.frame_gt(i, (H, W)), self.frame_gt(j, (H, W))
        Ti, Tj = self.seq.T_WC_gt[i], self.seq.T_WC_gt[j]
        nz = self.noise
        rng = self._rng(i, j)
        s = math.exp(nz.scale_log_sigma * rng.standard_normal()) if nz.scale_log_sigma > 0 else 1.0
        zi = self._noisy_depth(gi, rng)
        zj = self._noisy_depth(gj, rng)
        X_ii = _backproject(zi, K)
        X_jj = _backproject(zj, K)
        T_ij = np.linalg.inv(Ti) @ Tj  # camera j -> camera i
        R, t = T_ij[:3, :3], T_ij[:3, 3].copy()
        if nz.rot_deg > 0:
            R = _rotvec_to_matrix(rng.standard_normal(3) * math.radians(nz.rot_deg) / math.sqrt(3)) @ R
        if nz.trans_rel > 0:
            t = t + rng.standard_normal(3) * nz.trans_rel * np.linalg.norm(t) / math.sqrt(3)
        X_ji = X_jj @ R.T + t
        if i == j:
            vis_i = np.ones((H, W), bool)
            vis_j = vis_i
        elif not need_desc:  # visibility only lowers C of view 2 here
            vis_i = np.ones((H, W), bool)
            vis_j, _ = self._visibility(gj, Tj, gi, Ti, K)
        else:
            vis_i, _ = self._visibility(gi, Ti, gj, Tj, K)
            vis_j, _ = self._visibility(gj, Tj, gi, Ti, K)
        rel_i = gi.tex * gi.geo
        rel_j = gj.tex * gj.geo
        out1 = {
            "pts3d": (s * X_ii).astype(np.float32),
            "conf": (1.0 + (self.conf_max - 1.0) * rel_i).astype(np.float32),
            "desc": self._descriptors(gi, rng) if need_desc else None,
            "desc_conf": (self.q_floor + self.q_max * rel_i * vis_i).astype(np.float32) if need_desc else None,
        }
        out2 = {
            "pts3d": (s * X_ji).astype(np.float32),
            "conf": (1.0 + (self.conf_max - 1.0) * rel_j * (0.25 + 0.75 * vis_j)).astype(np.float32),
            "desc": self._descriptors(gj, rng) if need_desc else None,
            "desc_conf": (self.q_floor + self.q_max * rel_j * vis_j).astype(np.float32) if need_desc else None,
        }
        return out1, out2
