"""Loader of the optional compiled CUDA extension ``mast3r_slam_ros._cuda`` (built from ``csrc/`` by ``setup.py``).

The import is attempted once, lazily; failure is remembered (with its reason) and the PyTorch implementation is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_EXT: ModuleType | None = None
_TRIED = False
_ERROR = ""

#: functions the extension must export (see csrc/bindings.cpp)
REQUIRED = ("iter_proj", "refine_matches", "gn_rays_blocks", "gn_calib_blocks", "gn_points_blocks")

#: functions added later (csrc/track_kernels.cu); an extension built before them still loads, and the dispatch falls
#: back to PyTorch for each one that is missing (:func:`has`)
OPTIONAL = ("track_system_rays", "track_system_calib", "rope_apply")


def load() -> ModuleType | None:
    """Return the extension module, or ``None`` if it is not built / cannot be loaded / CUDA is unavailable."""
    global _EXT, _TRIED, _ERROR
    if _TRIED:
        return _EXT
    _TRIED = True
    try:
        import torch

        if not torch.cuda.is_available():
            _ERROR = "torch.cuda.is_available() is False"
            return None
        mod = importlib.import_module("mast3r_slam_ros._cuda")
        missing = [name for name in REQUIRED if not hasattr(mod, name)]
        if missing:
            _ERROR = f"mast3r_slam_ros._cuda lacks {missing}"
            return None
        _EXT = mod
    except Exception as exc:  # ImportError, OSError (DLL load failed on Windows), undefined symbols...
        _ERROR = f"{type(exc).__name__}: {exc}"
        _EXT = None
    return _EXT


def load_error() -> str:
    """Why the extension is not available ("" if it loaded or was not tried yet)."""
    return _ERROR


def has(name: str) -> bool:
    """True if the extension loaded and exports ``name`` (for the :data:`OPTIONAL` functions)."""
    mod = load()
    return mod is not None and hasattr(mod, name)
