"""Geometry tests: pinhole round trips, preprocessing sizes/content, and intrinsics consistent with the image content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mast3r_slam_ros import geometry as G

F64 = torch.float64


def _K(fx=517.3, fy=516.5, cx=318.6, cy=255.3, skew=0.0, dtype=F64) -> torch.Tensor:
    return torch.tensor([[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


# ---------------------------------------------------------------------------------------------- pinhole model
@pytest.mark.parametrize("skew", [0.0, 1.7])
def test_project_backproject_round_trip(skew):
    g = torch.Generator().manual_seed(0)
    K = _K(skew=skew)
    u = torch.rand(1000, generator=g, dtype=F64) * 639
    v = torch.rand(1000, generator=g, dtype=F64) * 479
    z = torch.rand(1000, generator=g, dtype=F64) * 10 + 0.1
    P = G.backproject(u, v, z, K)
    # independent reference: K @ P / z
    ref = (K @ P.T).T
    np.testing.assert_allclose((ref[:, :2] / ref[:, 2:]).numpy(), torch.stack((u, v), -1).numpy(), atol=1e-10)
    pz, valid = G.project_calib(P, K, img_size=(480, 640))
    assert torch.allclose(pz[:, 0], u, atol=1e-10) and torch.allclose(pz[:, 1], v, atol=1e-10)
    assert torch.allclose(pz[:, 2], torch.log(z), atol=1e-12)
    inside = (u > 0) & (u < 639) & (v > 0) & (v < 479)
    assert torch.equal(valid[:, 0], inside)


def test_project_calib_validity_border_and_depth():
    K = _K()
    P = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [10.0, 0.0, 1.0], [-0.63, 0.0, 1.0]],
                     dtype=F64)
    pz, valid = G.project_calib(P, K, img_size=(480, 640), border=-10, z_eps=1e-6)
    assert valid[:, 0].tolist() == [True, False, False, False, True]  # u of the last = -7.3 px, within the -10 border
    assert torch.isfinite(pz).all()
    assert pz[1, 2] == 0 and pz[2, 2] == 0  # log z := 0 where z <= z_eps
    _, valid0 = G.project_calib(P, K, img_size=(480, 640), border=0)
    assert valid0[:, 0].tolist() == [True, False, False, False, False]


def test_project_calib_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(1)
    K = _K(skew=0.5)
    P = torch.randn(20, 3, generator=g, dtype=F64) + torch.tensor([0.0, 0.0, 4.0], dtype=F64)
    _, J, _ = G.project_calib(P, K, jacobian=True)
    J_ref = torch.autograd.functional.jacobian(lambda x: G.project_calib(x, K)[0].sum(0), P).permute(1, 0, 2)
    assert torch.allclose(J, J_ref, atol=1e-12)


def test_point_ray_dist_round_trip():
    X = torch.randn(4, 100, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ray, dist = G.point_to_ray_dist(X)
    assert ray.shape == (4, 100, 3) and dist.shape == (4, 100, 1)
    assert torch.allclose(ray.norm(dim=-1), torch.ones(4, 100, dtype=F64))
    assert torch.allclose(dist[..., 0], torch.sqrt((X ** 2).sum(-1)))
    assert torch.allclose(G.ray_dist_to_point(ray, dist), X, atol=1e-14)
    r0, d0 = G.point_to_ray_dist(torch.zeros(1, 3))
    assert torch.isfinite(r0).all() and d0.item() == 0


def test_pixel_grid_layout():
    grid = G.pixel_grid(3, 5, dtype=F64)
    assert grid.shape == (3, 5, 2)
    flat = grid.reshape(-1, 2)
    k = torch.arange(15)
    assert torch.equal(flat[:, 0], (k % 5).to(F64)) and torch.equal(flat[:, 1], (k // 5).to(F64))


def test_constrain_points_to_ray():
    H, W = 6, 8
    K = _K(fx=10.0, fy=11.0, cx=3.7, cy=2.2)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, H * W, 3, generator=g, dtype=F64)
    X[..., 2] = X[..., 2].abs() + 0.5
    Y = G.constrain_points_to_ray((H, W), X, K)
    assert Y.shape == X.shape
    assert torch.equal(Y[..., 2], X[..., 2])  # depth kept
    pz, _ = G.project_calib(Y, K)  # and each point now projects to its own pixel
    grid = G.pixel_grid(H, W, dtype=F64).reshape(-1, 2)
    assert torch.allclose(pz[..., :2], grid.expand(2, -1, -1), atol=1e-12)
    Y4 = G.constrain_points_to_ray((H, W), X.reshape(2, H, W, 3), K)
    assert torch.allclose(Y4.reshape(2, H * W, 3), Y)
    with pytest.raises(ValueError):
        G.constrain_points_to_ray((H, W + 1), X, K)


# ---------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(
    "w,h,size,expected_hw",
    [
        (640, 480, 512, (384, 512)),   # TUM / 7-Scenes (spec §2)
        (752, 480, 512, (320, 512)),   # EuRoC: 512x327 -> 512x320
        (739, 458, 512, (304, 512)),   # ETH3D: 512x317 -> 512x304
        (512, 512, 512, (384, 512)),   # square -> 4:3
        (300, 300, 512, (384, 512)),   # square, upsampled
        (1000, 1000, 512, (384, 512)),
        (480, 640, 512, (512, 384)),   # portrait
        (640, 480, 224, (224, 224)),
        (300, 300, 224, (224, 224)),
    ],
)
def test_preprocess_sizes(w, h, size, expected_hw):
    rng = np.random.default_rng(w + h)
    pre = G.preprocess_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), size=size)
    H, W = expected_hw
    assert pre.img.shape == (1, 3, H, W) and pre.img.dtype == torch.float32
    assert pre.true_shape.dtype == torch.int32 and pre.true_shape.tolist() == [[H, W]]
    assert pre.uimg.shape == (H, W, 3) and pre.uimg.dtype == torch.uint8
    assert pre.transform.in_size == (w, h) and pre.transform.out_size == (W, H)
    assert H % 16 == 0 and W % 16 == 0
    # normalisation (x/255 - 0.5)/0.5 of the uint8 crop
    ref = (pre.uimg.permute(2, 0, 1).double() / 255.0 - 0.5) / 0.5
    assert torch.allclose(pre.img[0].double(), ref, atol=1e-6)
    assert pre.img.min() >= -1 and pre.img.max() <= 1


@pytest.mark.parametrize("w,h,interp", [(640, 480, Image.LANCZOS), (300, 200, Image.BICUBIC)])
def test_preprocess_content_matches_pil_recipe(w, h, interp):
    """Pixel content = PIL resize with LANCZOS (shrinking) / BICUBIC (enlarging), then the centre crop."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pre = G.preprocess_image(img)
    new = (512, round(512 * h / w))
    resized = np.asarray(Image.fromarray(img).resize(new, interp))
    top = int(pre.transform.half_crop_h)
    H, W = pre.uimg.shape[:2]
    np.testing.assert_array_equal(pre.uimg.numpy(), resized[top:top + H, :W])


def test_float_input_truncates_like_upstream():
    rng = np.random.default_rng(6)
    f = rng.random((48, 64, 3)).astype(np.float32)
    a = G.preprocess_image(f)
    b = G.preprocess_image(np.uint8(f * 255))  # upstream: PIL.Image.fromarray(np.uint8(img*255))
    assert torch.equal(a.uimg, b.uimg)
    c = G.preprocess_image(torch.from_numpy(np.uint8(f * 255)))
    assert torch.equal(a.uimg, c.uimg)


def test_preprocess_errors():
    with pytest.raises(ValueError, match="empty"):
        G.preprocess_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="3"):
        G.preprocess_image(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        G.preprocess_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        G.preprocess_image(np.zeros((10, 10, 3), np.int16))
    with pytest.raises(TypeError):
        G.preprocess_image([[1, 2, 3]])
    with pytest.raises(ValueError, match="size"):
        G.preprocess_image(np.zeros((10, 10, 3), np.uint8), size=384)


# ----------------------------------------------------------------------------------- intrinsics vs image content
def _blob_image(w, h, centres, sigma=3.0):
    """Gaussian blobs (sub-pixel centres, pixel-centre convention) rendered analytically."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for cu, cv in centres:
        img += np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma ** 2))
    return np.repeat((np.clip(img, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(gray, cu, cv, r=9):
    u0, v0 = int(round(cu)), int(round(cv))
    patch = gray[v0 - r:v0 + r + 1, u0 - r:u0 + r + 1].astype(np.float64)
    vv, uu = np.mgrid[v0 - r:v0 + r + 1, u0 - r:u0 + r + 1]
    wgt = np.clip(patch - 8.0, 0, None)  # ignore the faint tail / ringing
    return (wgt * uu).sum() / wgt.sum(), (wgt * vv).sum() / wgt.sum()


@pytest.mark.parametrize("w,h", [(640, 480), (752, 480), (512, 512), (739, 458)])
def test_point_projects_to_same_image_location_after_preprocessing(w, h):
    """A 3-D point: project with K into the input image, render a blob there, preprocess; the blob's centroid in the
    network image is where K' = adjust_intrinsics(K) projects the same point."""
    K = _K(fx=0.8 * w, fy=0.82 * w, cx=w / 2 - 3.3, cy=h / 2 + 2.6)
    rng = np.random.default_rng(w)
    # well separated directions (3x2 grid, random sub-pixel jitter) so that blobs do not overlap
    gx, gy = np.meshgrid([-0.3, 0.0, 0.3], [-0.2, 0.2])
    xy = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-0.03, 0.03, (6, 2))
    P = torch.tensor(np.c_[xy * 4.0, np.full(6, 4.0)], dtype=F64)
    uv_in = G.project_calib(P, K)[0][:, :2].numpy()
    pre = G.preprocess_image(_blob_image(w, h, uv_in))
    K2 = G.adjust_intrinsics(K, pre.transform)
    uv_net, valid = G.project_calib(P, K2, img_size=tuple(pre.true_shape[0].tolist()), border=12)
    gray = pre.uimg.numpy()[..., 0]
    n = 0
    for k in range(6):
        if not valid[k, 0]:
            continue
        cu, cv = _centroid(gray, *uv_net[k, :2].tolist())
        assert abs(cu - uv_net[k, 0].item()) < 0.05 and abs(cv - uv_net[k, 1].item()) < 0.05, (k, cu, cv, uv_net[k])
        n += 1
    assert n >= 4
    # the pixel maps agree with K and K' and invert each other
    mapped = G.input_to_network_pixel(uv_in, pre.transform)
    np.testing.assert_allclose(mapped, uv_net[:, :2].numpy(), atol=1e-9)
    np.testing.assert_allclose(G.network_to_input_pixel(mapped, pre.transform), uv_in, atol=1e-9)
    np.testing.assert_allclose(G.restore_intrinsics(K2, pre.transform).numpy(), K.numpy(), atol=1e-9)


def test_upstream_convention_formula():
    """convention='upstream' is spec §2 verbatim: fx/scale_w, cx/scale_w - (W_resized - W)/2."""
    pre = G.preprocess_image(np.zeros((480, 752, 3), np.uint8))
    K = np.array([[458.654, 0, 367.215], [0, 457.296, 248.375], [0, 0, 1]])
    K2 = G.adjust_intrinsics(K, pre.transform, convention="upstream")
    sw, sh = 752 / 512, 480 / 327
    np.testing.assert_allclose(K2, [[458.654 / sw, 0, 367.215 / sw], [0, 457.296 / sh, 248.375 / sh - 3.5], [0, 0, 1]])
    assert isinstance(K2, np.ndarray)
    with pytest.raises(ValueError):
        G.adjust_intrinsics(np.eye(2), pre.transform)


def test_normalize_image_matches_formula_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    u8 = torch.from_numpy(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    x = G.normalize_image(u8)
    ref = (u8.permute(2, 0, 1).unsqueeze(0).double() / 255.0 - 0.5) / 0.5
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x.double(), ref, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0
    pre = G.preprocess_image(u8.numpy(), size=512, device="cpu")
    assert torch.equal(pre.img, G.normalize_image(pre.uimg))
    with pytest.raises(TypeError):
        G.normalize_image(u8.float())
    with pytest.raises(TypeError):
        G.normalize_image(u8[..., :2])
