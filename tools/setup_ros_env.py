#!/usr/bin/env python3
"""Install rclpy and the ROS 2 message packages the node needs into a Python virtual environment (no ROS install).

Usage::

    python tools/setup_ros_env.py <venv> [--distro jazzy] [--force] [--check]

What it does (recipe and measurements: ``shared/spec/ros_test_env.md`` §1 and §3, Appendix A):

1. ``pip install "ros-jazzy-rclpy[fastrtps]"`` plus the message wheels ``ros-jazzy-{std,sensor,geometry,nav,
   visualization,diagnostic}-msgs`` and ``ros-jazzy-std-srvs`` (the ``[fastrtps]`` extra is what brings an RMW).
2. Generates, compiles and installs the Python bindings of ``tf2_msgs`` (``TFMessage``; PyPI has no wheel) with the
   rosidl build tools from PyPI, CMake and a C compiler, into the venv prefix. Any of ``std_srvs`` /
   ``diagnostic_msgs`` that has no wheel for the chosen distro is generated the same way.
3. Verifies, in a fresh interpreter of the venv, that ``rclpy.init()`` works and every message module imports.

Idempotent: when step 3 already passes, nothing is installed (``--force`` reinstalls). Exit code 0 on success, 1 with
a message naming the failed step otherwise.

The ros_wheels_bootstrapper trap: the wheel ``ros-wheels-bootstrapper`` installs a ``.pth`` file that re-executes
the venv's interpreter once with ``LD_LIBRARY_PATH`` pointing at the venv's ROS libraries and sets
``_ROS_WHEELS_BOOTSTRAP_COMPLETE=1``. A child interpreter of *another* venv that inherits these two variables skips its
own bootstrap and loads the wrong libraries (or none), so every command this script starts gets an environment with
both removed. Linux only: the ``ros-jazzy-*`` wheels are ``manylinux_2_28_x86_64``, CPython 3.10–3.12.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

#: message / service packages the node imports, with the wheel that provides each (``{p}`` = distro prefix)
WHEEL_PACKAGES = {
    "std_msgs": "{p}std-msgs",
    "sensor_msgs": "{p}sensor-msgs",
    "geometry_msgs": "{p}geometry-msgs",
    "nav_msgs": "{p}nav-msgs",
    "visualization_msgs": "{p}visualization-msgs",
    "std_srvs": "{p}std-srvs",
    "diagnostic_msgs": "{p}diagnostic-msgs",
}
#: packages whose wheel is optional: if pip cannot find it, the bindings are generated from the definitions below
OPTIONAL_WHEELS = ("std_srvs", "diagnostic_msgs")

#: interface definitions (identical to the ROS 2 ``humble`` branches of ros2/geometry2 and ros2/common_interfaces)
GENERATED_INTERFACES: dict[str, dict] = {
    "tf2_msgs": {
        "deps": ["geometry_msgs"],
        "files": {"msg/TFMessage.msg": "geometry_msgs/TransformStamped[] transforms\n"},
        "check": "from tf2_msgs.msg import TFMessage",
    },
    "std_srvs": {
        "deps": [],
        "files": {
            "srv/Empty.srv": "---\n",
            "srv/SetBool.srv": "bool data\n---\nbool success\nstring message\n",
            "srv/Trigger.srv": "---\nbool success\nstring message\n",
        },
        "check": "from std_srvs.srv import Trigger, SetBool, Empty",
    },
    "diagnostic_msgs": {
        "deps": ["std_msgs"],
        "files": {
            "msg/KeyValue.msg": "string key\nstring value\n",
            "msg/DiagnosticStatus.msg": (
                "byte OK=0\nbyte WARN=1\nbyte ERROR=2\nbyte STALE=3\n"
                "byte level\nstring name\nstring message\nstring hardware_id\nKeyValue[] values\n"
            ),
            "msg/DiagnosticArray.msg": "std_msgs/Header header\nDiagnosticStatus[] status\n",
        },
        "check": "from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue",
    },
}

#: build tools needed by rosidl_generate_interfaces (their wheels declare almost no dependencies; spec §3 step 1)
BUILD_TOOLS = {
    "jazzy": [
        "ament-cmake", "ament-package", "ament-cmake-include-directories", "rosidl-default-generators",
        "rosidl-core-generators", "ament-cmake-ros", "ament-cmake-gmock", "ament-cmake-gtest", "ament-cmake-pytest",
        "gmock-vendor", "gtest-vendor", "python-cmake-module",
    ],
    "kilted": [
        "ament-cmake", "ament-package", "ament-cmake-include-directories", "rosidl-default-generators",
        "rosidl-core-generators", "ament-cmake-ros", "ament-cmake-ros-core", "ament-cmake-gmock",
        "ament-cmake-gtest", "ament-cmake-pytest", "gmock-vendor", "gtest-vendor",
    ],
}

BOOTSTRAP_VARS = ("_ROS_WHEELS_BOOTSTRAP_COMPLETE", "LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONPATH")


class SetupError(RuntimeError):
    """A step of the set-up failed; the message names the step and what to do."""


def log(msg: str) -> None:
    print(f"[setup_ros_env] {msg}", flush=True)


def clean_env(venv: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process of ``venv``: bootstrapper variables of the calling interpreter removed."""
    env = {k: v for k, v in os.environ.items() if k not in BOOTSTRAP_VARS}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = str(venv_bin(venv)) + os.pathsep + env.get("PATH", "")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if extra:
        env.update(extra)
    return env


def venv_bin(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin")


def venv_python(venv: Path) -> Path:
    for name in ("python.exe", "python3", "python"):
        p = venv_bin(venv) / name
        if p.exists():
            return p
    raise SetupError(f"{venv} is not a virtual environment: no python in {venv_bin(venv)} "
                     f"(create it with `python3 -m venv {venv}`)")


def run(cmd: list[str], venv: Path, step: str, cwd: Path | None = None, extra_env: dict[str, str] | None = None,
        capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the cleaned environment; raise SetupError naming ``step`` on a non-zero exit."""
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(venv, extra_env), text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if proc.returncode != 0:
        tail = ("\n" + "\n".join((proc.stdout or "").splitlines()[-40:])) if capture else ""
        raise SetupError(f"step '{step}' failed (exit {proc.returncode}): {' '.join(cmd)}{tail}")
    return proc


def probe(venv: Path, code: str) -> tuple[bool, str]:
    """Run ``code`` in a fresh venv interpreter (so its bootstrapper runs); return (ok, output)."""
    proc = subprocess.run([str(venv_python(venv)), "-c", code], env=clean_env(venv), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return proc.returncode == 0, proc.stdout.strip()


def missing_modules(venv: Path) -> list[str]:
    """Names of the ROS Python packages that do not import in ``venv`` (``rclpy`` checked with init/shutdown)."""
    missing = []
    ok, _ = probe(venv, "import rclpy; rclpy.init(); rclpy.shutdown()")
    if not ok:
        missing.append("rclpy")
    for pkg in list(WHEEL_PACKAGES) + ["tf2_msgs"]:
        check = GENERATED_INTERFACES[pkg]["check"] if pkg in GENERATED_INTERFACES else f"import {pkg}.msg"
        if not probe(venv, check)[0]:
            missing.append(pkg)
    return missing


def pip_install(venv: Path, reqs: list[str], step: str) -> None:
    run([str(venv_python(venv)), "-m", "pip", "install", "-q", *reqs], venv, step)


def pip_has(venv: Path, req: str) -> bool:
    """True if pip can resolve ``req`` (used only for the optional wheels)."""
    proc = subprocess.run([str(venv_python(venv)), "-m", "pip", "download", "-q", "--no-deps", "-d",
                           tempfile.mkdtemp(prefix="ros_probe_"), req], env=clean_env(venv), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc.returncode == 0


def patch_exported_cmake(venv: Path) -> int:
    """Replace the manylinux build paths baked into ``share/*/cmake/*.cmake`` by this venv's (spec §3 step 2)."""
    pyinc = sysconfig.get_paths()["include"]
    ok, out = probe(venv, "import sysconfig, numpy; print(sysconfig.get_paths()['include']); print(numpy.get_include())")
    if ok and len(out.splitlines()) >= 2:
        pyinc, npinc = out.splitlines()[-2:]
    else:
        raise SetupError("step 'patch cmake exports' failed: numpy is not importable in the venv "
                         f"(pip install numpy into {venv}):\n{out}")
    pat_np = re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include")
    pat_py = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")
    n = 0
    for f in (venv / "share").glob("*/cmake/*.cmake"):
        text = f.read_text(encoding="utf-8", errors="surrogateescape")
        if "/opt/python/" not in text:
            continue
        new = pat_py.sub(pyinc.replace("\\", "/"), pat_np.sub(npinc.replace("\\", "/"), text))
        if new != text:
            f.write_text(new, encoding="utf-8", errors="surrogateescape")
            n += 1
    return n


def build_interface_package(venv: Path, name: str, distro: str, workdir: Path) -> None:
    """Generate + compile + install the rosidl bindings of interface package ``name`` into the venv prefix."""
    spec = GENERATED_INTERFACES[name]
    for tool in ("cmake", "make"):
        if shutil.which(tool) is None:
            raise SetupError(f"step 'build {name}' needs `{tool}` on PATH (and a C/C++ compiler): "
                             "apt-get install cmake make g++")
    src, build = workdir / name / "src", workdir / name / "build"
    for rel, text in spec["files"].items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    deps = spec["deps"]
    files = " ".join(f'"{rel}"' for rel in spec["files"])
    (src / "CMakeLists.txt").write_text(textwrap.dedent(f"""\
        cmake_minimum_required(VERSION 3.8)
        project({name})
        find_package(ament_cmake REQUIRED)
        find_package(rosidl_default_generators REQUIRED)
        {"".join(f"find_package({d} REQUIRED)" + chr(10) for d in deps)}
        rosidl_generate_interfaces(${{PROJECT_NAME}} {files} {("DEPENDENCIES " + " ".join(deps)) if deps else ""})
        ament_export_dependencies(rosidl_default_runtime)
        ament_package()
        """), encoding="utf-8")
    depends = "".join(f"  <depend>{d}</depend>\n" for d in deps)
    (src / "package.xml").write_text(
        '<?xml version="1.0"?>\n<package format="3">\n'
        f"  <name>{name}</name>\n  <version>0.0.0</version>\n"
        f"  <description>{name} interfaces generated by mast3r_slam_ros tools/setup_ros_env.py</description>\n"
        '  <maintainer email="none@example.com">none</maintainer>\n  <license>BSD-3-Clause</license>\n'
        "  <buildtool_depend>ament_cmake</buildtool_depend>\n"
        "  <buildtool_depend>rosidl_default_generators</buildtool_depend>\n"
        f"{depends}"
        "  <exec_depend>rosidl_default_runtime</exec_depend>\n"
        "  <member_of_group>rosidl_interface_packages</member_of_group>\n"
        "  <export><build_type>ament_cmake</build_type></export>\n</package>\n", encoding="utf-8")
    build.mkdir(parents=True, exist_ok=True)
    env = {"AMENT_PREFIX_PATH": str(venv)}
    py = str(venv_python(venv))
    log(f"configuring {name} (cmake)")
    run(["cmake", str(src), f"-DCMAKE_PREFIX_PATH={venv}", f"-DCMAKE_INSTALL_PREFIX={venv}",
         f"-DPython3_EXECUTABLE={py}", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF"],
        venv, f"cmake configure {name}", cwd=build, extra_env=env, capture=True)
    log(f"building {name} (make install)")
    run(["make", f"-j{max(1, min(4, os.cpu_count() or 1))}", "install"], venv, f"make install {name}",
        cwd=build, extra_env=env, capture=True)


def setup(venv: Path, distro: str = "jazzy", force: bool = False) -> list[str]:
    """Install everything into ``venv``; return the list of packages that were generated locally."""
    venv = venv.resolve()
    py = venv_python(venv)
    ok, ver = probe(venv, "import sys; print('%d.%d' % sys.version_info[:2])")
    if not ok or ver not in ("3.10", "3.11", "3.12"):
        raise SetupError(f"the ros-{distro}-* wheels exist only for CPython 3.10-3.12 on manylinux x86_64; "
                         f"{py} is Python {ver or '?'}")
    if sys.platform != "linux":
        raise SetupError("the ros-* wheels exist only for Linux; on Windows install ROS 2 Humble from the binary "
                         "archive and use its Python instead")
    prefix = "ros-jazzy-" if distro == "jazzy" else "ros-"
    if not force:
        missing = missing_modules(venv)
        if not missing:
            log(f"{venv}: rclpy and all message packages already import; nothing to do")
            return []
        log(f"missing in {venv}: {', '.join(missing)}")
    reqs = [f"{prefix}rclpy[fastrtps]"]
    for pkg, wheel in WHEEL_PACKAGES.items():
        w = wheel.format(p=prefix)
        if pkg in OPTIONAL_WHEELS and not pip_has(venv, w):
            log(f"no wheel {w}: its bindings will be generated")
            continue
        reqs.append(w)
    log("pip install " + " ".join(reqs))
    pip_install(venv, reqs, "pip install rclpy + message wheels")
    to_generate = [p for p in GENERATED_INTERFACES
                   if (force and p == "tf2_msgs") or not probe(venv, GENERATED_INTERFACES[p]["check"])[0]]
    if to_generate:
        tools = [prefix + t for t in BUILD_TOOLS[distro]] + ["catkin_pkg", "numpy"]  # numpy: rosidl_generator_py
        log("pip install build tools: " + " ".join(tools))
        pip_install(venv, tools, "pip install rosidl build tools")
        n = patch_exported_cmake(venv)
        log(f"patched {n} exported cmake file(s) with this venv's include paths")
        with tempfile.TemporaryDirectory(prefix="ros_iface_") as tmp:
            for name in to_generate:
                build_interface_package(venv, name, distro, Path(tmp))
    missing = missing_modules(venv)
    if missing:
        raise SetupError(f"step 'verify' failed: still not importable in {venv}: {', '.join(missing)}")
    log(f"done: rclpy + {', '.join(list(WHEEL_PACKAGES) + ['tf2_msgs'])} import in {venv}")
    return to_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("venv", type=Path, help="path of an existing virtual environment (python -m venv DIR)")
    parser.add_argument("--distro", choices=("jazzy", "kilted"), default="jazzy",
                        help="ROS 2 distribution of the wheels (default jazzy: closest to Humble's rclpy)")
    parser.add_argument("--force", action="store_true", help="reinstall and regenerate even if everything imports")
    parser.add_argument("--check", action="store_true", help="only report what is missing; exit 1 if anything is")
    args = parser.parse_args(argv)
    try:
        if not args.venv.is_dir():
            raise SetupError(f"{args.venv} does not exist (create it first: python3 -m venv {args.venv})")
        if args.check:
            missing = missing_modules(args.venv.resolve())
            log("missing: " + (", ".join(missing) if missing else "nothing"))
            return 1 if missing else 0
        setup(args.venv, args.distro, args.force)
    except SetupError as exc:
        print(f"[setup_ros_env] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
