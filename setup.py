"""Build script for mast3r_slam_ros (ament_python package; also a plain pip package).

- ``pip install -e .[test]`` in a virtual environment (Linux or Windows).
- ``colcon build --merge-install`` in a ROS 2 workspace (installs launch/config/rviz into ``share/mast3r_slam_ros``
  and the console scripts into ``lib/mast3r_slam_ros`` so ``ros2 run mast3r_slam_ros slam_node`` works).

The CUDA extension ``mast3r_slam_ros._cuda`` is built from ``csrc/`` when CUDA and a compiler are available.
``MAST3R_SLAM_ROS_BUILD_CUDA=1`` forces it (fails loudly if impossible), ``=0`` skips it. Without it every kernel runs
through its PyTorch implementation.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "mast3r_slam_ros"
ROOT = Path(__file__).resolve().parent


def _data_files() -> list[tuple[str, list[str]]]:
    files = [
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ]
    for folder in ("launch", "config", "rviz"):
        entries = sorted(str(p.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / folder).glob("*") if p.is_file())
        if entries:
            files.append((f"share/{PACKAGE}/{folder}", entries))
    return files


def _cuda_extension() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for the optional CUDA extension."""
    flag = os.environ.get("MAST3R_SLAM_ROS_BUILD_CUDA", "auto").strip().lower()
    sources = sorted(str(p.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / "csrc").glob("*.c*")
                     if p.suffix in (".cu", ".cpp"))
    if flag in ("0", "false", "no") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag in ("1", "true", "yes"):
            raise
        return [], {}
    if CUDA_HOME is None:
        if flag in ("1", "true", "yes"):
            raise RuntimeError("MAST3R_SLAM_ROS_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return [], {}
    # No -std flag: torch's BuildExtension adds the standard its own headers need (C++17 up to torch 2.9, C++20 from
    # 2.10). Forcing C++17 against C++20 headers builds, but inline code then differs between the extension and
    # libtorch (seen: a segfault when a TORCH_CHECK with formatted sizes throws, torch 2.11 + nvcc 13).
    if os.name == "nt":
        cxx = ["/O2"]
        nvcc = ["-O3", "-Xcompiler", "/wd4819"]
    else:
        cxx = ["-O3"]
        nvcc = ["-O3"]
    ext = CUDAExtension(
        name=f"{PACKAGE}._cuda",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    del torch
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=os.name != "nt")}


ext_modules, cmdclass = _cuda_extension()

setup(
    name=PACKAGE,
    version="0.1.0",
    description="MASt3R-SLAM dense monocular SLAM as a single-process ROS 2 node (Windows and Linux)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=_data_files(),
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "torch>=2.4",
        "pyyaml>=6",
        "pillow>=9",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        "scipy>=1.10",
        "huggingface_hub>=0.20",
        "rosbags>=0.10",
        "evo>=1.28",
        "plyfile>=1.0",
        "safetensors>=0.4",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-image>=0.21"],
        "bench": ["scikit-image>=0.21"],
        "retrieval": ["asmk"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
    maintainer="mast3r_slam_ros developers",
    maintainer_email="mast3r-slam-ros@users.noreply.github.com",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "mast3r-slam-ros = mast3r_slam_ros.cli:main",
            "slam_node = mast3r_slam_ros.ros.node:main",
        ],
    },
)
