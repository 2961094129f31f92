#!/usr/bin/env python3
"""Compile-check the CUDA sources in ``csrc/`` without a GPU and lint them for MSVC-hostile code.

Why: the CUDA extension must build with MSVC + nvcc on Windows, but CI has no GPU and no Windows. This tool catches
typos, C++ errors and the known MSVC traps on Linux:

1. **Lint** every file in ``csrc/`` (``*.cu *.cuh *.cpp *.h *.hpp``), comments and string literals removed:
   - the type ``long`` (32-bit under MSVC's LLP64 model; ``data_ptr<long>`` gives LNK2001 there) -> use ``int64_t``;
   - GCC-only ``__builtin_*`` / ``__attribute__`` and POSIX-only headers (``unistd.h``, ``sys/*.h``, ``pthread.h``);
   - the alternative operator tokens ``and``/``or``/``not`` (MSVC rejects them without ``/permissive-``).
2. **Compile** every ``csrc/*.cu`` and ``csrc/*.cpp`` with ``nvcc -c`` against the installed torch's headers, with the
   flags ``torch.utils.cpp_extension.BuildExtension`` would use (``COMMON_NVCC_FLAGS``, ``-fPIC``,
   ``-DTORCH_API_INCLUDE_EXTENSION_H``, ``-DTORCH_EXTENSION_NAME=_cuda``, the C++ ABI flag), the C++ standard torch's
   builder uses for the installed torch (``c++20`` from torch 2.10, ``c++17`` before; forcing C++17 against C++20
   headers compiles but mismatches libtorch's inline code) and ``-Werror=vla`` (MSVC has no variable-length arrays).
   Object files go to a temporary folder and are discarded. Because users' Windows wheels (torch 2.7-2.9) build as
   C++17, the lint also rejects C++20-only keywords and headers.

A CPU-only torch wheel ships ``ATen/cuda`` and ``c10/cuda`` headers but not the build-generated
``c10/cuda/impl/cuda_cmake_macros.h``, and a compiler-only CUDA toolkit may lack the cuBLAS/cuSPARSE/cuSOLVER headers
that ``ATen/cuda/CUDAContext.h`` includes. For each such header that cannot be found, a minimal declaration-only stub
(opaque handle types and status enums, as in the real headers) is written to a temporary include folder and reported.
This is a compile check: nothing is linked, so stubs cannot hide a missing symbol at run time (the real build on a
CUDA machine uses the real headers).

Exit status: 0 = clean (or no sources: "skipped" is printed), 1 = a lint finding or a compile error, 2 = no nvcc.

Usage: ``python tools/check_cuda_sources.py [--csrc DIR] [--nvcc PATH] [--std c++20] [--arch "8.6;12.0"] [--jobs N]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILE_SUFFIXES = (".cu", ".cpp")
LINT_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")
# one architecture is enough for a compile check (device code is generated per arch, the slow part); 12.0 =
# RTX 50xx, the newest target users build for
DEFAULT_ARCH = "12.0"

#: stub headers (relative path -> content) used only when the real header is not on the include path
STUBS: dict[str, str] = {
    "c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n",
    "cublas_v2.h": (
        "#pragma once\n"
        "typedef struct cublasContext* cublasHandle_t;\n"
        "typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1 } cublasStatus_t;\n"
    ),
    "cublasLt.h": "#pragma once\n#include <cublas_v2.h>\ntypedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": (
        "#pragma once\n"
        "typedef struct cusparseContext* cusparseHandle_t;\n"
        "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
        "const char* cusparseGetErrorString(cusparseStatus_t status);\n"
    ),
    "cusolver_common.h": (
        "#pragma once\n"
        "typedef enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 } cusolverStatus_t;\n"
    ),
    "cusolverDn.h": "#pragma once\n#include <cusolver_common.h>\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n",
}


@dataclass
class LintFinding:
    """One MSVC-hostile construct: ``path:line: message``."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


_LINT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\blong\b"), "'long' is 32-bit under MSVC (LLP64); use int64_t / uint64_t"),
    (re.compile(r"\b__builtin_\w+"), "GCC builtin; not available in MSVC"),
    (re.compile(r"\b__attribute__\b"), "GCC __attribute__; not available in MSVC (use a portable macro)"),
    (re.compile(r"#\s*include\s*<(unistd\.h|pthread\.h|sys/[\w/]+\.h)>"), "POSIX-only header; not on Windows"),
    (re.compile(r"(?<![\w.])(and|or|not)(?![\w.])"), "alternative operator token; MSVC needs /permissive- (use && || !)"),
    (re.compile(r"\b(requires|concept|consteval|constinit|co_await|co_yield|co_return)\b|<=>"),
     "C++20-only construct; torch < 2.10 (e.g. Windows cu128 wheels 2.7-2.9) builds extensions as C++17"),
    (re.compile(r"#\s*include\s*<(span|numbers|ranges|concepts|format|bit|compare|coroutine)>"),
     "C++20-only header; torch < 2.10 builds extensions as C++17"),
]


def strip_comments_and_strings(text: str) -> str:
    """Blank out C/C++ comments and string/char literals, keeping newlines so line numbers stay valid.

    ``#include <...>`` lines are kept intact (their ``<...>`` part is not a string literal).
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif c == "/" and nxt == "*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * max(0, j - i - 2) + (c if j - i >= 2 else ""))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def lint_file(path: Path) -> list[LintFinding]:
    """Return the MSVC-hostile constructs found in one source file (comments and strings ignored)."""
    code = strip_comments_and_strings(path.read_text(encoding="utf-8", errors="replace"))
    findings = []
    for lineno, line in enumerate(code.splitlines(), start=1):
        stripped = line.lstrip()
        if re.match(r"#\s*include\b", stripped):
            rules = [r for r in _LINT_RULES if "header" in r[1]]
        elif stripped.startswith("#"):
            rules = _LINT_RULES[:3]  # other preprocessor lines: 'long', builtins, attributes
        else:
            rules = [r for r in _LINT_RULES if "header" not in r[1]]
        for pattern, message in rules:
            if pattern.search(line):
                findings.append(LintFinding(path, lineno, f"{message}: {line.strip()}"))
    return findings


def find_nvcc(explicit: str | None) -> Path | None:
    """Locate nvcc: ``--nvcc``, ``$NVCC``, PATH, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``."""
    candidates = [explicit, os.environ.get("NVCC"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"]
    for cand in candidates:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def cuda_include_dirs(nvcc: Path) -> list[Path]:
    """Include folders of the toolkit that owns ``nvcc`` (follows wrapper scripts and symlinks best-effort)."""
    dirs = [nvcc.resolve().parent.parent / "include"]
    try:  # /usr/local/bin/nvcc may be a shell wrapper 'exec /usr/local/cuda-X/bin/nvcc "$@"'
        text = nvcc.read_text(encoding="utf-8", errors="ignore")[:4096]
        for m in re.finditer(r"(/\S+)/bin/nvcc", text):
            dirs.append(Path(m.group(1)) / "include")
    except OSError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def torch_build_flags() -> tuple[list[Path], list[str]]:
    """Include folders and preprocessor/nvcc flags that torch's BuildExtension uses for a CUDA extension."""
    import torch
    from torch.utils import cpp_extension

    includes = [Path(p) for p in cpp_extension.include_paths()]
    flags = list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_cuda"]
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    if abi is not None and os.name != "nt":
        flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(bool(abi))}")
    return includes, flags


def write_missing_stubs(search_dirs: list[Path], stub_dir: Path) -> list[str]:
    """Write a stub for every header of ``STUBS`` that none of ``search_dirs`` holds; return their names."""
    used = []
    for rel, content in STUBS.items():
        if any((d / rel).is_file() for d in search_dirs):
            continue
        target = stub_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        used.append(rel)
    return used


def arch_flags(arch_list: str) -> list[str]:
    """``"8.6;12.0"`` -> ``-gencode arch=compute_86,code=sm_86 ...`` (same notation as TORCH_CUDA_ARCH_LIST)."""
    flags = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)(\+PTX)?", item)
        if not m:
            raise ValueError(f"bad CUDA arch {item!r} in {arch_list!r} (expected e.g. '8.6;12.0')")
        num = f"{m.group(1)}{m.group(2)}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def compile_one(nvcc: Path, src: Path, out_dir: Path, includes: list[Path], flags: list[str]) -> tuple[bool, str, float]:
    """Run ``nvcc -c src``; return (ok, combined output, seconds)."""
    cmd = [str(nvcc), "-c", str(src), "-o", str(out_dir / (src.name + ".o"))]
    for inc in includes:
        cmd += ["-I", str(inc)]
    cmd += flags
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                          errors="replace", check=False)
    return proc.returncode == 0, proc.stdout, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csrc", type=Path, default=ROOT / "csrc", help="folder with the CUDA sources")
    parser.add_argument("--nvcc", default=None, help="nvcc executable (default: PATH, $CUDA_HOME/bin)")
    parser.add_argument("--std", default=None,
                        help="C++ standard for nvcc (default: as torch's builder: c++20 for torch >= 2.10, else c++17)")
    parser.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH,
                        help=f"CUDA archs, TORCH_CUDA_ARCH_LIST notation (default {DEFAULT_ARCH})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel nvcc processes (default: min(2, cores))")
    parser.add_argument("--lint-only", action="store_true", help="only run the MSVC lint, no nvcc")
    parser.add_argument("--show-warnings", action="store_true", help="print compiler output of files that pass")
    args = parser.parse_args(argv)

    csrc = args.csrc
    if not csrc.is_dir():
        print(f"check_cuda_sources: no folder {csrc}; nothing to check (skipped)")
        return 0
    lint_files = sorted(p for p in csrc.rglob("*") if p.suffix in LINT_SUFFIXES and p.is_file())
    sources = sorted(p for p in csrc.glob("*") if p.suffix in COMPILE_SUFFIXES and p.is_file())

    findings = [f for p in lint_files for f in lint_file(p)]
    for f in findings:
        print(f"LINT {f}")
    print(f"check_cuda_sources: lint of {len(lint_files)} file(s): {len(findings)} finding(s)")

    if not sources:
        print(f"check_cuda_sources: no *.cu/*.cpp sources in {csrc}; nvcc compile check skipped")
        return 1 if findings else 0
    if args.lint_only:
        return 1 if findings else 0

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_cuda_sources: ERROR: nvcc not found (set --nvcc, $NVCC or $CUDA_HOME)", file=sys.stderr)
        return 2
    includes, flags = torch_build_flags()
    if args.std is None:
        import torch

        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        args.std = "c++20" if (major, minor) >= (2, 10) else "c++17"
    includes = [csrc.resolve()] + includes
    py_include = sysconfig.get_paths()["include"]
    if py_include:
        includes.append(Path(py_include))
    flags += [f"-std={args.std}", "--compiler-options", "-fPIC", "-Xcompiler", "-Werror=vla"] + arch_flags(args.arch)
    ok_all = True
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        tmp_path = Path(tmp)
        stub_dir = tmp_path / "stub_include"
        stubs = write_missing_stubs(includes + cuda_include_dirs(nvcc), stub_dir)
        if stubs:
            print(f"check_cuda_sources: declaration-only stubs for headers absent here: {', '.join(stubs)}")
            includes = includes + [stub_dir]
        jobs = max(1, min(args.jobs, len(sources)))
        print(f"check_cuda_sources: {nvcc} -std={args.std} arch={args.arch}; {len(sources)} source(s), {jobs} job(s)")
        # nvcc runs as separate processes; the pool only waits on them (this is a build tool, not the SLAM core)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda src: compile_one(nvcc, src, tmp_path, includes, flags), sources))
        for src, (ok, output, seconds) in zip(sources, results):
            status = "ok" if ok else "FAILED"
            print(f"  nvcc -c {src.name}: {status} ({seconds:.1f} s)")
            if not ok or args.show_warnings:
                print(output.rstrip())
            ok_all &= ok
    if findings:
        print("check_cuda_sources: FAILED (lint findings above)")
        return 1
    if not ok_all:
        print("check_cuda_sources: FAILED (compile errors above)")
        return 1
    print("check_cuda_sources: all sources compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
