"""Synthetic textured room with exact depth and camera poses (test support, never used by the runtime).

A small NumPy ray caster (spec ``test_data.md`` §2): an axis-aligned room (5 m x 4 m x 2.6 m) whose walls, floor and
ceiling are photo mosaics, with a table, a cube on the table and a cabinet (solid axis-aligned boxes). Every tile of
every surface shows a different crop of the public-domain / CC0 photos bundled with scikit-image (``skimage/data``; no
crop is used twice, so there is no perceptual aliasing), except a 2 m wide plain-paint segment of the east wall (the
"textureless wall" case). View-independent Lambertian shading from one ceiling light.

Conventions:
- World frame: x east, y north, z up (metres); the floor is z = 0, the room spans x in [-2.5, 2.5], y in [-2, 2].
- Camera poses ``T_WC`` (camera -> world, 4x4 float64) in the OpenCV optical convention: z forward, x right, y down.
- Pinhole ``K`` with the OpenCV pixel-centre convention: pixel (u=column, v=row) has its centre at integer (u, v);
  the ray of pixel (u, v) is ``R_WC @ K^-1 [u, v, 1]``.
- ``depth`` is the z-depth (distance along the optical axis), exact in float64 (the room is closed: every ray hits).

Image size and the network size (spec ``upstream_algorithm.md`` §2, ``geometry.preprocess_image``): the
preprocessing is the identity (no resize, no crop) for 512x384 at ``size=512`` (any 512xH with H a multiple of 16,
H < 512) and for 224x224 at ``size=224``; rendering at those sizes keeps ``K`` valid for the network image unchanged.
Any size with W, H multiples of 16 also works with ``slam.system.native_preprocess`` (identity, used by SLAM tests on
small images). The default size here is 224x224 (fast tests). Any other size works too: ``OraclePredictor`` then
re-renders the ground truth at the preprocessed size with the adjusted intrinsics.

Suite (``SEQUENCES``; spec ``test_data.md`` §2.1, default frame counts at 30 Hz):
``slow_translation`` (150), ``rotation_heavy`` (150), ``loop`` (270; the last 30/270 of the sequence revisits the first
30/270, 5 cm higher), ``textureless`` (150; the middle third sees only the plain wall), plus ``static`` (30, camera
at rest).
``n_frames`` resamples the same path (frame k at path parameter k / n_frames), so fewer frames means larger steps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

__all__ = [
    "Box",
    "Room",
    "SyntheticSequence",
    "SEQUENCES",
    "build_room",
    "intrinsics_for",
    "look_at",
    "render_poses",
    "render_sequence",
    "sequence_poses",
]

ROOM_MIN = np.array([-2.5, -2.0, 0.0])
ROOM_MAX = np.array([2.5, 2.0, 2.6])
LIGHT = np.array([0.4, 0.3, 2.45])
PLAIN_COLOR = np.array([196.0, 188.0, 170.0])  # the plain-paint segment, RGB
DEFAULT_SIZE = (224, 224)  # (W, H)
DEFAULT_HFOV_DEG = 63.3  # horizontal field of view (fx = 415 at 512 px wide, spec test_data.md §2.1)

# Public-domain / CC0 images shipped inside the scikit-image wheel (licence per each loader's docstring) and how many
# non-overlapping crops (rows, cols) each one gives.
_TEXTURE_SOURCES: tuple[tuple[str, int, int], ...] = (
    ("astronaut", 3, 3),
    ("coffee", 2, 3),
    ("rocket", 2, 2),
    ("chelsea", 2, 3),
    ("hubble_deep_field", 3, 3),
    ("retina", 3, 3),
    ("immunohistochemistry", 3, 3),
    ("brick", 3, 3),
    ("grass", 3, 3),
    ("gravel", 3, 3),
    ("camera", 2, 2),
    ("cell", 2, 2),
    ("coins", 1, 2),
    ("clock", 1, 2),
    ("microaneurysms", 1, 1),
    ("text", 1, 2),
    ("page", 1, 2),
)
# A crop is used only if it is textured everywhere: at 128x128 its blurred gradient magnitude (grey levels / pixel) is
# below 1 on at most this fraction of the pixels, and its mean gradient magnitude is at least _MIN_MEAN_GRAD.
_MAX_FLAT_FRACTION = 0.15
_MIN_MEAN_GRAD = 4.0


@dataclass(frozen=True)
class Box:
    """A solid axis-aligned box seen from outside: ``lo``/``hi`` corners (metres), tiles per face (n_u, n_v)."""

    name: str
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    tiles: tuple[int, int] = (1, 1)


@dataclass
class Room:
    """The scene: an inward-facing room box plus solid boxes, every face a grid of texture tiles in one atlas.

    Faces are numbered ``6*b + 2*axis + side`` where ``b = 0`` is the room and ``b >= 1`` the solid boxes, ``axis`` in
    {0: x, 1: y, 2: z} is the face normal axis and ``side`` 0/1 the min/max plane. Built by ``build_room``.
    """

    boxes_lo: np.ndarray  # [nb,3] (row 0 = room)
    boxes_hi: np.ndarray  # [nb,3]
    box_names: list[str]
    face_normal: np.ndarray  # [F,3] unit normal pointing to the visible side
    face_grid: np.ndarray  # [F,2] int (n_u, n_v)
    face_tile0: np.ndarray  # [F] int index of the face's first tile
    tile_rect: np.ndarray  # [T,4] float (x0, y0, w, h) in the atlas, texel units
    tile_plain: np.ndarray  # [T] bool, True for the plain-paint tiles
    tile_source: list[str]  # [T] "photo:row,col" provenance of each tile
    atlas: np.ndarray  # [Ha,Wa,3] uint8
    texels_per_m: float

    # ---------------------------------------------------------------------------------------------------------------
    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact first hit of rays ``origin + t * dirs`` (float64) with the scene.

        Args:
            origin: ``[3]`` ray origin (world, metres); must lie inside the room and outside every box.
            dirs: ``[N,3]`` ray directions (any length; ``t`` is in units of ``dirs``).
        Returns:
            ``t [N]`` float64 (hit distance in units of ``dirs``), ``face [N]`` int32 face id.
        Raises:
            ValueError: if the origin is outside the room or inside a box.
        """
        o = np.asarray(origin, dtype=np.float64).reshape(3)
        d = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
        if np.any(o <= self.boxes_lo[0]) or np.any(o >= self.boxes_hi[0]):
            raise ValueError(f"camera centre {o.tolist()} is outside the room")
        for b in range(1, len(self.boxes_lo)):
            if np.all(o > self.boxes_lo[b]) and np.all(o < self.boxes_hi[b]):
                raise ValueError(f"camera centre {o.tolist()} is inside the box '{self.box_names[b]}'")
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            # Room (seen from inside): exit distance through the slab in the ray's direction, per axis.
            bound = np.where(d > 0, self.boxes_hi[0], self.boxes_lo[0])  # [N,3]
            t_axis = (bound - o) * inv
            t_axis = np.where(d == 0, np.inf, t_axis)
            axis = np.argmin(t_axis, axis=1)
            t = t_axis[np.arange(len(d)), axis]
            face = 2 * axis + (d[np.arange(len(d)), axis] > 0)
            # Solid boxes (seen from outside): slab method, entry face.
            for b in range(1, len(self.boxes_lo)):
                t1 = (self.boxes_lo[b] - o) * inv
                t2 = (self.boxes_hi[b] - o) * inv
                tmin = np.fmin(t1, t2)
                tmax = np.fmax(t1, t2)
                tmin = np.where(np.isnan(tmin), -np.inf, tmin)
                tmax = np.where(np.isnan(tmax), np.inf, tmax)
                ax_near = np.argmax(tmin, axis=1)
                t_near = tmin[np.arange(len(d)), ax_near]
                t_far = np.min(tmax, axis=1)
                hit = (t_near <= t_far) & (t_near > 1e-9) & (t_near < t)
                if np.any(hit):
                    t = np.where(hit, t_near, t)
                    side = d[np.arange(len(d)), ax_near] < 0  # entering through the max plane when moving to -axis
                    face = np.where(hit, 6 * b + 2 * ax_near + side, face)
        return t, face.astype(np.int32)

    def surface_uv(self, points: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face-local texture coordinates in [0,1] of world points lying on the given faces.

        Vertical faces: u along the horizontal in-plane axis, v downward (z from top). Horizontal faces: u along x,
        v along y. Returns ``(u [N], v [N])`` float64.
        """
        b = face // 6
        axis = (face % 6) // 2
        lo = self.boxes_lo[b]
        hi = self.boxes_hi[b]
        rel = (points - lo) / (hi - lo)  # [N,3] in [0,1]
        vertical = axis < 2
        # horizontal in-plane axis of a vertical face: y for x-faces, x for y-faces
        hax = np.where(axis == 0, 1, 0)
        u = np.where(vertical, rel[np.arange(len(face)), hax], rel[:, 0])
        v = np.where(vertical, 1.0 - rel[:, 2], rel[:, 1])
        return np.clip(u, 0.0, 1.0), np.clip(v, 0.0, 1.0)

    def shade(self, points: np.ndarray, face: np.ndarray) -> np.ndarray:
        """View-independent Lambertian shading factor in [0.35, 1] from the ceiling light. ``[N]`` float64."""
        n = self.face_normal[face]
        to_l = LIGHT - points
        dist = np.linalg.norm(to_l, axis=1)
        cos = np.clip(np.sum(n * to_l, axis=1) / np.maximum(dist, 1e-9), 0.0, 1.0)
        fall = np.minimum(1.0, (1.8 / np.maximum(dist, 1e-9)) ** 2)
        return 0.35 + 0.65 * cos * fall

    def colors(self, points: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Shaded RGB ``[N,3]`` float32 in [0,255] of world points on the given faces (bilinear texture lookup)."""
        u, v = self.surface_uv(points, face)
        grid = self.face_grid[face]
        fu = u * grid[:, 0]
        fv = v * grid[:, 1]
        iu = np.minimum(np.floor(fu).astype(np.int64), grid[:, 0] - 1)
        iv = np.minimum(np.floor(fv).astype(np.int64), grid[:, 1] - 1)
        tile = self.face_tile0[face] + iv * grid[:, 0] + iu
        lu = np.clip(fu - iu, 0.0, 1.0)
        lv = np.clip(fv - iv, 0.0, 1.0)
        rect = self.tile_rect[tile]
        x = rect[:, 0] + lu * (rect[:, 2] - 1.0)
        y = rect[:, 1] + lv * (rect[:, 3] - 1.0)
        n = len(x)
        side = int(math.ceil(math.sqrt(max(n, 1))))
        pad = side * side - n
        mapx = np.concatenate([x, np.zeros(pad)]).astype(np.float32).reshape(side, side)
        mapy = np.concatenate([y, np.zeros(pad)]).astype(np.float32).reshape(side, side)
        rgb = cv2.remap(self.atlas, mapx, mapy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        rgb = rgb.reshape(-1, 3)[:n].astype(np.float32)
        return rgb * self.shade(points, face)[:, None].astype(np.float32)

    def render(
        self,
        T_WC: np.ndarray,
        K: np.ndarray,
        size: tuple[int, int],
        supersample: int = 1,
        with_color: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Render one view.

        Args:
            T_WC: ``[4,4]`` camera -> world (OpenCV optical axes), float.
            K: ``[3,3]`` pinhole intrinsics of the output image (pixel centres at integer coordinates).
            size: ``(W, H)`` of the output image.
            supersample: colour supersampling factor per axis (``s*s`` rays per pixel, box filter); depth is always
                taken at exact pixel centres.
            with_color: False skips the colour pass (depth / face ids only).
        Returns:
            ``rgb [H,W,3] uint8`` (None if ``with_color`` is False), ``depth [H,W] float32`` z-depth in metres,
            ``face [H,W] int32`` face id of the surface seen at each pixel centre.
        Raises:
            ValueError: bad pose / intrinsics / size, or a camera outside the room / inside a box.
        """
        T = np.asarray(T_WC, dtype=np.float64)
        K = np.asarray(K, dtype=np.float64)
        if T.shape != (4, 4) or K.shape != (3, 3):
            raise ValueError(f"expected T_WC [4,4] and K [3,3], got {T.shape} and {K.shape}")
        W, H = int(size[0]), int(size[1])
        if W <= 0 or H <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        R, c = T[:3, :3], T[:3, 3]
        Kinv = np.linalg.inv(K)

        def rays(offsets: np.ndarray) -> np.ndarray:
            uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
            u = (uu[..., None] + offsets[None, None, :, 0]).reshape(-1)
            v = (vv[..., None] + offsets[None, None, :, 1]).reshape(-1)
            pix = np.stack([u, v, np.ones_like(u)], axis=1)
            return (pix @ Kinv.T) @ R.T  # [N,3], camera z-component of each ray = 1

        d0 = rays(np.zeros((1, 2)))
        t0, f0 = self.intersect(c, d0)
        depth = t0.reshape(H, W).astype(np.float32)  # rays have unit camera-z => t is the z-depth
        face = f0.reshape(H, W)
        if not with_color:
            return None, depth, face
        if supersample == 1:
            col = self.colors(c + t0[:, None] * d0, f0).reshape(H, W, 3)
        else:
            s = supersample
            g = (np.arange(s) + 0.5) / s - 0.5
            off = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
            d = rays(off)
            t, f = self.intersect(c, d)
            col = self.colors(c + t[:, None] * d, f).reshape(H, W, s * s, 3).mean(axis=2)
        rgb = np.clip(np.rint(col), 0, 255).astype(np.uint8)
        return rgb, depth, face


# ---------------------------------------------------------------------------------------------------------------------
# Scene construction


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    return img


def _is_textured(crop: np.ndarray) -> bool:
    g = cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA)
    if g.ndim == 3:
        g = cv2.cvtColor(g, cv2.COLOR_RGB2GRAY)
    g = g.astype(np.float32)
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) / 8.0
    blur = cv2.GaussianBlur(mag, (0, 0), 2.0)
    return bool(np.mean(blur < 1.0) <= _MAX_FLAT_FRACTION and mag.mean() >= _MIN_MEAN_GRAD)


def _texture_crops(seed: int) -> list[tuple[str, np.ndarray]]:
    """Distinct, textured RGB crops of the bundled photos (non-overlapping within each photo; flat crops are dropped);
    grey photos get a colour tint."""
    rng = np.random.default_rng(seed)
    crops: list[tuple[str, np.ndarray]] = []
    for name, rows, cols in _TEXTURE_SOURCES:
        img = _load_photo(name)
        h, w = img.shape[:2]
        for r in range(rows):
            for q in range(cols):
                crop = img[r * h // rows:(r + 1) * h // rows, q * w // cols:(q + 1) * w // cols]
                if not _is_textured(crop):
                    continue
                if crop.ndim == 2:
                    tint = rng.uniform(0.45, 1.0, size=3)
                    crop = (crop[..., None].astype(np.float32) * tint[None, None, :]).astype(np.uint8)
                crops.append((f"{name}:{r},{q}", np.ascontiguousarray(crop)))
    order = rng.permutation(len(crops))
    return [crops[i] for i in order]


def _box_faces(lo: np.ndarray, hi: np.ndarray, inward: bool) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Normals and (width, height) in metres of the 6 faces in face order 2*axis+side."""
    out = []
    ext = hi - lo
    for axis in range(3):
        for side in range(2):
            n = np.zeros(3)
            n[axis] = 1.0 if side == 1 else -1.0
            if inward:
                n = -n
            if axis < 2:
                hax = 1 if axis == 0 else 0
                wh = (ext[hax], ext[2])
            else:
                wh = (ext[0], ext[1])
            out.append((n, wh))
    return out


@functools.lru_cache(maxsize=4)
def build_room(texels_per_m: float = 160.0, seed: int = 0) -> Room:
    """Build the textured room (deterministic for a given ``seed``); cached.

    Args:
        texels_per_m: texture resolution on every surface (texels per metre). Match it to the pixel footprint of the
            rendered images (about ``fx / 1 m``) to avoid aliasing without supersampling.
        seed: seed of the crop order and grey-photo tints.
    Returns:
        ``Room``. Raises ``RuntimeError`` if scikit-image's bundled images do not give enough distinct crops.
    """
    if texels_per_m <= 0:
        raise ValueError(f"texels_per_m must be positive, got {texels_per_m}")
    boxes = [
        Box("room", tuple(ROOM_MIN), tuple(ROOM_MAX)),
        Box("table", (-0.6, -0.4, 0.0), (0.6, 0.4, 0.75)),
        Box("cube", (-0.05, -0.15, 0.75), (0.25, 0.15, 1.05)),
        Box("cabinet", (-2.5, 0.7, 0.0), (-2.05, 1.8, 1.2)),
    ]
    # tiles (n_u, n_v) per face, order 2*axis+side: -x, +x, -y, +y, -z(floor/bottom), +z(ceiling/top)
    room_tiles = [(4, 2), (4, 2), (3, 2), (3, 2), (3, 3), (2, 2)]
    plain_room_face = 1  # east wall (x max): its two middle tile columns (y in [-1, 1]) are plain paint
    crops = _texture_crops(seed)
    tiles_img: list[np.ndarray] = []
    tile_plain: list[bool] = []
    tile_source: list[str] = []
    face_normal, face_grid, face_tile0 = [], [], []
    ci = 0
    for b, box in enumerate(boxes):
        lo, hi = np.array(box.lo), np.array(box.hi)
        for k, (n, (fw, fh)) in enumerate(_box_faces(lo, hi, inward=(b == 0))):
            grid = room_tiles[k] if b == 0 else (1, 1)
            hidden = b > 0 and k == 4  # box bottoms rest on the floor / table
            face_normal.append(n)
            face_grid.append(grid)
            face_tile0.append(len(tiles_img))
            tw = max(2, int(round(fw / grid[0] * texels_per_m)))
            th = max(2, int(round(fh / grid[1] * texels_per_m)))
            for iv in range(grid[1]):
                for iu in range(grid[0]):
                    plain = b == 0 and k == plain_room_face and iu in (1, 2)
                    if plain or hidden:
                        img = np.empty((th, tw, 3), np.uint8)
                        img[...] = PLAIN_COLOR.astype(np.uint8)
                        tiles_img.append(img)
                        tile_plain.append(True)
                        tile_source.append("plain" if plain else "hidden")
                        continue
                    if ci >= len(crops):
                        raise RuntimeError("not enough distinct photo crops for the room textures")
                    src, crop = crops[ci]
                    ci += 1
                    interp = cv2.INTER_AREA if crop.shape[1] > tw else cv2.INTER_CUBIC
                    tiles_img.append(cv2.resize(crop, (tw, th), interpolation=interp))
                    tile_plain.append(False)
                    tile_source.append(src)
    # shelf-pack the tiles into one atlas (1 texel gutter, replicated edges)
    max_w = max(2048, max(t.shape[1] + 2 for t in tiles_img))
    rects = []
    x = y = shelf_h = 0
    for t in tiles_img:
        th, tw = t.shape[0] + 2, t.shape[1] + 2
        if x + tw > max_w:
            x, y, shelf_h = 0, y + shelf_h, 0
        rects.append((x, y))
        x += tw
        shelf_h = max(shelf_h, th)
    atlas = np.zeros((y + shelf_h, max_w, 3), np.uint8)
    tile_rect = np.zeros((len(tiles_img), 4))
    for i, (t, (x0, y0)) in enumerate(zip(tiles_img, rects)):
        padded = cv2.copyMakeBorder(t, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        atlas[y0:y0 + padded.shape[0], x0:x0 + padded.shape[1]] = padded
        tile_rect[i] = (x0 + 1, y0 + 1, t.shape[1], t.shape[0])
    if atlas.shape[0] >= 32767 or atlas.shape[1] >= 32767:
        raise ValueError(f"texels_per_m={texels_per_m} makes the texture atlas too large for cv2.remap")
    return Room(
        boxes_lo=np.array([b.lo for b in boxes], dtype=np.float64),
        boxes_hi=np.array([b.hi for b in boxes], dtype=np.float64),
        box_names=[b.name for b in boxes],
        face_normal=np.array(face_normal, dtype=np.float64),
        face_grid=np.array(face_grid, dtype=np.int64),
        face_tile0=np.array(face_tile0, dtype=np.int64),
        tile_rect=tile_rect,
        tile_plain=np.array(tile_plain, dtype=bool),
        tile_source=tile_source,
        atlas=atlas,
        texels_per_m=float(texels_per_m),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Cameras and trajectories


def intrinsics_for(size: tuple[int, int], hfov_deg: float = DEFAULT_HFOV_DEG) -> np.ndarray:
    """Pinhole ``K [3,3]`` float64 for an image of ``size=(W,H)``: square pixels, principal point at the centre
    ``((W-1)/2, (H-1)/2)`` (OpenCV pixel-centre convention), horizontal field of view ``hfov_deg``."""
    W, H = int(size[0]), int(size[1])
    if W <= 0 or H <= 0 or not (1.0 < hfov_deg < 179.0):
        raise ValueError(f"bad size {size} or hfov {hfov_deg}")
    f = 0.5 * W / math.tan(math.radians(hfov_deg) / 2.0)
    return np.array([[f, 0.0, (W - 1) / 2.0], [0.0, f, (H - 1) / 2.0], [0.0, 0.0, 1.0]])


def look_at(center: np.ndarray, forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """``T_WC [4,4]`` for a camera at ``center`` looking along ``forward`` (world z up, OpenCV optical axes),
    rotated by ``roll`` radians about its optical axis."""
    z = np.asarray(forward, dtype=np.float64)
    z = z / np.linalg.norm(z)
    x = np.cross(z, np.array([0.0, 0.0, 1.0]))
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("forward direction is vertical: the camera's roll is undefined")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    cr, sr = math.cos(roll), math.sin(roll)
    x, y = cr * x + sr * y, -sr * x + cr * y
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, center
    return T


def _dir(yaw: float, pitch: float) -> np.ndarray:
    """Unit vector with heading ``yaw`` (0 = +y north, positive towards -x / left-turn) and elevation ``pitch``."""
    return np.array([-math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), math.sin(pitch)])


def _slow_translation(t: float) -> np.ndarray:
    c = np.array([-1.3 + 2.6 * t, -1.5, 1.35 + 0.05 * math.sin(2 * math.pi * t)])
    yaw = math.radians(20.0 - 40.0 * t)
    return look_at(c, _dir(yaw, math.radians(-15.0)))


def _rotation_heavy(t: float) -> np.ndarray:
    a = 2 * math.pi * t
    c = np.array([0.9 + 0.1 * math.cos(a), -1.1 + 0.1 * math.sin(a), 1.3])
    yaw = 1.1 * 2 * math.pi * t
    pitch = math.radians(-10.0 + 8.0 * math.sin(2 * math.pi * 3 * t))
    roll = math.radians(5.0 * math.sin(2 * math.pi * 2 * t))
    return look_at(c, _dir(yaw, pitch), roll)


LOOP_REVISIT_FRACTION = 30.0 / 270.0  # the last 30/270 of `loop` retraces its first 30/270


def _loop(t: float) -> np.ndarray:
    a = 2 * math.pi * t / (1.0 - LOOP_REVISIT_FRACTION)  # one lap at t = 240/270, then 1/8 lap more
    # the camera rises 6 cm over the sequence, so a revisit sees the same place from a slightly different pose
    c = np.array([-1.7 * math.cos(a), -1.05 * math.sin(a), 1.32 + 0.06 * t])
    target = np.array([0.0, 0.0, 0.6])
    return look_at(c, target - c)


def _textureless(t: float) -> np.ndarray:
    c = np.array([1.8, -1.6 + 3.2 * t, 1.3])
    yaw = math.radians(-90.0 + 10.0 - 20.0 * t)  # facing east (+x), +-10 deg
    return look_at(c, _dir(yaw, 0.0))


def _static(t: float) -> np.ndarray:
    return _slow_translation(0.5)


SEQUENCES: dict[str, tuple[int, Callable[[float], np.ndarray]]] = {
    "slow_translation": (150, _slow_translation),
    "rotation_heavy": (150, _rotation_heavy),
    "loop": (270, _loop),
    "textureless": (150, _textureless),
    "static": (30, _static),
}


def sequence_poses(name: str, n_frames: int | None = None) -> np.ndarray:
    """Ground-truth ``T_WC [T,4,4]`` float64 of a named suite trajectory sampled at ``n_frames`` (default: the
    suite's count). Raises ``ValueError`` for an unknown name or ``n_frames < 1``."""
    if name not in SEQUENCES:
        raise ValueError(f"unknown synthetic sequence '{name}'; available: {sorted(SEQUENCES)}")
    default_n, fn = SEQUENCES[name]
    n = default_n if n_frames is None else int(n_frames)
    if n < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    ts = np.arange(n) / n  # t in [0, 1): with loop's default 270 frames, frame 240 + k revisits frame k
    return np.stack([fn(float(t)) for t in ts])


# ---------------------------------------------------------------------------------------------------------------------
# Sequences


@dataclass
class SyntheticSequence:
    """A rendered sequence with exact ground truth.

    Field order follows docs/interfaces.md (``images, depths, T_WC_gt, K, stamps_ns``); the rest is optional.

    Attributes:
        images: ``[T,H,W,3] uint8`` RGB.
        depths: ``[T,H,W] float32`` z-depth in metres (exact at pixel centres).
        T_WC_gt: ``[T,4,4] float64`` camera -> world, OpenCV optical axes.
        K: ``[3,3] float64`` intrinsics of ``images``.
        stamps_ns: ``[T] int64`` stamps (nanoseconds, ``fps`` apart).
        name: trajectory name.
        faces: ``[T,H,W] int32`` face id per pixel (see ``Room``; None if unknown); used for surface normals.
        scene: the ``Room`` (lets the oracle re-render ground truth at other sizes; None if unknown).
        fps: frame rate used for the stamps.
        meta: extra facts (``revisit_fraction`` for ``loop``).
    """

    images: np.ndarray
    depths: np.ndarray
    T_WC_gt: np.ndarray
    K: np.ndarray
    stamps_ns: np.ndarray
    name: str = "custom"
    faces: np.ndarray | None = None
    scene: Room | None = None
    fps: float = 30.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """``(W, H)`` of the images."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    def world_points(self, i: int) -> np.ndarray:
        """``[H,W,3] float64`` world coordinates of the surface seen by every pixel centre of frame ``i``."""
        H, W = self.depths.shape[1:]
        uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        pix = np.stack([uu, vv, np.ones_like(uu)], -1) @ np.linalg.inv(self.K).T
        Xc = pix * self.depths[i].astype(np.float64)[..., None]
        T = self.T_WC_gt[i]
        return Xc @ T[:3, :3].T + T[:3, 3]

    def trajectory_length(self) -> float:
        """Sum of the camera-centre displacements in metres."""
        c = self.T_WC_gt[:, :3, 3]
        return float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum())

    def save_tum(self, folder: str | Path, with_depth: bool = False) -> Path:
        """Write a TUM RGB-D style folder: ``rgb/<stamp>.png``, ``rgb.txt``, ``groundtruth.txt`` (``t tx ty tz qx qy
        qz qw``, T_WC), ``camera.txt`` (``fx fy cx cy``) and with ``with_depth`` ``depth/`` (uint16, 5000 per metre)
        + ``depth.txt``. Returns the folder path."""
        from scipy.spatial.transform import Rotation

        folder = Path(folder)
        (folder / "rgb").mkdir(parents=True, exist_ok=True)
        if with_depth:
            (folder / "depth").mkdir(parents=True, exist_ok=True)
        rgb_lines = ["# color images", "# file: 'synthetic'", "# timestamp filename"]
        depth_lines = ["# depth maps", "# file: 'synthetic'", "# timestamp filename"]
        gt_lines = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
        for i in range(len(self)):
            ts = f"{self.stamps_ns[i] / 1e9:.6f}"
            name = f"{ts}.png"
            cv2.imwrite(str(folder / "rgb" / name), cv2.cvtColor(self.images[i], cv2.COLOR_RGB2BGR))
            rgb_lines.append(f"{ts} rgb/{name}")
            if with_depth:
                d = np.clip(np.rint(self.depths[i] * 5000.0), 0, 65535).astype(np.uint16)
                cv2.imwrite(str(folder / "depth" / name), d)
                depth_lines.append(f"{ts} depth/{name}")
            T = self.T_WC_gt[i]
            q = Rotation.from_matrix(T[:3, :3]).as_quat()
            gt_lines.append(f"{ts} " + " ".join(f"{v:.9f}" for v in (*T[:3, 3], *q)))
        (folder / "rgb.txt").write_text("\n".join(rgb_lines) + "\n", encoding="utf-8")
        (folder / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n", encoding="utf-8")
        K = self.K
        (folder / "camera.txt").write_text(f"{K[0, 0]} {K[1, 1]} {K[0, 2]} {K[1, 2]}\n", encoding="utf-8")
        if with_depth:
            (folder / "depth.txt").write_text("\n".join(depth_lines) + "\n", encoding="utf-8")
        return folder


def _texels_for(K: np.ndarray) -> float:
    # texel density matched to the pixel footprint at 1 m, rounded to a few levels so the room cache is shared
    f = float(K[0, 0])
    return float(min(512.0, max(64.0, 32.0 * round(f / 32.0))))


def render_poses(
    T_WC: np.ndarray,
    size: tuple[int, int] = DEFAULT_SIZE,
    K: np.ndarray | None = None,
    fps: float = 30.0,
    seed: int = 0,
    supersample: int = 1,
    image_noise: float = 0.0,
    name: str = "custom",
    t0_ns: int = 1_700_000_000 * 10**9,
    jpeg_quality: int | None = None,
) -> SyntheticSequence:
    """Render the room from arbitrary camera poses.

    Args:
        T_WC: ``[T,4,4]`` camera -> world poses (OpenCV optical axes); centres must be inside the room, outside boxes.
        size: ``(W, H)``.
        K: ``[3,3]`` intrinsics (default ``intrinsics_for(size)``).
        fps: stamp spacing; stamps are ``t0_ns + round(i * 1e9 / fps)``.
        seed: texture seed (``build_room``) and image-noise seed.
        supersample: colour supersampling per axis.
        image_noise: std of additive Gaussian pixel noise in grey levels (0 = none).
        jpeg_quality: if given, every image goes through a JPEG encode / decode at this quality (after the noise).
    Returns:
        ``SyntheticSequence``.
    """
    T_WC = np.asarray(T_WC, dtype=np.float64)
    if T_WC.ndim != 3 or T_WC.shape[1:] != (4, 4) or len(T_WC) == 0:
        raise ValueError(f"T_WC must be [T,4,4] with T >= 1, got {T_WC.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    K = intrinsics_for(size) if K is None else np.asarray(K, dtype=np.float64)
    room = build_room(_texels_for(K), seed)
    W, H = int(size[0]), int(size[1])
    n = len(T_WC)
    images = np.empty((n, H, W, 3), np.uint8)
    depths = np.empty((n, H, W), np.float32)
    faces = np.empty((n, H, W), np.int32)
    rng = np.random.default_rng(seed + 7919)
    for i in range(n):
        rgb, d, f = room.render(T_WC[i], K, (W, H), supersample=supersample)
        if image_noise > 0:
            rgb = np.clip(rgb + rng.normal(0.0, image_noise, rgb.shape), 0, 255).round().astype(np.uint8)
        if jpeg_quality is not None:
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY,
                                                                                   int(jpeg_quality)])
            if not ok:
                raise ValueError(f"JPEG encoding failed (quality {jpeg_quality})")
            rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        images[i], depths[i], faces[i] = rgb, d, f
    stamps = t0_ns + np.rint(np.arange(n) * (1e9 / fps)).astype(np.int64)
    return SyntheticSequence(images, depths, T_WC, K, stamps, name=name, faces=faces, scene=room, fps=float(fps))


def render_sequence(
    name: str,
    n_frames: int | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    fps: float = 30.0,
    supersample: int = 1,
    image_noise: float = 0.0,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    jpeg_quality: int | None = None,
) -> SyntheticSequence:
    """Render a named suite sequence (``SEQUENCES``; spec ``test_data.md`` §2).

    Args:
        name: one of ``slow_translation``, ``rotation_heavy``, ``loop``, ``textureless``, ``static``.
        n_frames: number of frames (default: the suite's count); the same path is resampled.
        size: ``(W, H)``; 224x224 (default) and 512x384 are identity-sized under ``preprocess_image`` (size 224 / 512).
        seed: texture / noise seed.
        fps: frame rate of the stamps.
        supersample: colour supersampling per axis.
        image_noise: additive Gaussian pixel noise std (grey levels).
        hfov_deg: horizontal field of view.
        jpeg_quality: optional JPEG round trip of every image (sensor-like variant).
    Returns:
        ``SyntheticSequence`` with ``meta["revisit_fraction"]`` for ``loop``.
    Raises:
        ValueError: unknown name or bad arguments.
    """
    poses = sequence_poses(name, n_frames)
    seq = render_poses(poses, size=size, K=intrinsics_for(size, hfov_deg), fps=fps, seed=seed,
                       supersample=supersample, image_noise=image_noise, name=name, jpeg_quality=jpeg_quality)
    if name == "loop":
        seq.meta["revisit_fraction"] = LOOP_REVISIT_FRACTION
    return seq
