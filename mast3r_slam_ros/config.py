"""Typed SLAM configuration: upstream ``config/base.yaml`` (spec/upstream_algorithm.md §10) plus project ``runtime``.

Every key and default of upstream's ``base.yaml`` is a field of the dataclasses below (same section and key names, same
values); ``config/slam_base.yaml`` lists them all and ``config/slam_calib.yaml`` is upstream's ``calib.yaml``
(``inherit`` base, ``use_calib: True``, ``dataset.subsample: 2``). The ``runtime`` section holds the project's own keys
(docs/interfaces.md).

YAML files are read with PyYAML's safe loader plus a float resolver, so ``1e-8`` / ``5e-3`` / ``1e6`` are floats (plain
PyYAML reads them as strings), as upstream's ``config.py`` does. ``inherit: <path>`` (relative to the file) loads the
parent first and deep-merges the child over it. Every file and the overrides are checked against the schema: an unknown
key or a value of the wrong type raises ``ConfigError`` naming the dotted key and the file. An int is accepted where a
float is expected; a bool is never accepted as a number.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

__all__ = [
    "ConfigError",
    "SlamConfig",
    "DatasetConfig",
    "MatchingConfig",
    "TrackingConfig",
    "LocalOptConfig",
    "RetrievalConfig",
    "RelocConfig",
    "RuntimeConfig",
    "load_config",
    "load_yaml",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "apply_overrides",
    "dotted_to_nested",
    "default_config_dir",
]


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type or value, or bad ``inherit``. Message names key and source."""


# ------------------------------------------------------------------------------------------------------- schema
@dataclass
class DatasetConfig:
    """``dataset.*``: frame subsampling and image handling (spec §10.1)."""

    subsample: int = 1  #: keep every n-th frame
    img_downsample: int = 1  #: stride on the network outputs (upstream: broken for > 1)
    center_principle_point: bool = True  #: cv2.getOptimalNewCameraMatrix(centerPrincipalPoint=...) when undistorting


@dataclass
class MatchingConfig:
    """``matching.*``: iterative projective matching + descriptor refinement (spec §4)."""

    max_iter: int = 10  #: iter_proj LM iterations
    lambda_init: float = 1e-8  #: initial LM damping
    convergence_thresh: float = 1e-6  #: squared unit-ray error for "converged"
    dist_thresh: float = 0.1  #: 3-D occlusion test (pointmap units)
    radius: int = 3  #: descriptor refinement half-window (0 disables)
    dilation_max: int = 5  #: refinement dilations max..1


@dataclass
class TrackingConfig:
    """``tracking.*``: frame-to-keyframe Sim(3) tracking (spec §5)."""

    min_match_frac: float = 0.05  #: below: tracking lost -> RELOC
    max_iters: int = 50  #: Gauss-Newton iterations
    C_conf: float = 0.0  #: threshold on average canonical confidence C/N
    Q_conf: float = 1.5  #: threshold on match confidence Q
    rel_error: float = 1e-3  #: relative cost-decrease convergence
    delta_norm: float = 1e-3  #: |delta| convergence
    huber: float = 1.345  #: Huber threshold on the whitened residual
    match_frac_thresh: float = 0.333  #: new keyframe below this match fraction
    sigma_ray: float = 0.003  #: ray residual sigma (unit-vector units)
    sigma_dist: float = 10.0  #: distance residual sigma
    sigma_pixel: float = 1.0  #: calibrated pixel sigma
    sigma_depth: float = 10.0  #: calibrated log-depth sigma
    sigma_point: float = 0.05  #: unused upstream
    pixel_border: float = -10.0  #: calibrated: projections may fall up to 10 px outside
    depth_eps: float = 1e-6  #: calibrated: minimum depth
    filtering_mode: Literal["weighted_pointmap", "weighted_spherical", "recent", "first", "best_score",
                            "indep_conf"] = "weighted_pointmap"  #: pointmap fusion rule (spec §5.6)
    filtering_score: Literal["median", "mean"] = "median"  #: score for best_score


@dataclass
class LocalOptConfig:
    """``local_opt.*``: backend factor graph and global Gauss-Newton (spec §6)."""

    pin: int = 1  #: number of fixed poses
    window_size: float = 1e6  #: stored, unused upstream
    C_conf: float = 0.0  #: GN confidence threshold
    Q_conf: float = 1.5  #: GN and edge-acceptance Q threshold
    min_match_frac: float = 0.1  #: edge acceptance (both directions)
    pixel_border: float = -10.0  #: calibrated GN border
    depth_eps: float = 1e-6  #: calibrated GN z_eps
    max_iters: int = 10  #: GN iterations
    sigma_ray: float = 0.003
    sigma_dist: float = 10.0
    sigma_pixel: float = 1.0
    sigma_depth: float = 10.0
    sigma_point: float = 0.05  #: only for the (unused) points GN
    delta_norm: float = 1e-8  #: |dx| stop
    use_cuda: bool = True  #: unused upstream


@dataclass
class RetrievalConfig:
    """``retrieval.*``: ASMK loop-closure retrieval (spec §7)."""

    k: int = 3  #: top-k retrieval
    min_thresh: float = 5e-3  #: minimum ASMK score


@dataclass
class RelocConfig:
    """``reloc.*``: relocalization (spec §8)."""

    min_match_frac: float = 0.3  #: reloc edge acceptance
    strict: bool = True  #: all candidate edges must pass


@dataclass
class RuntimeConfig:
    """``runtime.*``: project keys (no upstream equivalent; docs/interfaces.md)."""

    device: str = "auto"  #: "auto" | "cuda" | "cuda:N" | "cpu"
    kernel_backend: Literal["auto", "cuda", "torch"] = "auto"  #: CUDA extension or PyTorch kernels
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "fp32"  #: network precision
    #: dtype of the heads' DPT convolutions and local-feature MLP (final output conv and post-processing stay fp32)
    head_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_keyframes: int = 2000  #: keyframe store capacity (KeyframeCapacityError beyond)
    img_size: Literal[512, 224] = 512  #: network image long side
    loop_closure: bool = True  #: retrieval-based loop-closure edges
    sync_backend: bool = False  #: run the backend work of each keyframe inside track() (deterministic)


@dataclass
class SlamConfig:
    """Whole configuration: upstream ``base.yaml`` sections plus ``runtime``."""

    use_calib: bool = False  #: calibrated mode (pixel / log-depth residuals)
    single_thread: bool = False  #: upstream: frontend waits for the backend
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    local_opt: LocalOptConfig = field(default_factory=LocalOptConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    reloc: RelocConfig = field(default_factory=RelocConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_EXTRA_CHECKS = {
    "runtime.device": (lambda v: bool(_DEVICE_RE.match(v)), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "runtime.max_keyframes": (lambda v: v >= 1, "an integer >= 1"),
    "dataset.subsample": (lambda v: v >= 1, "an integer >= 1"),
    "dataset.img_downsample": (lambda v: v >= 1, "an integer >= 1"),
    "retrieval.k": (lambda v: v >= 0, "an integer >= 0"),
}


# -------------------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style floats (``1e-8``, ``5e-3``, ``1e6`` are floats, as upstream's config.py)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    """Read one YAML mapping (no ``inherit`` processing). Raises FileNotFoundError / ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        with p.open("r", encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------- checking
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float). Raises ConfigError."""
    bad = ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices or type(value) is not type(
                next(c for c in choices if c == value)):
            raise bad
        out = value
    elif tp is bool:
        if not isinstance(value, bool):
            raise bad
        out = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        out = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad
        out = value
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported schema type {tp!r} for {key}")
    check = _EXTRA_CHECKS.get(key)
    if check is not None and not check[0](out):
        raise ConfigError(f"{source}: key '{key}' must be {check[1]}, got {value!r}")
    return out


def _check_tree(data: Mapping, cls, source: str, prefix: str = "") -> dict:
    """Validate a (partial) nested dict against dataclass ``cls``; return a converted copy."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    out: dict = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if not isinstance(k, str) or k not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key '{key}' (known keys{' in ' + prefix.rstrip('.') if prefix else ''}"
                              f": {known})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            out[k] = _check_tree(v, tp, source, key + ".")
        else:
            out[k] = _coerce(v, tp, key, source)
    return out


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dotted_to_nested(flat: Mapping[str, Any]) -> dict:
    """``{"tracking.max_iters": 10, "use_calib": True}`` -> nested dict; nested values are merged as they are.

    Raises ConfigError on an empty key component or a key that is both a value and a section.
    """
    out: dict = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides: key {key!r} must be a string")
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"overrides: malformed key '{key}'")
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"overrides: key '{'.'.join(parts[:i + 1])}' is a value and a section")
            node = nxt
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_merge(node[leaf], dotted_to_nested(value))
        elif isinstance(value, Mapping):
            node[leaf] = dotted_to_nested(value)
        else:
            if isinstance(node.get(leaf), dict):
                raise ConfigError(f"overrides: key '{key}' is a value and a section")
            node[leaf] = value
    return out


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Load ``path`` with its ``inherit`` chain, validating every file against the schema (errors name that file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: circular 'inherit' ({' -> '.join(str(p) for p in (*chain, path))})")
    raw = load_yaml(path)
    parent = raw.pop("inherit", None)
    tree = _check_tree(raw, SlamConfig, str(path))
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: key 'inherit' must be a path string, got {parent!r}")
    parent_path = Path(parent)
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.is_file():
        raise FileNotFoundError(f"{path}: inherited config file not found: {parent_path}")
    return _deep_merge(_load_tree(parent_path, (*chain, path)), tree)


def _build(cls, tree: Mapping):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            tp = hints[f.name]
            kwargs[f.name] = _build(tp, tree[f.name]) if dataclasses.is_dataclass(tp) else tree[f.name]
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------- public
def config_from_dict(data: Mapping, source: str = "<dict>") -> SlamConfig:
    """Build a ``SlamConfig`` from a (partial, nested or dotted) dict over the defaults. Raises ConfigError."""
    return _build(SlamConfig, _check_tree(dotted_to_nested(data), SlamConfig, source))


def config_to_dict(cfg: SlamConfig) -> dict:
    """Nested plain dict of ``cfg`` (YAML-serialisable; ``load_config`` of it gives ``cfg`` back)."""
    return dataclasses.asdict(cfg)


def flatten_config(cfg: SlamConfig | Mapping) -> dict[str, Any]:
    """Dotted-key view ``{"tracking.max_iters": 50, ...}`` of a config (e.g. for ROS parameters)."""
    tree = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}

    def rec(node: Mapping, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                rec(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    rec(tree, "")
    return out


def apply_overrides(cfg: SlamConfig, overrides: Mapping[str, Any] | None, source: str = "overrides") -> SlamConfig:
    """New ``SlamConfig`` with ``overrides`` (nested and/or dotted keys) applied over ``cfg``. Raises ConfigError."""
    if not overrides:
        return copy.deepcopy(cfg)
    tree = _check_tree(dotted_to_nested(overrides), SlamConfig, source)
    return _build(SlamConfig, _deep_merge(config_to_dict(cfg), tree))


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> SlamConfig:
    """Load a SLAM configuration.

    Args:
        path: YAML file (``inherit:`` supported, relative to the file) or None for the built-in defaults
            (= ``config/slam_base.yaml``).
        overrides: nested and/or dotted-key values applied last, e.g. ``{"tracking.max_iters": 10}``.
    Returns:
        ``SlamConfig``.
    Raises:
        FileNotFoundError: the file or an inherited file does not exist.
        ConfigError: unknown key, wrong type / value, invalid YAML or circular inherit (message names key and file).
    """
    tree = {} if path is None else _load_tree(Path(path))
    if overrides:
        tree = _deep_merge(tree, _check_tree(dotted_to_nested(overrides), SlamConfig, "overrides"))
    return _build(SlamConfig, tree)


def default_config_dir() -> Path:
    """The ``config/`` folder shipped with the package (source tree or ``share/mast3r_slam_ros/config``).

    Raises FileNotFoundError if neither exists.
    """
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "config"]
    try:  # installed with colcon: <prefix>/share/mast3r_slam_ros/config
        from ament_index_python.packages import get_package_share_directory  # type: ignore

        candidates.append(Path(get_package_share_directory("mast3r_slam_ros")) / "config")
    except Exception:  # noqa: BLE001 - ROS not installed / package not indexed
        pass
    for c in candidates:
        if (c / "slam_base.yaml").is_file():
            return c
    raise FileNotFoundError("config folder with slam_base.yaml not found (looked in: "
                            + ", ".join(str(c) for c in candidates) + ")")
