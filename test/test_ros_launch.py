"""Launch files, parameter file and RViz config agree with the parameters and topics the node really declares.

``launch`` / ``launch_ros`` cannot be installed here (spec ros_test_env.md §6), so the launch files are imported with
small recording stand-ins for those modules (the spec's Appendix C approach) and the recorded actions are checked.
"""

from __future__ import annotations

import ros_testlib as rt  # noqa: I001  (ROS environment first)

import importlib.util
import py_compile
import sys
import types

import pytest
import rclpy
import yaml

from mast3r_slam_ros.ros.node import SlamNode
from mast3r_slam_ros.ros.params import PARAMETERS

pytestmark = pytest.mark.ros
LAUNCH = rt.REPO / "launch"


class _Rec:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchDescription(_Rec):
    @property
    def entities(self):
        return list(self.args[0]) if self.args else []


class DeclareLaunchArgument(_Rec):
    @property
    def name(self):
        return self.args[0]


class LaunchConfiguration(_Rec):
    @property
    def variable_name(self):
        return self.args[0]


class Node(_Rec):
    pass


class ExecuteProcess(_Rec):
    pass


class PathJoinSubstitution(_Rec):
    pass


class FindPackageShare(_Rec):
    pass


class IfCondition(_Rec):
    pass


@pytest.fixture()
def load_launch(monkeypatch):
    stubs = {
        "launch": {"LaunchDescription": LaunchDescription},
        "launch.actions": {"DeclareLaunchArgument": DeclareLaunchArgument, "ExecuteProcess": ExecuteProcess},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration,
                                 "PathJoinSubstitution": PathJoinSubstitution},
        "launch.conditions": {"IfCondition": IfCondition},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Node},
        "launch_ros.substitutions": {"FindPackageShare": FindPackageShare},
    }
    for name, attrs in stubs.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    def load(path):
        py_compile.compile(str(path), doraise=True)
        spec = importlib.util.spec_from_file_location(f"launch_{path.stem.replace('.', '_')}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.generate_launch_description()
    return load


def _configs_used(obj, out):
    """All LaunchConfiguration names referenced anywhere inside ``obj``."""
    if isinstance(obj, LaunchConfiguration):
        out.add(obj.variable_name)
    elif isinstance(obj, _Rec):
        for a in (*obj.args, *obj.kwargs.values()):
            _configs_used(a, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _configs_used(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _configs_used(v, out)
    return out


@pytest.fixture(scope="module")
def declared():
    """Parameter names and descriptors the node really declares (constructed with a fake system)."""
    rclpy.init()
    try:
        node = SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(),
                        config_factory=lambda p: None)
        names = set(node._parameters) - {"use_sim_time", "start_type_description_service"}  # rclpy's own
        desc = {n: node.describe_parameter(n) for n in names}
        topics = {"pub": {p.topic_name for p in node.publishers}, "sub": {s.topic_name for s in node.subscriptions}}
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return names, desc, topics


def test_node_declares_every_parameter_with_description_and_ranges(declared):
    names, desc, _ = declared
    assert names == {p.name for p in PARAMETERS}
    for spec in PARAMETERS:
        d = desc[spec.name]
        assert d.description == spec.description and len(d.description) > 10
        if spec.range is not None and not isinstance(spec.default, bool):
            r = d.integer_range if isinstance(spec.default, int) else d.floating_point_range
            assert len(r) == 1 and (r[0].from_value, r[0].to_value) == spec.range
        if spec.choices:
            assert all(c in d.additional_constraints for c in spec.choices)


def test_params_file_sets_exactly_the_declared_parameters_with_valid_values(declared):
    names, _, _ = declared
    data = yaml.safe_load((rt.REPO / "config" / "mast3r_slam.yaml").read_text(encoding="utf-8"))
    params = data["/**"]["ros__parameters"]
    assert set(params) == names
    for spec in PARAMETERS:
        assert type(params[spec.name]) is type(spec.default), spec.name
        if spec.choices:
            assert params[spec.name] in spec.choices
    # the file is accepted by a real node (rcl parses it; wrong types would raise)
    rclpy.init(args=["--ros-args", "--params-file", str(rt.REPO / "config" / "mast3r_slam.yaml")])
    try:
        node = SlamNode(predictor=object(), system_factory=lambda *a: rt.FakeSlamSystem(),
                        config_factory=lambda p: None)
        assert node.p.frame_policy == params["frame_policy"] and node.p.camera_mount == params["camera_mount"]
        node.destroy_node()
    finally:
        rclpy.try_shutdown()


@pytest.mark.parametrize("name", ["mast3r_slam.launch.py", "replay.launch.py"])
def test_launch_files_match_node(load_launch, declared, name):
    names, _, topics = declared
    ld = load_launch(LAUNCH / name)
    args = {e.name: e for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
    nodes = [e for e in ld.entities if isinstance(e, Node)]
    slam = [n for n in nodes if n.kwargs["package"] == "mast3r_slam_ros"]
    assert len(slam) == 1
    kw = slam[0].kwargs
    assert kw["executable"] == "slam_node" and kw["name"] == "mast3r_slam"
    # every parameter the launch file sets is declared by the node (use_sim_time is rclpy's own)
    for p in kw["parameters"]:
        if isinstance(p, dict):
            assert set(p) <= names | {"use_sim_time"}, set(p) - names
        else:
            assert isinstance(p, LaunchConfiguration) and p.variable_name == "params_file"
    default_params = args["params_file"].kwargs["default_value"]
    assert isinstance(default_params, PathJoinSubstitution)
    assert default_params.args[0][1:] == ["config", "mast3r_slam.yaml"]
    assert (rt.REPO / "config" / "mast3r_slam.yaml").is_file()
    # remappings target the node's relative input names
    remap_from = {a for a, _ in kw["remappings"]}
    assert remap_from <= {"image", "image/compressed", "camera_info"} and {"image", "camera_info"} <= remap_from
    assert {"/image", "/camera_info"} <= topics["sub"]
    # every LaunchConfiguration refers to a declared argument; the arguments exist
    assert _configs_used(ld.entities, set()) <= set(args)
    assert {"image_topic", "camera_info_topic", "checkpoint", "params_file", "rviz"} <= set(args)
    if name == "mast3r_slam.launch.py":
        assert "use_sim_time" in args
    else:
        assert "bag" in args and "rate" in args
        play = [e for e in ld.entities if isinstance(e, ExecuteProcess)]
        assert len(play) == 1 and play[0].kwargs["cmd"][:3] == ["ros2", "bag", "play"]
    rviz = [n for n in nodes if n.kwargs["package"] == "rviz2"]
    assert len(rviz) == 1 and isinstance(rviz[0].kwargs["condition"], IfCondition)
    rviz_path = rviz[0].kwargs["arguments"][1].args[0][1:]
    assert rviz_path == ["rviz", "mast3r_slam.rviz"]


def test_rviz_config_shows_the_node_outputs(declared):
    _, _, topics = declared
    cfg = yaml.safe_load((rt.REPO / "rviz" / "mast3r_slam.rviz").read_text(encoding="utf-8"))
    vm = cfg["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == next(p.default for p in PARAMETERS if p.name == "map_frame")
    shown = {}
    for d in vm["Displays"]:
        topic = d.get("Topic", {}).get("Value") if isinstance(d.get("Topic"), dict) else None
        shown[d["Class"].split("/")[-1]] = topic
    node_pubs = {t.replace("/mast3r_slam/", "~/") for t in topics["pub"]}
    assert {"PointCloud2", "Path", "MarkerArray", "TF", "Image"} <= set(shown)
    for cls in ("PointCloud2", "Path", "MarkerArray", "PoseArray", "Odometry"):
        assert shown[cls] in topics["pub"], (cls, shown[cls], node_pubs)
    assert shown["Image"] == "/camera/image_raw"   # the launch file's default image_topic


def test_docs_list_every_parameter_topic_and_service(declared):
    names, _, topics = declared
    doc = (rt.REPO / "docs" / "ros.md").read_text(encoding="utf-8")
    for n in names:
        assert f"`{n}`" in doc, n
    for t in topics["pub"] - {"/parameter_events", "/rosout"}:   # rclpy's own
        assert f"`{t.replace('/mast3r_slam/', '~/')}`" in doc, t
    for s in ("~/reset", "~/save_map", "~/pause", "~/resume"):
        assert f"`{s}`" in doc
    assert (rt.REPO / "docs" / "images" / "ros_outputs.png").is_file() and "images/ros_outputs.png" in doc
