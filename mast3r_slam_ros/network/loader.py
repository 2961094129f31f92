"""Safe loading of the official MASt3R checkpoint (``.pth``) or its Hugging Face release.

Spec ``mast3r_network.md`` §1: the official file is a ``torch.save`` dict with ``'model'`` (state dict, 1017 keys)
and ``'args'`` (an ``argparse.Namespace`` whose ``.model`` is the constructor string). Upstream ``eval``s that string;
here it is parsed with :mod:`ast` into literal keyword arguments (``inf``/``-inf``, tuples, strings, numbers,
booleans), and anything that is not ``AsymmetricMASt3R(...)`` with the ``catmlp+dpt`` head is rejected.
``torch.load`` always runs with ``weights_only=True``; ``argparse.Namespace`` is the only extra allowed global.

The Hugging Face route (``naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric``: ``config.json`` holding the
constructor kwargs plus ``model.safetensors``) downloads through ``huggingface_hub`` (its cache and progress bar).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .model import Mast3rConfig, Mast3rModel
from .precision import check_precision

DEFAULT_REPO_ID = "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric"
#: official direct download of the .pth used by MASt3R-SLAM (README of rmurai0610/MASt3R-SLAM)
OFFICIAL_PTH_URL = (
    "https://download.europe.naverlabs.com/ComputerVision/MASt3R/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth"
)
SUPPORTED_ARCH = "AsymmetricMASt3R"
_CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable (truncated/corrupt), malformed, or for an unsupported architecture."""


# ---------------------------------------------------------------------------------------------------- model string
def _literal(node: ast.AST, what: str) -> Any:
    """Evaluate a literal AST node (no code execution); raises CheckpointError for anything else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        vals = [_literal(e, what) for e in node.elts]
        return tuple(vals) if isinstance(node, ast.Tuple) else vals
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, what)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CheckpointError(f"argument {what}: unary sign on a non-number")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in ("inf", "nan", "True", "False", "None"):
        return {"inf": math.inf, "nan": math.nan, "True": True, "False": False, "None": None}[node.id]
    if isinstance(node, ast.Attribute) and node.attr in ("inf", "nan") and isinstance(node.value, ast.Name) \
            and node.value.id in ("math", "np", "numpy", "torch"):
        return math.inf if node.attr == "inf" else math.nan
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float" \
            and len(node.args) == 1 and not node.keywords:
        arg = _literal(node.args[0], what)
        if isinstance(arg, str) and arg.strip().lower() in ("inf", "+inf", "-inf", "nan", "infinity", "-infinity"):
            return float(arg)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
    raise CheckpointError(f"argument {what}: unsupported expression {ast.dump(node)[:120]} in the model string")


def parse_model_string(model_string: str) -> dict[str, Any]:
    """Parse an upstream ``--model`` string such as ``"AsymmetricMASt3R(enc_depth=24, ...)"`` without ``eval``.

    Args:
        model_string: the constructor call stored in ``ckpt['args'].model``.

    Returns:
        The keyword arguments as Python literals (``inf`` -> ``math.inf``, tuples kept as tuples).

    Raises:
        CheckpointError: not a single call of ``AsymmetricMASt3R`` with keyword-only literal arguments (e.g. a
            DUSt3R ``AsymmetricCroCo3DStereo`` string).
    """
    if not isinstance(model_string, str) or not model_string.strip():
        raise CheckpointError(f"model string must be a non-empty str, got {model_string!r}")
    try:
        tree = ast.parse(model_string.strip(), mode="eval")
    except SyntaxError as exc:
        raise CheckpointError(f"cannot parse the checkpoint's model string {model_string[:200]!r}: {exc}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, (ast.Name, ast.Attribute)):
        raise CheckpointError(f"the checkpoint's model string is not a constructor call: {model_string[:200]!r}")
    name = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
    if name != SUPPORTED_ARCH:
        raise CheckpointError(
            f"unsupported architecture {name!r} in the checkpoint (model string {model_string[:160]!r}); only "
            f"{SUPPORTED_ARCH} with head_type='catmlp+dpt' (the MASt3R-SLAM checkpoint) is supported"
        )
    if call.args:
        raise CheckpointError(f"{SUPPORTED_ARCH}(...) with positional arguments is not supported: {model_string!r}")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise CheckpointError(f"'**' expansion is not supported in the model string {model_string!r}")
        kwargs[kw.arg] = _literal(kw.value, kw.arg)
    return kwargs


def config_from_model_string(model_string: str) -> Mast3rConfig:
    """``parse_model_string`` + :meth:`Mast3rConfig.from_constructor_kwargs`; raises CheckpointError if unsupported."""
    kwargs = parse_model_string(model_string)
    try:
        return Mast3rConfig.from_constructor_kwargs(kwargs)
    except ValueError as exc:
        raise CheckpointError(f"unsupported MASt3R configuration: {exc}") from None


def config_to_model_string(config: Mast3rConfig) -> str:
    """Render a config as an upstream constructor string (the inverse of :func:`config_from_model_string`)."""
    c = config
    parts = [
        f"enc_depth={c.enc_depth}", f"dec_depth={c.dec_depth}", f"enc_embed_dim={c.enc_embed_dim}",
        f"dec_embed_dim={c.dec_embed_dim}", f"enc_num_heads={c.enc_num_heads}", f"dec_num_heads={c.dec_num_heads}",
        f"pos_embed='RoPE{c.rope_base:g}'", "patch_embed_cls='PatchEmbedDust3R'",
        f"img_size={tuple(int(v) for v in c.img_size)!r}", "head_type='catmlp+dpt'",
        f"output_mode='pts3d+desc{c.local_feat_dim}'", f"depth_mode={_mode_repr(c.depth_mode)}",
        f"conf_mode={_mode_repr(c.conf_mode)}", f"two_confs={c.two_confs!r}",
        f"desc_conf_mode={_mode_repr(c.desc_conf_mode)}",
    ]
    if c.mlp_ratio != 4.0:
        parts.append(f"mlp_ratio={c.mlp_ratio!r}")
    if c.patch_size != 16:
        parts.append(f"patch_size={c.patch_size}")
    if c.desc_mode != "norm":
        parts.append(f"desc_mode={c.desc_mode!r}")
    parts.append("landscape_only=False")
    return f"{SUPPORTED_ARCH}({', '.join(parts)})"


def _mode_repr(mode: tuple) -> str:
    def num(v: float) -> str:
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{int(v)}" if float(v).is_integer() else repr(float(v))

    return f"('{mode[0]}', {num(mode[1])}, {num(mode[2])})"


# ---------------------------------------------------------------------------------------------------- file reading
#: harmless classes that training ``args`` Namespaces may hold; allow-listed on demand (never code-executing)
_EXTRA_SAFE_GLOBALS = {
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib.Path",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "collections.OrderedDict", "collections.defaultdict", "builtins.slice", "torch.device",
}
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _resolve_global(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module), name)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``torch.save`` checkpoint with ``weights_only=True`` (``argparse.Namespace`` allow-listed).

    Tries a memory-mapped load first (no second copy of the 2.75 GB weights), then a plain load. If the pickled
    training arguments reference one of a few harmless classes (``pathlib`` paths, numpy scalars/dtypes, ...), that
    class is allow-listed and the load retried; any other global is refused.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated/corrupt or holds disallowed objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    allowed: list[Any] = [argparse.Namespace]
    last: Exception | None = None
    for _ in range(len(_EXTRA_SAFE_GLOBALS) + 1):
        with torch.serialization.safe_globals(list(allowed)):
            for mmap in (True, False):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                except Exception as exc:  # noqa: BLE001 - re-raised below with a clear message
                    last = exc
        m = _UNSUPPORTED_GLOBAL.search(str(last))
        if not m:
            break
        name = m.group(1)
        if name not in _EXTRA_SAFE_GLOBALS:
            raise CheckpointError(
                f"checkpoint {path} references {name}, which is not allowed when loading safely "
                f"(weights_only=True); only plain tensors, argparse.Namespace and simple values are accepted"
            ) from None
        try:
            allowed.append(_resolve_global(name))
        except (ImportError, AttributeError):
            break
    size = path.stat().st_size
    raise CheckpointError(
        f"cannot read checkpoint {path} ({size} bytes): it is truncated, corrupt or not a PyTorch checkpoint "
        f"(official file is about 2.75 GB; re-download it). Loader error: {type(last).__name__}: {str(last)[:500]}"
    ) from None


def _state_dict_and_config(ckpt: Any, source: str) -> tuple[Mapping[str, torch.Tensor], Mast3rConfig | None]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        sd = ckpt["model"]
        args = ckpt.get("args")
        model_string = getattr(args, "model", None) if args is not None else None
        if model_string is None and isinstance(args, Mapping):
            model_string = args.get("model")
        cfg = config_from_model_string(model_string) if model_string is not None else None
        return sd, cfg
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, None  # a bare state dict
    raise CheckpointError(f"{source}: no 'model' state dict in the checkpoint (keys: {sorted(ckpt)[:10]})")


# ---------------------------------------------------------------------------------------------------- HF route
def _config_from_json(path: Path) -> Mast3rConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of constructor arguments")
    if "model" in data and isinstance(data["model"], str):
        return config_from_model_string(data["model"])
    arch = data.pop("architectures", None) or data.pop("_class_name", None)
    if arch and SUPPORTED_ARCH not in str(arch):
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; only {SUPPORTED_ARCH} is supported")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if not k.startswith("_")}
    try:
        return Mast3rConfig.from_constructor_kwargs(kwargs, strict=False)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unsupported MASt3R configuration: {exc}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file ({exc})") from None


def _looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.lower().endswith(_CKPT_SUFFIXES)


def download_from_hub(repo_id: str, cache_dir: str | Path | None = None, local_files_only: bool = False
                      ) -> tuple[Path, Path]:
    """Download ``config.json`` and ``model.safetensors`` of ``repo_id`` via huggingface_hub (cache + progress bar).

    Returns:
        ``(config_path, weights_path)`` in the local Hugging Face cache.

    Raises:
        FileNotFoundError: offline / not found, with a message saying where to put the file instead.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError("downloading a model needs 'huggingface_hub' (pip install huggingface_hub)") from None
    try:
        cfg = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir, local_files_only=local_files_only)
        weights = hf_hub_download(repo_id, "model.safetensors", cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, 404 ... all get the same guidance
        raise FileNotFoundError(
            f"could not get the MASt3R weights for {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). If this machine is offline, download the official "
            f"checkpoint elsewhere ({OFFICIAL_PTH_URL}), copy it to e.g. "
            f"checkpoints/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth and pass that path "
            f"(or pre-populate the Hugging Face cache with `huggingface-cli download {repo_id}` and set HF_HOME)."
        ) from None
    return Path(cfg), Path(weights)


# ---------------------------------------------------------------------------------------------------- public API
def _precision_name(precision: str | torch.dtype) -> str:
    if isinstance(precision, torch.dtype):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        if precision not in names:
            raise ValueError(f"unsupported dtype {precision}; use float32, bfloat16 or float16")
        return names[precision]
    return check_precision(precision)


def build_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mast3rConfig,
                          device: str | torch.device = "cpu", precision: str | torch.dtype = "fp32") -> Mast3rModel:
    """Create a model of ``config`` without random init and load ``state_dict`` strictly (aliases may be missing).

    Raises:
        CheckpointError: keys or shapes do not match the architecture.
    """
    with torch.device("meta"):
        model = Mast3rModel(config, precision=_precision_name(precision))
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"state dict does not match the MASt3R architecture {config}: {str(exc)[:2000]}") \
            from None
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError(f"parameter {name} was not loaded")
    return model.to(device)


def load_model(path_or_repo_id: str | Path = DEFAULT_REPO_ID, device: str | torch.device = "cpu",
               precision: str | torch.dtype = "fp32", *, config: Mast3rConfig | None = None,
               cache_dir: str | Path | None = None, local_files_only: bool = False) -> Mast3rModel:
    """Load MASt3R from the official ``.pth``, a ``.safetensors`` file (``config.json`` next to it) or a HF repo id.

    Args:
        path_or_repo_id: checkpoint path, or a Hugging Face repo id (default: the official metric checkpoint).
        device: target device (``"cuda"``, ``"cpu"``, ...).
        precision: ``"fp32" | "tf32" | "bf16" | "fp16"`` (or a torch dtype) for encoder/decoder; heads stay fp32.
        config: override the architecture (needed only for bare state dicts without ``args``).
        cache_dir, local_files_only: passed to ``huggingface_hub.hf_hub_download``.

    Returns:
        A :class:`Mast3rModel` with the weights loaded strictly (``load_state_dict(strict=True)``).

    Raises:
        FileNotFoundError: a path that does not exist, or a repo id that cannot be downloaded (message says where
            to put the file).
        CheckpointError: truncated/corrupt file, missing ``args.model`` without ``config``, an architecture other
            than ``AsymmetricMASt3R(head_type='catmlp+dpt')``, or mismatched keys/shapes.
    """
    src = str(path_or_repo_id)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir():
            cfg_json, weights = path / "config.json", path / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{path} is a folder without model.safetensors")
            return _load_safetensors(weights, cfg_json, config, device, precision)
        if path.suffix == ".safetensors":
            return _load_safetensors(path, path.with_name("config.json"), config, device, precision)
        sd, cfg = _state_dict_and_config(read_checkpoint(path), str(path))
        cfg = config or cfg
        if cfg is None:
            raise CheckpointError(f"{path} has no args.model string; pass config=Mast3rConfig(...) explicitly")
        return build_from_state_dict(sd, cfg, device, precision)
    if isinstance(path_or_repo_id, str) and _looks_like_repo_id(src):
        cfg_json, weights = download_from_hub(src, cache_dir, local_files_only)
        return _load_safetensors(weights, cfg_json, config, device, precision)
    raise FileNotFoundError(
        f"MASt3R checkpoint not found: {path}. Download {OFFICIAL_PTH_URL} into checkpoints/ and pass its path, "
        f"or pass a Hugging Face repo id such as {DEFAULT_REPO_ID!r}."
    )


def _load_safetensors(weights: Path, cfg_json: Path, config: Mast3rConfig | None, device, precision) -> Mast3rModel:
    if config is None:
        if not cfg_json.is_file():
            raise CheckpointError(f"{weights}: no config.json next to it; pass config=Mast3rConfig(...)")
        config = _config_from_json(cfg_json)
    return build_from_state_dict(_read_safetensors(weights), config, device, precision)
