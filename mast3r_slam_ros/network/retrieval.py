"""Retrieval add-on of MASt3R for loop closure: token whitening + top-``nfeat`` token selection, safe codebook loading.

Spec ``mast3r_network.md`` §6. The ``..._retrieval_trainingfree.pth`` checkpoint holds a small ``RetrievalModel`` on
top of the (shared, frozen) MASt3R encoder: a float64 PCA ``prewhiten`` (``y = (x - m) @ p``), an optional MLP
``projector`` (``[Linear, LayerNorm, GELU]* + Linear``, optional residual), the attention ``a = ||z||_2`` of the
projector output, and an optional float64 ``postwhiten``. ``how_select_local`` keeps the ``nfeat`` tokens with the
largest attention (``torch.topk``, highest first). The checkpoint's ``args`` Namespace says which parts exist.

The ASMK codebook is a pickle ``{'type': 'Codebook', 'params': {'size': K}, 'state': {'centroids': ndarray [K,D]}}``.
It is read with a restricted unpickler that only rebuilds dicts, lists, strings, numbers and numpy arrays, so a
malicious file cannot execute code.
"""

from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .loader import CheckpointError, read_checkpoint


class Whitener(nn.Module):
    """PCA whitening ``y = (x - m) @ p`` computed in float64 (autocast off), returned in the input dtype.

    Parameters: ``m [1, D]`` float64, ``p [D, D]`` float64 (identity/zero at construction).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1, dim, dtype=torch.float64), requires_grad=False)
        self.p = nn.Parameter(torch.eye(dim, dtype=torch.float64), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D]`` any float dtype -> ``[..., D]`` in ``x.dtype``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = (x.to(torch.float64) - self.m) @ self.p
        return y.to(x.dtype)


class RetrievalHead(nn.Module):
    """The retrieval module of MASt3R-SLAM applied to cached encoder tokens (spec §6.1–6.2 step 1).

    Args:
        dim: encoder width (1024).
        prewhiten: build the float64 pre-whitening.
        hdims: projector widths (empty: identity projector).
        residual: add the pre-whitened input to the projector output (needs ``hdims[-1] == dim``).
        postwhiten: build the float64 post-whitening (of width ``hdims[-1]`` or ``dim``).
        nfeat: tokens kept per image (negative: that fraction of the tokens, as upstream).
    """

    def __init__(self, dim: int = 1024, prewhiten: bool = True, hdims: Sequence[int] = (), residual: bool = False,
                 postwhiten: bool = False, nfeat: float = 300) -> None:
        super().__init__()
        hdims = [int(h) for h in hdims]
        if residual and (not hdims or hdims[-1] != dim):
            raise ValueError(f"residual projector needs hdims[-1] == dim ({dim}), got {hdims}")
        self.dim = dim
        self.residual = residual
        self.nfeat = nfeat
        self.prewhiten = Whitener(dim) if prewhiten else nn.Identity()
        if hdims:
            layers: list[nn.Module] = []
            d = dim
            for h in hdims[:-1]:
                layers += [nn.Linear(d, h), nn.LayerNorm(h), nn.GELU()]
                d = h
            layers.append(nn.Linear(d, hdims[-1]))
            self.projector: nn.Module = nn.Sequential(*layers)
        else:
            self.projector = nn.Identity()
        self.out_dim = hdims[-1] if hdims else dim
        self.postwhiten = Whitener(self.out_dim) if postwhiten else nn.Identity()

    def features_and_attention(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """``feat [B, P, C]`` encoder tokens -> ``(z [B, P, D]`` whitened features, ``a [B, P]`` attention = norms)."""
        if feat.ndim != 3 or feat.shape[-1] != self.dim:
            raise ValueError(f"feat must be [B, P, {self.dim}], got {tuple(feat.shape)}")
        feat = feat.float()
        z = self.prewhiten(feat)
        proj = self.projector(z)
        if self.residual:
            proj = proj + z
        attn = proj.norm(dim=-1)
        return self.postwhiten(proj), attn

    def n_keep(self, n_tokens: int) -> int:
        """Number of tokens kept for an image of ``n_tokens`` tokens."""
        n = int(-self.nfeat * n_tokens) if self.nfeat < 0 else int(self.nfeat)
        return max(1, min(n, n_tokens))

    @torch.no_grad()
    def select(self, feat: Tensor) -> Tensor:
        """Local retrieval descriptors of one or more images (``how_select_local``).

        Args:
            feat: ``[B, P, C]`` (or ``[P, C]``) float encoder tokens (``Mast3rModel.encode`` output).

        Returns:
            ``[B, n, D]`` float32 (``[n, D]`` for a 2-D input) with ``n = min(nfeat, P)`` rows ordered by decreasing
            attention.
        """
        squeeze = feat.ndim == 2
        f = feat[None] if squeeze else feat
        z, attn = self.features_and_attention(f)
        idx = torch.topk(attn, self.n_keep(attn.shape[1]), dim=1).indices
        out = torch.gather(z, 1, idx[..., None].expand(-1, -1, z.shape[-1])).float()
        return out[0] if squeeze else out

    def forward(self, feat: Tensor) -> Tensor:
        """Same as :meth:`select`."""
        return self.select(feat)


# ------------------------------------------------------------------------------------------------ checkpoint
def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def retrieval_kwargs_from_args(args: Any, dim: int = 1024) -> dict[str, Any]:
    """Constructor arguments of :class:`RetrievalHead` from the checkpoint's ``args`` (Namespace or dict).

    Mirrors upstream ``Retriever``: ``hdims = list(map(int, args.hdims.split('_')))`` if non-empty; ``prewhiten``/
    ``postwhiten`` exist when not None. Raises CheckpointError for a feature weighting other than ``'l2norm'``.
    """
    featweights = _arg(args, "featweights", "l2norm")
    if featweights != "l2norm":
        raise CheckpointError(f"unsupported retrieval featweights {featweights!r} (only 'l2norm')")
    hd = _arg(args, "hdims", "")
    if isinstance(hd, str):
        hdims = [int(h) for h in hd.split("_")] if hd.strip() else []
    else:
        hdims = [int(h) for h in (hd or [])]
    return dict(dim=dim, prewhiten=_arg(args, "prewhiten") is not None, hdims=hdims,
                residual=bool(_arg(args, "residual", False)), postwhiten=_arg(args, "postwhiten") is not None,
                nfeat=_arg(args, "nfeat", 300))


def load_retrieval(path: str | Path, device: str | torch.device = "cpu", dim: int = 1024) -> RetrievalHead:
    """Load the retrieval module from ``..._retrieval_trainingfree.pth`` (``weights_only=True``, Namespace allowed).

    Keys starting with ``backbone.`` (a copy of the MASt3R encoder, if present) are ignored; every other key must
    match the module built from ``ckpt['args']``.

    Raises:
        FileNotFoundError: missing file. CheckpointError: unreadable file, no ``args``/``model``, or mismatching keys.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "args" not in ckpt:
        raise CheckpointError(f"{path}: not a MASt3R retrieval checkpoint (needs 'model' and 'args')")
    head = RetrievalHead(**retrieval_kwargs_from_args(ckpt["args"], dim))
    sd = {k: v for k, v in ckpt["model"].items() if not k.startswith("backbone.")}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: retrieval weights do not match args {vars(ckpt['args']) if isinstance(ckpt['args'], argparse.Namespace) else ckpt['args']}: {exc}") from None
    return head.to(device)


def codebook_path_for(checkpoint_path: str | Path) -> Path:
    """Codebook next to a retrieval checkpoint: basename split on ``_``, last token dropped, ``_codebook.pkl`` added."""
    p = Path(checkpoint_path)
    stem = "_".join(p.name.split("_")[:-1])
    return p.with_name(stem + "_codebook.pkl")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed for numpy arrays (no arbitrary code)."""

    _allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np.ndarray((0,)).__reduce__()[0]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return np.float32(0).__reduce__()[0]
        if module.startswith("numpy") and name.endswith("DType") and hasattr(np.dtypes, name):
            return getattr(np.dtypes, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"codebook pickle references {module}.{name}, which is not allowed "
                                     f"(only numpy arrays and plain containers)")


def load_codebook(path: str | Path, expected_size: int | None = None) -> Tensor:
    """Read the ASMK codebook pickle safely.

    Args:
        path: ``..._retrieval_codebook.pkl`` (asmk format; a bare ``{'centroids': ...}`` or a ``.npy`` also works).
        expected_size: if given, ``params.size`` and K must equal it (upstream asserts ``size == args.nclusters``).

    Returns:
        centroids ``[K, D]`` float32 (CPU).

    Raises:
        FileNotFoundError: missing file. ValueError: wrong layout/size, or a pickle referencing disallowed objects.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"retrieval codebook not found: {p}")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        size = None
    else:
        try:
            obj = _SafeUnpickler(io.BytesIO(p.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"{p}: cannot read the codebook pickle safely: {exc}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and "centroids" in obj["state"]:
            arr = obj["state"]["centroids"]
            size = (obj.get("params") or {}).get("size")
            if obj.get("type", "Codebook") != "Codebook":
                raise ValueError(f"{p}: pickle type {obj.get('type')!r} is not 'Codebook'")
        elif isinstance(obj, dict) and "centroids" in obj:
            arr, size = obj["centroids"], None
        else:
            raise ValueError(f"{p}: not an asmk codebook (expected {{'state': {{'centroids': [K, D]}}}})")
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{p}: centroids must be a non-empty [K, D] array, got shape {arr.shape}")
    if size is not None and int(size) != arr.shape[0]:
        raise ValueError(f"{p}: params.size {size} != number of centroids {arr.shape[0]}")
    if expected_size is not None and arr.shape[0] != int(expected_size):
        raise ValueError(f"{p}: codebook has {arr.shape[0]} words, checkpoint expects {expected_size}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def attach_retrieval(model: nn.Module, checkpoint_path: str | Path, codebook_path: str | Path | None = None
                     ) -> RetrievalHead:
    """Load the retrieval module and expose it on ``model`` for the SLAM backend.

    Sets ``model.retrieval_features`` (callable ``feat [1,P,C] -> [1,n,D]``) and ``model.retrieval_codebook``
    (the codebook path, default :func:`codebook_path_for`; checked to load safely here) without adding keys to the
    model's state dict.

    Returns:
        The :class:`RetrievalHead` (on the model's device).
    """
    dev = next(model.parameters()).device
    head = load_retrieval(checkpoint_path, device=dev, dim=getattr(getattr(model, "config", None),
                                                                   "enc_embed_dim", 1024))
    cb = Path(codebook_path) if codebook_path is not None else codebook_path_for(checkpoint_path)
    if cb.exists():
        load_codebook(cb)  # validate early (safe loader)
        model.__dict__["retrieval_codebook"] = str(cb)
    model.__dict__["_retrieval_head"] = head
    model.__dict__["retrieval_features"] = head.select
    return head
