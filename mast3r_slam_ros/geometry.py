"""Camera geometry and the MASt3R image preprocessing.

Conventions: pixel coordinates ``(u, v)`` = (column, row) with integer values at pixel **centres** (OpenCV / upstream
``get_pixel_coords``); camera frame = OpenCV optical frame (x right, y down, z forward); intrinsics ``K`` are 3×3
pinhole matrices ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` in pixels. Points / pointmaps are in the units of the
MASt3R pointmaps (metric up to an unknown scale).

Sources: image preprocessing and intrinsics adjustment — spec/upstream_algorithm.md §2 (``mast3r_utils.resize_img``,
``dataloader.Intrinsics``); projection, back-projection and ``constrain_points_to_ray`` — §5.3 (upstream
``geometry.py``); rays and distances — §5.2.

Deviation from upstream, on purpose (pixel geometry only; the network input is bit-identical): upstream adjusts the
principal point with ``cx' = cx/scale_w - (W - Wc)/2``, which (a) ignores that PIL's resize maps pixel *centres*
(``u_r + 0.5 = (u + 0.5)/scale``; 0.1 px at 640→512) and (b) is 0.5 px off when the resized side is odd (EuRoC:
327 → 320 rows, the crop actually starts at row 3, not 3.5). ``adjust_intrinsics`` and the pixel maps here use the exact
mapping by default; ``convention="upstream"`` reproduces upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "ImageTransform",
    "Preprocessed",
    "preprocess_image",
    "adjust_intrinsics",
    "restore_intrinsics",
    "input_to_network_pixel",
    "network_to_input_pixel",
    "pixel_grid",
    "point_to_ray_dist",
    "ray_dist_to_point",
    "project_calib",
    "backproject",
    "constrain_points_to_ray",
]

Convention = Literal["exact", "upstream"]
_SUPPORTED_SIZES = (512, 224)


# ------------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class ImageTransform:
    """How an input image of ``in_size`` became the network image of ``out_size`` (spec §2 step 5).

    Attributes:
        scale_w, scale_h: ``W0/Wr``, ``H0/Hr`` (input size over resized, pre-crop size; upstream ``scale_w/h``).
        half_crop_w, half_crop_h: left / top offset of the centre crop in resized pixels (integers stored as float).
            Upstream stores ``(Wr - W)/2`` here, which differs by 0.5 for odd ``Wr``; see ``upstream_half_crop``.
        in_size: ``(W0, H0)`` input image size. out_size: ``(W, H)`` network image size.
    """

    scale_w: float
    scale_h: float
    half_crop_w: float
    half_crop_h: float
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def resized_size(self) -> tuple[int, int]:
        """``(Wr, Hr)``: size after the resize, before the crop."""
        return (int(round(self.in_size[0] / self.scale_w)), int(round(self.in_size[1] / self.scale_h)))

    @property
    def upstream_half_crop(self) -> tuple[float, float]:
        """Upstream's ``((Wr - W)/2, (Hr - H)/2)``."""
        wr, hr = self.resized_size
        return ((wr - self.out_size[0]) / 2.0, (hr - self.out_size[1]) / 2.0)


@dataclass
class Preprocessed:
    """Network-ready image (spec §2).

    Attributes:
        img: ``[1, 3, H, W]`` float32 in [-1, 1] (``(x/255 - 0.5)/0.5``), CPU.
        true_shape: ``[1, 2]`` int32 ``(H, W)``.
        uimg: ``[H, W, 3]`` uint8 CPU tensor, the resized and cropped RGB image.
        transform: the ``ImageTransform`` from the input image.
    """

    img: Tensor
    true_shape: Tensor
    uimg: Tensor
    transform: ImageTransform


def _to_uint8_rgb(rgb) -> np.ndarray:
    if isinstance(rgb, Tensor):
        rgb = rgb.detach().cpu().numpy()
    if isinstance(rgb, Image.Image):
        rgb = np.asarray(rgb.convert("RGB"))
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"preprocess_image: expected an [H, W, 3] numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preprocess_image: expected an RGB image of shape [H, W, 3], got {rgb.shape}"
                         + (" (grayscale: stack it to 3 channels)" if rgb.ndim == 2 else ""))
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"preprocess_image: empty image of shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if rgb.dtype in (np.float16, np.float32, np.float64):
        # upstream: PIL.Image.fromarray(np.uint8(img * 255)) with img in [0, 1] -- truncation, not rounding
        # (computed in the input's float dtype, as upstream; values outside [0, 1] are clipped first)
        return np.ascontiguousarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    raise TypeError(f"preprocess_image: image dtype must be uint8 (0..255) or float in [0, 1], got {rgb.dtype}")


def _resize_long_edge(img: Image.Image, long_edge: int) -> Image.Image:
    """Resize so that the long side is ``long_edge``: LANCZOS when shrinking, else BICUBIC (upstream rules, §2)."""
    S = max(img.size)
    interp = Image.LANCZOS if S > long_edge else Image.BICUBIC
    new_size = tuple(int(round(x * long_edge / S)) for x in img.size)
    return img.resize(new_size, interp)


def preprocess_image(rgb_u8, size: int = 512, *, device: torch.device | str | None = None) -> Preprocessed:
    """Resize, centre-crop and normalise an RGB image for MASt3R (spec §2, upstream ``resize_img``).

    size 512: long side → 512 (``int(round(x*512/S))``), then centre crop to multiples of 16
    (``half = ((2*(W//2))//16)*8``); a square result is cropped to 4:3 (512×384).
    size 224: short side → 224 (long side ``round(224*max(W/H, H/W))``), then centred square crop.
    Examples: 640×480 → 512×384; 752×480 → 512×327 → 512×320; 512×512 → 512×384.

    Args:
        rgb_u8: ``[H0, W0, 3]`` RGB, uint8, or float in [0, 1] (converted with upstream's truncation
            ``uint8(x*255)``); a CPU tensor or a PIL image is accepted too.
        size: 512 or 224.
        device: where ``img`` is built (default CPU). On a CUDA device the uint8 crop is uploaded through pinned
            memory without blocking and normalized there (4× fewer bytes over PCIe than a float image, no host
            sync); the values are identical to the CPU result (same float32 operations).
    Returns:
        ``Preprocessed`` (img ``[1,3,H,W]`` f32 on ``device``, true_shape ``[1,2]`` i32, uimg ``[H,W,3]`` u8 on the
        CPU, transform).
    Raises:
        TypeError: not an array / unsupported dtype. ValueError: empty image, not 3 channels, or unsupported size.
    """
    if size not in _SUPPORTED_SIZES:
        raise ValueError(f"preprocess_image: size must be one of {_SUPPORTED_SIZES}, got {size!r}")
    arr = _to_uint8_rgb(rgb_u8)
    H0, W0 = arr.shape[:2]
    img = Image.fromarray(arr)
    if size == 224:
        img = _resize_long_edge(img, int(round(size * max(W0 / H0, H0 / W0))))
    else:
        img = _resize_long_edge(img, size)
    Wr, Hr = img.size
    cx, cy = Wr // 2, Hr // 2
    if size == 224:
        half = min(cx, cy)
        left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if Wr == Hr:  # square_ok=False upstream: square images become 4:3
            halfh = (3 * halfw) // 4
        left, top, right, bottom = cx - halfw, cy - halfh, cx + halfw, cy + halfh
    if right <= left or bottom <= top:
        raise ValueError(f"preprocess_image: image {W0}x{H0} is too small for size {size} (crop would be empty)")
    crop = np.ascontiguousarray(np.asarray(img.crop((left, top, right, bottom))))
    H, W = crop.shape[:2]
    uimg = torch.from_numpy(crop.copy())
    x = normalize_image(uimg, device)
    transform = ImageTransform(scale_w=W0 / Wr, scale_h=H0 / Hr, half_crop_w=float(left), half_crop_h=float(top),
                               in_size=(W0, H0), out_size=(W, H))
    return Preprocessed(img=x, true_shape=torch.tensor([[H, W]], dtype=torch.int32), uimg=uimg,
                        transform=transform)


def normalize_image(uimg: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Network input of an RGB crop: ``[H,W,3]`` uint8 -> ``[1,3,H,W]`` float32 ``(x/255 − 0.5)/0.5`` in [-1, 1]
    (spec §2, upstream ``ImgNorm``), computed on ``device`` (default: where ``uimg`` is).

    A CPU ``uimg`` bound for a CUDA device is copied into pinned memory (torch's caching host allocator, which keeps
    the block alive until the copy has run) and uploaded with ``non_blocking=True``, so the caller never waits on the
    GPU queue. Raises: TypeError if ``uimg`` is not a uint8 ``[H,W,3]`` tensor.
    """
    if not isinstance(uimg, Tensor) or uimg.dtype != torch.uint8 or uimg.ndim != 3 or uimg.shape[2] != 3:
        raise TypeError(f"normalize_image expects a uint8 [H,W,3] tensor, got "
                        f"{getattr(uimg, 'dtype', type(uimg).__name__)} {tuple(getattr(uimg, 'shape', ()))}")
    dev = torch.device(device) if device is not None else uimg.device
    if dev.type == "cuda" and uimg.device.type == "cpu":
        uimg = uimg.contiguous().pin_memory().to(dev, non_blocking=True)
    else:
        uimg = uimg.to(dev)
    x = uimg.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div(255.0)
    return x.sub(0.5).div(0.5).contiguous()


def _crop_offsets(transform: ImageTransform, convention: Convention) -> tuple[float, float, float]:
    """(offset_u, offset_v, centre_term) such that ``u_net = (u_in + c)/scale - c - offset``."""
    if convention == "exact":
        return transform.half_crop_w, transform.half_crop_h, 0.5
    if convention == "upstream":
        hw, hh = transform.upstream_half_crop
        return hw, hh, 0.0
    raise ValueError(f"convention must be 'exact' or 'upstream', got {convention!r}")


def input_to_network_pixel(uv, transform: ImageTransform, convention: Convention = "exact"):
    """Map input-image pixels to network-image pixels: ``u' = (u + ½)/scale_w − ½ − crop_left`` (same for v).

    Args:
        uv: ``[..., 2]`` (u, v) numpy array or tensor (float). transform: from ``preprocess_image``.
        convention: "exact" (pixel-centre resize, true crop offset) or "upstream" (``u/scale_w − (Wr−W)/2``).
    Returns:
        ``[..., 2]`` of the same type.
    """
    ou, ov, c = _crop_offsets(transform, convention)
    u = (uv[..., 0] + c) / transform.scale_w - c - ou
    v = (uv[..., 1] + c) / transform.scale_h - c - ov
    return torch.stack((u, v), -1) if isinstance(uv, Tensor) else np.stack((u, v), -1)


def network_to_input_pixel(uv, transform: ImageTransform, convention: Convention = "exact"):
    """Inverse of ``input_to_network_pixel``: network-image pixel ``[..., 2]`` → input-image pixel ``[..., 2]``."""
    ou, ov, c = _crop_offsets(transform, convention)
    u = (uv[..., 0] + ou + c) * transform.scale_w - c
    v = (uv[..., 1] + ov + c) * transform.scale_h - c
    return torch.stack((u, v), -1) if isinstance(uv, Tensor) else np.stack((u, v), -1)


def _check_K(K) -> None:
    if tuple(K.shape[-2:]) != (3, 3):
        raise ValueError(f"intrinsics K must be [3, 3], got shape {tuple(K.shape)}")


def _float_copy(K):
    """Float copy of a tensor / array (integer inputs become float64)."""
    if isinstance(K, Tensor):
        return K.clone() if K.is_floating_point() else K.to(torch.float64)
    K = np.asarray(K)
    return np.array(K, dtype=K.dtype if np.issubdtype(K.dtype, np.floating) else np.float64, copy=True)


def adjust_intrinsics(K, transform: ImageTransform, convention: Convention = "exact"):
    """Intrinsics of the network image from those of the input image (spec §2, ``dataloader.Intrinsics``).

    ``fx' = fx/scale_w``, ``fy' = fy/scale_h``, ``s' = s/scale_w``, and the principal point moves with
    ``input_to_network_pixel`` (exact: ``cx' = (cx + ½)/scale_w − ½ − crop_left``; upstream:
    ``cx' = cx/scale_w − (Wr−W)/2``). A 3-D point in the camera frame then projects with ``K'`` exactly where its
    projection with ``K`` lands after the preprocessing.

    Args:
        K: ``[3, 3]`` numpy array or tensor (pixels of the input image, after any undistortion).
    Returns:
        ``[3, 3]`` of the same type and dtype.
    Raises:
        ValueError: K is not 3×3, or an unknown convention.
    """
    _check_K(K)
    ou, ov, c = _crop_offsets(transform, convention)
    K2 = _float_copy(K)
    K2[..., 0, :] = K[..., 0, :] / transform.scale_w
    K2[..., 1, :] = K[..., 1, :] / transform.scale_h
    K2[..., 0, 2] = (K[..., 0, 2] + c) / transform.scale_w - c - ou
    K2[..., 1, 2] = (K[..., 1, 2] + c) / transform.scale_h - c - ov
    return K2


def restore_intrinsics(K_net, transform: ImageTransform, convention: Convention = "exact"):
    """Inverse of ``adjust_intrinsics``: network-image ``K'`` ``[3, 3]`` → input-image ``K``."""
    _check_K(K_net)
    ou, ov, c = _crop_offsets(transform, convention)
    K = _float_copy(K_net)
    K[..., 0, :] = K_net[..., 0, :] * transform.scale_w
    K[..., 1, :] = K_net[..., 1, :] * transform.scale_h
    K[..., 0, 2] = (K_net[..., 0, 2] + ou + c) * transform.scale_w - c
    K[..., 1, 2] = (K_net[..., 1, 2] + ov + c) * transform.scale_h - c
    return K


# --------------------------------------------------------------------------------------------- pinhole geometry
def pixel_grid(H: int, W: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
               ) -> Tensor:
    """Pixel coordinates ``[H, W, 2]`` with ``[..., 0] = u`` (column) and ``[..., 1] = v`` (row), integer-valued.

    Row-major flattening (``reshape(H*W, 2)``) matches the pointmap order ``[HW, 3]`` (upstream ``get_pixel_coords``).
    """
    if H <= 0 or W <= 0:
        raise ValueError(f"pixel_grid: H and W must be positive, got {H}x{W}")
    v, u = torch.meshgrid(torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack((u, v), dim=-1)


def point_to_ray_dist(X: Tensor) -> tuple[Tensor, Tensor]:
    """Split points into unit rays and distances (spec §5.2, upstream ``geometry.point_to_ray_dist``).

    Args:
        X: ``[..., 3]`` points in a camera frame.
    Returns:
        ``(ray [..., 3], dist [..., 1])`` with ``ray = X/|X|``, ``dist = |X|``; a zero point gives a zero ray
        (instead of upstream's NaN).
    """
    if X.shape[-1] != 3:
        raise ValueError(f"point_to_ray_dist: expected [..., 3], got {tuple(X.shape)}")
    dist = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    ray = X / dist.clamp_min(torch.finfo(X.dtype).tiny)
    return ray, dist


def ray_dist_to_point(ray: Tensor, dist: Tensor) -> Tensor:
    """``ray [..., 3] * dist [..., 1]`` → points ``[..., 3]`` (inverse of ``point_to_ray_dist``)."""
    return ray * dist


def _K_parts(K: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_K(K)
    K = torch.as_tensor(K, dtype=like.dtype, device=like.device)
    return K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 0, 1]


def project_calib(P: Tensor, K: Tensor, img_size: tuple[int, int] | None = None, border: float = 0.0,
                  z_eps: float = 0.0, jacobian: bool = False):
    """Pinhole projection to ``[u, v, log z]`` (spec §5.3, upstream ``geometry.project_calib``).

    ``u = (fx x + s y)/z + cx``, ``v = fy y/z + cy``; ``log z`` is set to 0 where ``z <= z_eps``.
    ``valid = z > z_eps`` and, when ``img_size = (H, W)`` is given, ``border < u < W−1−border`` and
    ``border < v < H−1−border`` (``border = -10`` lets projections fall up to 10 px outside).

    Args:
        P: ``[..., 3]`` points in the camera frame. K: ``[3, 3]`` (tensor or array; cast to P's dtype/device).
        jacobian: also return ``d[u, v, log z]/dP`` ``[..., 3, 3]``.
    Returns:
        ``(uv_logz [..., 3], valid [..., 1] bool)`` or ``(uv_logz, J, valid)`` with ``jacobian=True``.
    """
    if P.shape[-1] != 3:
        raise ValueError(f"project_calib: expected points [..., 3], got {tuple(P.shape)}")
    fx, fy, cx, cy, sk = _K_parts(K, P)
    x, y, z = P[..., 0:1], P[..., 1:2], P[..., 2:3]
    valid = z > z_eps
    tiny = torch.finfo(P.dtype).tiny
    z_safe = torch.where(z.abs() > tiny, z, torch.full_like(z, tiny))  # only invalid points hit the guard
    inv_z = 1.0 / z_safe
    u = (fx * x + sk * y) * inv_z + cx
    v = fy * y * inv_z + cy
    logz = torch.where(valid, torch.log(torch.where(valid, z, torch.ones_like(z))), torch.zeros_like(z))
    if img_size is not None:
        H, W = img_size
        valid = valid & (u > border) & (u < W - 1 - border) & (v > border) & (v < H - 1 - border)
    pz = torch.cat((u, v, logz), dim=-1)
    if not jacobian:
        return pz, valid
    J = torch.zeros(*P.shape[:-1], 3, 3, dtype=P.dtype, device=P.device)
    iz = inv_z[..., 0]
    J[..., 0, 0] = fx * iz
    J[..., 0, 1] = sk * iz
    J[..., 0, 2] = -(fx * x[..., 0] + sk * y[..., 0]) * iz * iz
    J[..., 1, 1] = fy * iz
    J[..., 1, 2] = -fy * y[..., 0] * iz * iz
    J[..., 2, 2] = iz
    return pz, J, valid


def backproject(u: Tensor, v: Tensor, z: Tensor, K: Tensor) -> Tensor:
    """Pixel + depth → camera-frame point: ``z·K⁻¹[u, v, 1]`` (spec §5.3, upstream ``geometry.backproject``).

    Args:
        u, v, z: broadcastable tensors ``[...]`` (pixels, depth along the optical axis). K: ``[3, 3]``.
    Returns:
        ``[..., 3]`` points ``[z (u − cx − s·yn)/fx, z yn, z]`` with ``yn = (v − cy)/fy``.
    """
    fx, fy, cx, cy, sk = _K_parts(K, z)
    yn = (v - cy) / fy
    xn = (u - cx - sk * yn) / fx
    xn, yn, z = torch.broadcast_tensors(xn, yn, z)
    return torch.stack((xn * z, yn * z, z), dim=-1)


def constrain_points_to_ray(img_size: tuple[int, int], X: Tensor, K: Tensor) -> Tensor:
    """Keep only the depth of each pixel's predicted point: ``X ← z·K⁻¹[u, v, 1]`` (spec §5.3, calibrated mode).

    Args:
        img_size: ``(H, W)`` of the network image.
        X: pointmaps ``[..., H*W, 3]`` (row-major pixels, e.g. ``[B, HW, 3]``) or ``[..., H, W, 3]``.
        K: ``[3, 3]`` intrinsics of the network image.
    Returns:
        Tensor of X's shape with every point moved onto its pixel's ray at the same z.
    Raises:
        ValueError: X's pixel dimensions do not match ``img_size``.
    """
    H, W = int(img_size[0]), int(img_size[1])
    if X.shape[-1] != 3:
        raise ValueError(f"constrain_points_to_ray: expected points [..., 3], got {tuple(X.shape)}")
    grid = pixel_grid(H, W, device=X.device, dtype=X.dtype)
    if X.dim() >= 2 and X.shape[-2] == H * W:
        grid = grid.reshape(H * W, 2)
    elif not (X.dim() >= 3 and tuple(X.shape[-3:-1]) == (H, W)):
        raise ValueError(f"constrain_points_to_ray: X of shape {tuple(X.shape)} does not match image size {H}x{W}")
    return backproject(grid[..., 0], grid[..., 1], X[..., 2], K)
