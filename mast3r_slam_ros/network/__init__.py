"""Network layer of mast3r_slam_ros: the MASt3R model, checkpoint loading, SLAM inference wrappers, retrieval.

Public API (docs/interfaces.md): :class:`HeadOutput`, :class:`Mast3rModel` (a Predictor with ``encode``/``decode``),
:class:`Mast3rConfig`, :func:`load_model`, and the wrappers in :mod:`mast3r_slam_ros.network.inference`.
"""

from __future__ import annotations

from .heads import HeadOutput
from .inference import Predictor, StackedPrediction
from .model import AsymmetricMASt3R, Mast3rConfig, Mast3rModel
from .precision import PRECISIONS

__all__ = ["HeadOutput", "Predictor", "StackedPrediction", "Mast3rModel", "AsymmetricMASt3R", "Mast3rConfig",
           "PRECISIONS", "load_model", "load_predictor", "DEFAULT_REPO_ID"]


def __getattr__(name: str):
    # the loader pulls in huggingface_hub lazily; keep `import mast3r_slam_ros.network` light
    if name in ("load_model", "DEFAULT_REPO_ID"):
        from . import loader

        return getattr(loader, name)
    if name == "load_predictor":
        from .graphs import load_predictor

        return load_predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
