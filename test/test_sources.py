"""Image sources: folder, video, TUM, EuRoC, rosbag2 (sqlite3 + MCAP, raw + compressed) built in the test; errors
for missing paths, empty folders, corrupt images / bags, unknown topics; undistortion (spec upstream_algorithm.md
§11)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from mast3r_slam_ros.io.rosbag import RosbagSource, write_image_bag
from mast3r_slam_ros.io.sources import (
    TUM_CALIBRATION,
    CameraIntrinsics,
    EurocSource,
    ImageFolderSource,
    Sample,
    TUMSource,
    VideoSource,
    open_source,
)


def _smooth_images(n: int, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Smooth colourful images (JPEG-friendly), each different."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    return out


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), img)


# ---------------------------------------------------------------------------------------------------------- folder
def test_image_folder_natural_order_index_stamps_and_grey(tmp_path):
    imgs = _smooth_images(3)
    for name, im in zip(("img10.png", "img2.png", "img1.jpg"), imgs):
        _write_png(tmp_path / name, im)
    grey = (np.arange(48 * 64) % 251).astype(np.uint8).reshape(48, 64)
    _write_png(tmp_path / "img3.png", grey)
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    src = open_source(tmp_path, fps=10.0)
    assert isinstance(src, ImageFolderSource) and len(src) == 4
    names = [s.name for s in src]
    assert names == ["img1.jpg", "img2.png", "img3.png", "img10.png"]
    assert [s.stamp_ns for s in src] == [0, 100_000_000, 200_000_000, 300_000_000]
    np.testing.assert_array_equal(src[1].rgb, imgs[1])  # png round trip, RGB order
    np.testing.assert_array_equal(src[3].rgb, imgs[0])
    g = src[2].rgb
    assert g.shape == (48, 64, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[..., 0], grey)
    np.testing.assert_array_equal(g[..., 1], grey)
    assert src.intrinsics is None


def test_image_folder_stamps_from_names(tmp_path):
    imgs = _smooth_images(4)
    _write_png(tmp_path / "1305031102.175304.png", imgs[0])
    _write_png(tmp_path / "1305031102.211214.png", imgs[1])
    _write_png(tmp_path / "1305031102.2.png", imgs[2])  # 0.2 s lies between the other two
    src = ImageFolderSource(tmp_path)
    assert src.stamps_ns == [1305031102_175304000, 1305031102_200000000, 1305031102_211214000]
    np.testing.assert_array_equal(src[1].rgb, imgs[2])
    src = ImageFolderSource(tmp_path, stamps="index", fps=20)
    assert src.stamps_ns == [0, 50_000_000, 100_000_000]
    _write_png(tmp_path / "frame.png", imgs[3])
    with pytest.raises(ValueError, match="not all time stamps"):
        ImageFolderSource(tmp_path, stamps="name")
    ns = tmp_path / "ns"
    for k in range(2):
        _write_png(ns / f"{1403636579763555584 + k * 50_000_000}.png", imgs[k])
    assert ImageFolderSource(ns).stamps_ns == [1403636579763555584, 1403636579813555584]


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, caplog):
    imgs = _smooth_images(3)
    _write_png(tmp_path / "000.png", imgs[0])
    (tmp_path / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a png")
    _write_png(tmp_path / "002.png", imgs[2])
    src = open_source(tmp_path)
    assert len(src) == 3
    with pytest.raises(ValueError, match="001.png"):
        src[1]
    with pytest.raises(ValueError, match="001.png"):
        list(src)
    src = open_source(tmp_path, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        got = list(src)
    assert [s.name for s in got] == ["000.png", "002.png"]
    assert "001.png" in caplog.text


def test_missing_path_empty_folder_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found"):
        open_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image files"):
        open_source(tmp_path)
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported source file"):
        open_source(tmp_path / "a.txt")
    _write_png(tmp_path / "0.png", _smooth_images(1)[0])
    with pytest.raises(TypeError, match="does not take topic"):
        open_source(tmp_path, topic="/camera/image_raw")
    with pytest.raises(ValueError, match="needs a calibration"):
        open_source(tmp_path, undistort=True)


# ---------------------------------------------------------------------------------------------------------- video
def test_video_source_frames_and_stamps(tmp_path):
    imgs = _smooth_images(6, 48, 64)
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (64, 48))
    assert vw.isOpened()
    for im in imgs:
        vw.write(cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    vw.release()
    src = open_source(path)
    assert isinstance(src, VideoSource) and len(src) == 6
    got = list(src)
    assert len(got) == 6
    assert [s.stamp_ns for s in got] == [int(round(i * 1e9 / 15.0)) for i in range(6)]
    for s, im in zip(got, imgs):  # MJPG is lossy: compare means, and against the wrong frame
        assert np.abs(s.rgb.astype(float) - im).mean() < 10.0
    assert np.abs(got[0].rgb.astype(float) - imgs[1]).mean() > 20.0
    assert len(list(VideoSource(path, subsample=2))) == 3
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        open_source(tmp_path / "bad.mp4")


# ---------------------------------------------------------------------------------------------------------- TUM
def test_tum_folder_stamps_and_freiburg_calibration(tmp_path, caplog):
    root = tmp_path / "rgbd_dataset_freiburg1_xyz"
    imgs = _smooth_images(3, 480, 640)
    lines = ["# color images", "# file: 'rgbd_dataset_freiburg1_xyz.bag'", "# timestamp filename"]
    for k, (t, im) in enumerate(zip(("1305031102.175304", "1305031102.211214", "1305031102.243211"), imgs)):
        _write_png(root / "rgb" / f"{t}.png", im)
        lines.append(f"{t} rgb/{t}.png")
    (root / "rgb.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = open_source(root)
    assert isinstance(src, TUMSource) and len(src) == 3
    assert [s.stamp_ns for s in src] == [1305031102_175304000, 1305031102_211214000, 1305031102_243211000]
    np.testing.assert_array_equal(src[2].rgb, imgs[2])
    fx, fy, cx, cy, *dist = TUM_CALIBRATION["freiburg1"]
    np.testing.assert_allclose(src.intrinsics.K, [[517.3, 0, 318.6], [0, 516.5, 255.3], [0, 0, 1]])
    np.testing.assert_allclose(src.intrinsics.dist, [0.2624, -0.9531, -0.0054, 0.0026, 1.1633])
    assert (src.intrinsics.width, src.intrinsics.height) == (640, 480)
    # freiburg3 has no distortion
    fr3 = tmp_path / "rgbd_dataset_freiburg3_long_office" / "seq"
    _write_png(fr3 / "rgb" / "1.0.png", imgs[0])
    (fr3 / "rgb.txt").write_text("1.0 rgb/1.0.png\n", encoding="utf-8")
    intr = open_source(fr3).intrinsics  # found from the parent folder's name
    np.testing.assert_allclose(intr.K[0, 0], 535.4)
    assert not intr.has_distortion
    # non-increasing stamps in rgb.txt: dropped with a warning
    _write_png(fr3 / "rgb" / "0.5.png", imgs[1])
    _write_png(fr3 / "rgb" / "1.5.png", imgs[2])
    (fr3 / "rgb.txt").write_text("1.0 rgb/1.0.png\n0.5 rgb/0.5.png\n1.5 rgb/1.5.png\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        src = open_source(fr3)
    assert src.stamps_ns == [1_000_000_000, 1_500_000_000] and "0.5.png" in caplog.text
    np.testing.assert_array_equal(src[1].rgb, imgs[2])
    # a listed image that is missing
    (fr3 / "rgb.txt").write_text("1.0 rgb/1.0.png\n2.0 rgb/2.0.png\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing"):
        open_source(fr3)


def test_undistort_moves_a_point_to_its_undistorted_projection(tmp_path):
    """A bright dot drawn where a 3-D ray projects with distortion lands, after undistortion, where the same ray
    projects with the reported (undistorted) K and no distortion."""
    W, H = 320, 240
    K = np.array([[260.0, 0, 161.0], [0, 258.0, 119.0], [0, 0, 1]])
    dist = np.array([-0.25, 0.08, 0.001, -0.0015, 0.0])
    ray = np.array([[0.5, -0.35, 1.0]])
    uv_d = cv2.projectPoints(ray, np.zeros(3), np.zeros(3), K, dist)[0].reshape(2)
    img = np.zeros((H, W), np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    img += 255.0 * np.exp(-((xx - uv_d[0]) ** 2 + (yy - uv_d[1]) ** 2) / (2 * 2.0**2))
    _write_png(tmp_path / "seq" / "0.png", np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, 2))
    intr = CameraIntrinsics(K, dist, W, H)
    src = open_source(tmp_path / "seq", intrinsics=intr, undistort=True)
    assert not src.intrinsics.has_distortion and src.raw_intrinsics is intr
    Ko = src.intrinsics.K
    uv_u = (Ko @ ray[0])[:2] / ray[0, 2]
    out = src[0].rgb[..., 0].astype(np.float64)
    w = np.where(out > 30, out, 0.0)
    centroid = np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    assert np.linalg.norm(centroid - uv_u) < 0.5, (centroid, uv_u)
    assert np.linalg.norm(uv_d - uv_u) > 3.0  # the test would notice a missing undistortion
    # the reported K is OpenCV's alpha=0 optimal matrix with a centred principal point (spec §11.1)
    K_ref, _ = cv2.getOptimalNewCameraMatrix(K, dist, (W, H), 0, (W, H), True)
    np.testing.assert_allclose(Ko, K_ref)


def test_synthetic_sequence_saved_as_tum_reads_back(tmp_path):
    from mast3r_slam_ros.testing import render_sequence

    seq = render_sequence("slow_translation", n_frames=4, size=(64, 48))
    folder = seq.save_tum(tmp_path / "synthetic_tum")
    src = open_source(folder)
    assert isinstance(src, TUMSource) and len(src) == 4
    for k, s in enumerate(src):
        np.testing.assert_array_equal(s.rgb, seq.images[k])
        assert abs(s.stamp_ns - int(seq.stamps_ns[k])) <= 1000  # rgb.txt keeps microseconds
    np.testing.assert_allclose(src.intrinsics.K, seq.K)
    gt = np.loadtxt(folder / "groundtruth.txt")
    np.testing.assert_allclose(gt[:, 1:4], seq.T_WC_gt[:, :3, 3], atol=1e-8)


_SENSOR_YAML = """# General sensor definitions.
sensor_type: camera
comment: VI-Sensor cam0 (MT9M034)

# Sensor extrinsics wrt. the body-frame.
T_BS:
  cols: 4
  rows: 4
  data: [0.0148655429818, -0.999880929698, 0.00414029679422, -0.0216401454975,
         0.999557249008, 0.0149672133247, 0.025715529948, -0.064676986768,
        -0.0257744366974, 0.00375618835797, 0.999660727178, 0.00981073058949,
         0.0, 0.0, 0.0, 1.0]

# Camera specific definitions.
rate_hz: 20
resolution: [752, 480]
camera_model: pinhole
intrinsics: [458.654, 457.296, 367.215, 248.375] #fu, fv, cu, cv
distortion_model: radial-tangential
distortion_coefficients: [-0.28340811, 0.07395907, 0.00019359, 1.76187114e-05]
"""


def _euroc(tmp_path: Path, n: int = 3) -> tuple[Path, list[np.ndarray], list[int]]:
    root = tmp_path / "MH_01_easy"
    cam = root / "mav0" / "cam0"
    rng = np.random.default_rng(3)
    stamps = [1403636579763555584 + k * 50_000_000 for k in range(n)]
    imgs = []
    lines = ["#timestamp [ns],filename"]
    for t in stamps:
        g = cv2.resize(rng.integers(0, 256, (6, 8)).astype(np.uint8), (752, 480), interpolation=cv2.INTER_CUBIC)
        _write_png(cam / "data" / f"{t}.png", g)
        imgs.append(g)
        lines.append(f"{t},{t}.png")
    (cam / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (cam / "sensor.yaml").write_text(_SENSOR_YAML, encoding="utf-8")
    return root, imgs, stamps


def test_euroc_layout_stamps_calibration_and_default_undistortion(tmp_path):
    root, imgs, stamps = _euroc(tmp_path)
    src = open_source(root)
    assert isinstance(src, EurocSource) and len(src) == 3
    assert [s.stamp_ns for s in src] == stamps
    raw = src.raw_intrinsics
    np.testing.assert_allclose(raw.K, [[458.654, 0, 367.215], [0, 457.296, 248.375], [0, 0, 1]])
    np.testing.assert_allclose(raw.dist, [-0.28340811, 0.07395907, 0.00019359, 1.76187114e-05])
    assert (raw.width, raw.height) == (752, 480)
    assert not src.intrinsics.has_distortion  # undistorted by default, like upstream
    s = src[0]
    assert s.rgb.shape == (480, 752, 3) and np.array_equal(s.rgb[..., 0], s.rgb[..., 2])
    assert not np.array_equal(s.rgb[..., 0], imgs[0])  # remapped
    plain = EurocSource(root / "mav0", undistort=False)  # also accepts the mav0 folder
    np.testing.assert_array_equal(plain[1].rgb[..., 1], imgs[1])
    assert plain.intrinsics is plain.raw_intrinsics
    (root / "mav0" / "cam0" / "sensor.yaml").write_text("intrinsics: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="sensor.yaml"):
        open_source(root)


# ---------------------------------------------------------------------------------------------------------- rosbag2
@pytest.mark.parametrize("fmt", ["sqlite3", "mcap"])
@pytest.mark.parametrize("compressed", [False, "png", "jpeg"])
def test_rosbag_round_trip_with_camera_info(tmp_path, fmt, compressed):
    imgs = _smooth_images(4)
    stamps = [1_700_000_000_000_000_000 + k * 33_333_333 for k in range(4)]
    cam = CameraIntrinsics.from_params([55.0, 54.0, 31.5, 23.5, -0.1, 0.02, 0.001, 0.0005], 64, 48)
    topic = "/cam/image_raw/compressed" if compressed else "/cam/image_raw"
    bag = write_image_bag(tmp_path / "bag", [Sample(t, im) for t, im in zip(stamps, imgs)], topic=topic,
                          camera_info=cam, fmt=fmt, compressed=compressed)
    suffix = ".mcap" if fmt == "mcap" else ".db3"
    assert (bag / "metadata.yaml").is_file() and len(list(bag.glob("*" + suffix))) == 1
    src = open_source(bag)
    assert isinstance(src, RosbagSource) and len(src) == 4 and src.topic == topic
    assert src.camera_info_topic == "/cam/camera_info"
    np.testing.assert_allclose(src.intrinsics.K, cam.K)
    np.testing.assert_allclose(src.intrinsics.dist[:4], cam.dist)
    got = list(src)
    assert [s.stamp_ns for s in got] == stamps
    for s, im in zip(got, imgs):
        if compressed == "jpeg":
            assert np.abs(s.rgb.astype(float) - im).mean() < 3.0
        else:
            np.testing.assert_array_equal(s.rgb, im)
    # the storage file alone opens too
    single = open_source(next(bag.glob("*" + suffix)))
    assert len(single) == 4


@pytest.mark.parametrize("encoding", ["bgr8", "mono8", "rgba8", "bgra8"])
def test_rosbag_raw_encodings(tmp_path, encoding):
    imgs = _smooth_images(2)
    write_image_bag(tmp_path / "b", [(k + 1, im) for k, im in enumerate(imgs)], encoding=encoding, fmt="mcap")
    got = list(open_source(tmp_path / "b"))
    for s, im in zip(got, imgs):
        ref = np.repeat(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)[..., None], 3, 2) if encoding == "mono8" else im
        np.testing.assert_array_equal(s.rgb, ref)


def test_rosbag_topic_errors_corrupt_bag_and_stamp_order(tmp_path, caplog):
    imgs = _smooth_images(3)
    bag = tmp_path / "two"
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    write_image_bag(bag, [(10, imgs[0]), (30, imgs[1]), (40, imgs[2])], topic="/a/image_raw", fmt="sqlite3")
    with pytest.raises(ValueError, match="/b/image") as ei:
        RosbagSource(bag, topic="/b/image")
    assert "/a/image_raw" in str(ei.value)  # lists the available image topics
    # header stamps out of order while the bag (receive) times increase: the late one is dropped with a warning
    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image, Header, Time = (ts.types[k] for k in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                 "builtin_interfaces/msg/Time"))
    unordered = tmp_path / "unordered"
    with Writer(unordered, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
        conn = w.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=ts)
        for k, (stamp, im) in enumerate(zip((5, 30, 20), imgs)):
            msg = Image(header=Header(stamp=Time(sec=1, nanosec=stamp), frame_id="c"), height=48, width=64,
                        encoding="rgb8", is_bigendian=0, step=64 * 3, data=im.reshape(-1))
            w.write(conn, 100 + k, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    with caplog.at_level(logging.WARNING):
        got = list(RosbagSource(unordered))
    assert [s.stamp_ns for s in got] == [1_000_000_005, 1_000_000_030]
    np.testing.assert_array_equal(got[1].rgb, imgs[1])
    assert "does not increase" in caplog.text
    # two image topics: the choice must be explicit
    two = tmp_path / "multi"
    with Writer(two, version=8, storage_plugin=StoragePlugin.MCAP) as w:
        for t in ("/left/image_raw", "/right/image_raw"):
            w.add_connection(t, "sensor_msgs/msg/Image", typestore=ts)
    with pytest.raises(ValueError, match="several image topics.*/left/image_raw.*/right/image_raw"):
        open_source(two)
    # corrupt storage files
    (tmp_path / "junk.mcap").write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 50)
    with pytest.raises(ValueError, match="cannot read rosbag2"):
        open_source(tmp_path / "junk.mcap")
    (tmp_path / "junk.db3").write_bytes(b"this is not sqlite")
    with pytest.raises(ValueError, match="cannot read rosbag2"):
        open_source(tmp_path / "junk.db3")
    with pytest.raises(FileExistsError):
        write_image_bag(bag, [(1, imgs[0])])
    # an uncalibrated camera's CameraInfo (K = 0) is ignored with a warning, the images still play
    zk = tmp_path / "zk"
    with Writer(zk, version=8, storage_plugin=StoragePlugin.MCAP) as w:
        ci = w.add_connection("/camera/camera_info", "sensor_msgs/msg/CameraInfo", typestore=ts)
        ic = w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        CI, ROI = ts.types["sensor_msgs/msg/CameraInfo"], ts.types["sensor_msgs/msg/RegionOfInterest"]
        hdr = Header(stamp=Time(sec=0, nanosec=7), frame_id="c")
        info = CI(header=hdr, height=48, width=64, distortion_model="", d=np.zeros(0), k=np.zeros(9),
                  r=np.zeros(9), p=np.zeros(12), binning_x=0, binning_y=0,
                  roi=ROI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        w.write(ci, 7, ts.serialize_cdr(info, "sensor_msgs/msg/CameraInfo"))
        img = Image(header=hdr, height=48, width=64, encoding="rgb8", is_bigendian=0, step=192,
                    data=imgs[0].reshape(-1))
        w.write(ic, 7, ts.serialize_cdr(img, "sensor_msgs/msg/Image"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        src = open_source(zk)
    assert src.intrinsics is None and "ignoring CameraInfo" in caplog.text
    np.testing.assert_array_equal(next(iter(src)).rgb, imgs[0])
