"""Packaging: package.xml (ament_python, format 3, exec_depends), setup.py data_files and entry points, the ament
resource marker, the CLI's --help, README/CI consistency, and the MSVC lint of tools/check_cuda_sources.py."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mast3r_slam_ros"

REQUIRED_EXEC_DEPENDS = {
    "rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "tf2_ros", "std_srvs", "diagnostic_msgs",
    "python3-numpy", "python3-opencv", "python3-yaml",
}


def _setup_kwargs(monkeypatch) -> dict:
    """Execute setup.py with setuptools.setup replaced by a recorder (no build, no CUDA probing)."""
    import setuptools

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("MAST3R_SLAM_ROS_BUILD_CUDA", "0")
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert captured, "setup.py did not call setuptools.setup()"
    return captured


def _package_xml() -> ET.Element:
    return ET.parse(ROOT / "package.xml").getroot()


def test_package_xml_is_format3_ament_python_with_required_depends(monkeypatch):
    root = _package_xml()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == PACKAGE
    assert root.find("export/build_type").text.strip() == "ament_python"
    exec_depends = {e.text.strip() for e in root.findall("exec_depend")} | {e.text.strip() for e in root.findall("depend")}
    missing = REQUIRED_EXEC_DEPENDS - exec_depends
    assert not missing, f"package.xml lacks exec_depend on {sorted(missing)}"
    assert root.findtext("license"), "package.xml needs a <license>"
    assert root.find("maintainer") is not None and root.find("maintainer").get("email")
    kw = _setup_kwargs(monkeypatch)
    assert kw["name"] == PACKAGE
    assert kw["version"] == root.findtext("version"), "setup.py and package.xml versions differ"
    assert kw["license"] == root.findtext("license")


def test_setup_data_files_install_share_and_marker(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    data_files = {dest: list(files) for dest, files in kw["data_files"]}
    # ament index marker: share/ament_index/resource_index/packages/<name> (an existing, normally empty file)
    assert data_files["share/ament_index/resource_index/packages"] == [f"resource/{PACKAGE}"]
    assert (ROOT / "resource" / PACKAGE).is_file()
    assert data_files[f"share/{PACKAGE}"] == ["package.xml"]
    # every file of launch/, config/, rviz/ is installed into share/<pkg>/<folder>
    for folder in ("launch", "config", "rviz"):
        on_disk = sorted(f"{folder}/{p.name}" for p in (ROOT / folder).glob("*") if p.is_file())
        assert on_disk, f"{folder}/ must ship files (launch files, configuration, RViz config)"
        assert sorted(data_files.get(f"share/{PACKAGE}/{folder}", [])) == on_disk
    for files in data_files.values():
        for f in files:
            assert (ROOT / f).is_file(), f"data_files lists a missing file: {f}"
    assert (ROOT / "config" / "slam_base.yaml").is_file()
    assert any(f.endswith(".launch.py") for f in data_files[f"share/{PACKAGE}/launch"])
    assert any(f.endswith(".rviz") for f in data_files[f"share/{PACKAGE}/rviz"])


def test_setup_entry_points_and_python_range(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    scripts = dict(s.replace(" ", "").split("=", 1) for s in kw["entry_points"]["console_scripts"])
    assert scripts["mast3r-slam-ros"] == "mast3r_slam_ros.cli:main"
    assert "slam_node" in scripts  # `ros2 run mast3r_slam_ros slam_node`
    for target in scripts.values():
        module, func = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"console script target module missing: {module}"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), f"{target} not defined"
    assert kw["python_requires"] == ">=3.10,<3.13"
    assert {"pytest"} <= {re.split(r"[<>=\[ ]", r)[0] for r in kw["extras_require"]["test"]}
    # ros2 run looks for executables in lib/<pkg>: setup.cfg must route scripts there (colcon/ament_python)
    cfg = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert f"script_dir=$base/lib/{PACKAGE}" in cfg.replace(" ", "")
    assert f"install_scripts=$base/lib/{PACKAGE}" in cfg.replace(" ", "")


def test_every_cli_subcommand_module_has_the_protocol():
    from mast3r_slam_ros import cli

    for name, (module, _help) in cli.COMMANDS.items():
        path = ROOT / PACKAGE / "apps" / f"{module}.py"
        assert path.is_file(), f"sub-command {name!r}: {path} missing"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "main"} <= funcs, f"sub-command {name!r} lacks add_arguments/main"


def _clean_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def test_cli_help_runs_in_a_fresh_interpreter():
    from mast3r_slam_ros import cli

    proc = subprocess.run([sys.executable, "-m", "mast3r_slam_ros.cli", "--help"], capture_output=True, text=True,
                          encoding="utf-8", cwd=ROOT, env=_clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "mast3r_slam_ros.cli", "eval", "--help"], capture_output=True,
                          text=True, encoding="utf-8", cwd=ROOT, env=_clean_env(), timeout=120)
    assert proc.returncode == 0 and "--max-diff" in proc.stdout and "--no-scale" in proc.stdout, proc.stderr
    # the installed console script (pip install -e . puts it next to the interpreter)
    script = Path(sys.executable).parent / ("mast3r-slam-ros.exe" if os.name == "nt" else "mast3r-slam-ros")
    if script.exists():
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, encoding="utf-8",
                              env=_clean_env(), timeout=120)
        assert proc.returncode == 0 and "eval" in proc.stdout, proc.stderr


def _ci_test_command() -> str:
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    m = re.search(r'^TEST_CMD="([^"]+)"', text, flags=re.M)
    assert m, ".ci/run must define TEST_CMD"
    return m.group(1)


def test_readme_test_command_is_the_one_ci_runs():
    cmd = _ci_test_command()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S)
    assert any(line.strip() == cmd for b in blocks for line in b.splitlines()), \
        f"README.md must show the CI test command verbatim: {cmd}"
    argv = shlex.split(cmd)
    assert argv[1:3] == ["-m", "pytest"] and argv[-1] == "test"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for needed in ("torch==2.13.0", "tools/setup_ros_env.py", "tools/check_cuda_sources.py",
                   "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST", "ROS_LOCALHOST_ONLY=1", "ROS_PYTHON_CHECK_FIELDS=1",
                   "ROS_DOMAIN_ID=", "AMENT_PREFIX_PATH="):
        assert needed in ci, f".ci/run lacks {needed}"
    # torch must be installed before the package, so pip never resolves another torch
    assert ci.index("pip install -q \"torch==2.13.0\"") < ci.index('-e ".[test]"')
    if os.name == "posix":
        assert os.access(ROOT / ".ci" / "run", os.X_OK), ".ci/run must be executable"


def test_readme_and_license_state_the_weights_licence():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lic = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "BSD 3-Clause" in lic and "CC BY-NC-SA 4.0" in lic
    for needed in ("naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric", "CC BY-NC-SA 4.0", "retrieval",
                   "codebook", "--merge-install", "DISTUTILS_USE_SDK=1", "TORCH_CUDA_ARCH_LIST", "cu128"):
        assert needed in readme, f"README.md lacks {needed!r}"
    for heading in ("## Windows install", "## ROS 2 node", "### Parameters", "### Published topics"):
        assert heading in readme


# ------------------------------------------------------------------------------------ tools/check_cuda_sources.py
def _load_checker():
    spec = importlib.util.spec_from_file_location("_check_cuda_sources", ROOT / "tools" / "check_cuda_sources.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_cuda_lint_flags_msvc_hostile_code_and_ignores_comments(tmp_path):
    chk = _load_checker()
    src = tmp_path / "k.cu"
    src.write_text(
        "// a long comment: long, not, __builtin_expect\n"
        "/* long\n   block */\n"
        '#include <torch/extension.h>\n'
        'const char* msg = "long string and not a type";\n'
        "__global__ void ok(const int64_t* __restrict__ a, float* b, int64_t n) { if (n > 0 && !b) b[0] = a[0]; }\n"
        "__global__ void bad(long* a) { a[0] = 1; }\n"
        "auto p = t.data_ptr<long>();\n"
        "unsigned long long u = 0;\n"
        "#include <unistd.h>\n"
        "int f(int x) { return __builtin_popcount(x); }\n"
        "bool g(bool a, bool b) { return a and not b; }\n"
        "#include <span>\n"
        "template <typename T> concept Small = sizeof(T) < 8;\n"
        "int requires_count = 0;  // identifiers merely containing a keyword are fine\n",
        encoding="utf-8",
    )
    findings = chk.lint_file(src)
    by_line: dict[int, list[str]] = {}
    for f in findings:
        by_line.setdefault(f.line, []).append(f.message)
    assert set(by_line) == {7, 8, 9, 10, 11, 12, 13, 14}, by_line
    assert all("long" in m for m in by_line[7] + by_line[8] + by_line[9])
    assert "POSIX" in by_line[10][0] and "builtin" in by_line[11][0] and "alternative" in by_line[12][0]
    assert all("C++20" in m for m in by_line[13] + by_line[14])


def test_cuda_lint_of_repository_sources_is_clean_and_tool_skips_without_sources(tmp_path, capsys):
    chk = _load_checker()
    # the repository's own csrc/ passes the lint (the nvcc compile runs in .ci/run, not here: minutes per file)
    assert chk.main(["--lint-only"]) == 0, capsys.readouterr().out
    empty = tmp_path / "csrc"
    empty.mkdir()
    assert chk.main(["--csrc", str(empty)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert chk.arch_flags("8.6;12.0") == ["-gencode", "arch=compute_86,code=sm_86",
                                          "-gencode", "arch=compute_120,code=sm_120"]
    with pytest.raises(ValueError):
        chk.arch_flags("sm_86")
