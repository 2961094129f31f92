"""Deterministic "keyed" weights: every tensor is a function of its state-dict key and shape only.

Rule (``/work/shared/fixtures/README.md`` and spec ``mast3r_network.md`` §8.1)::

    canon = key with 'scratch.layer_rn.<i>.' replaced by 'scratch.layer<i+1>_rn.'   (aliases get identical values)
    z = np.random.RandomState(zlib.crc32(canon.encode())).standard_normal(numel)     # float64
    LayerNorm weight (norm1|norm2|norm3|norm_y|enc_norm|dec_norm + '.weight')  -> 1 + 0.1 z
    LayerNorm bias   (same names + '.bias')                                    -> 0.05 z
    'mask_token'                                                               -> 0.02 z
    any other '*.bias'                                                         -> 0.02 z
    any other weight                                                           -> z / sqrt(numel // shape[0])
    value = that.astype(float32).reshape(shape)

The check value is a sha256 over the keys in sorted order, feeding ``key.encode()`` and then the float32 C-order
bytes of each tensor. Used by the parity tests and the benchmark; nothing is cached on disk.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

_ALIAS = re.compile(r"scratch\.layer_rn\.(\d+)\.")
_LN = re.compile(r"(?:^|\.)(norm1|norm2|norm3|norm_y|enc_norm|dec_norm)\.(weight|bias)$")


def canonical_key(key: str) -> str:
    """Map the aliased ``scratch.layer_rn.<i>.`` name to ``scratch.layer<i+1>_rn.`` (other keys unchanged)."""
    return _ALIAS.sub(lambda m: f"scratch.layer{int(m.group(1)) + 1}_rn.", key)


def keyed_array(key: str, shape: tuple[int, ...] | torch.Size) -> np.ndarray:
    """The keyed value of one tensor.

    Args:
        key: state-dict key (aliases allowed, they map to their canonical name).
        shape: tensor shape.

    Returns:
        float32 numpy array of ``shape`` (C order).
    """
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape)) if shape else 1
    canon = canonical_key(key)
    z = np.random.RandomState(zlib.crc32(canon.encode())).standard_normal(numel)
    m = _LN.search(canon)
    if m and m.group(2) == "weight":
        v = 1.0 + 0.1 * z
    elif m:
        v = 0.05 * z
    elif canon == "mask_token":
        v = 0.02 * z
    elif canon.endswith(".bias"):
        v = 0.02 * z
    else:
        fan = numel // shape[0] if shape else 1
        v = z / np.sqrt(fan)
    return v.astype(np.float32).reshape(shape)


def apply_keyed_weights(model: torch.nn.Module) -> str:
    """Overwrite every parameter of ``model`` in place with its keyed value and return the weights' sha256.

    Aliased entries are generated once (by canonical name). Works for any module whose state-dict keys follow the
    official names; the model may be on any device (values are generated in numpy on the CPU).

    Returns:
        hex sha256 over the state dict (sorted keys, ``key.encode()`` then float32 bytes), see module docstring.
    """
    sd = model.state_dict(keep_vars=True)
    done: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for key, tensor in sd.items():
            canon = canonical_key(key)
            if canon in done and canon != key:
                continue  # alias: same storage as its canonical tensor
            arr = keyed_array(canon, tuple(tensor.shape))
            tensor.copy_(torch.from_numpy(arr))
            done[canon] = arr
    return state_dict_sha256(model.state_dict())


def keyed_model(config=None, precision: str = "fp32"):
    """Build a :class:`~mast3r_slam_ros.network.model.Mast3rModel` holding keyed weights, without a random init.

    The module is created on the ``meta`` device and the keyed state dict is loaded with
    ``load_state_dict(strict=True, assign=True)`` (the official loading path), so the full model costs one pass of
    random-number generation (about 15-25 s on 2 CPU cores) and one copy of the weights in memory.

    Returns:
        ``(model, sha256)`` with the model on the CPU and the hex digest of its weights (see module docstring).
    """
    from .model import Mast3rConfig, Mast3rModel

    with torch.device("meta"):
        model = Mast3rModel(config or Mast3rConfig(), precision=precision)
    sd = keyed_state_dict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    digest = state_dict_sha256(sd)
    model.load_state_dict(sd, strict=True, assign=True)
    return model, digest


def keyed_state_dict(keys_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """A state dict of keyed tensors for the given ``(key, shape)`` pairs (aliases share one tensor)."""
    out: dict[str, Tensor] = {}
    canon_t: dict[str, Tensor] = {}
    for key, shape in keys_and_shapes:
        canon = canonical_key(key)
        if canon not in canon_t:
            canon_t[canon] = torch.from_numpy(keyed_array(canon, tuple(shape)))
        out[key] = canon_t[canon]
    return out


def state_dict_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over keys in sorted order: ``key.encode()`` then the float32 C-order bytes of the tensor."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(t.numpy().data)
    return h.hexdigest()
