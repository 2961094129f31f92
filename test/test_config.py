"""Config tests: defaults = upstream base.yaml values (spec §10.1, written out here), inherit, overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mast3r_slam_ros.config import (
    ConfigError,
    SlamConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    default_config_dir,
    dotted_to_nested,
    flatten_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "config" / "slam_base.yaml"
CALIB = REPO / "config" / "slam_calib.yaml"

# spec/upstream_algorithm.md §10.1, transcribed by hand
UPSTREAM_BASE = {
    "use_calib": False,
    "single_thread": False,
    "dataset.subsample": 1,
    "dataset.img_downsample": 1,
    "dataset.center_principle_point": True,
    "matching.max_iter": 10,
    "matching.lambda_init": 1e-8,
    "matching.convergence_thresh": 1e-6,
    "matching.dist_thresh": 0.1,
    "matching.radius": 3,
    "matching.dilation_max": 5,
    "tracking.min_match_frac": 0.05,
    "tracking.max_iters": 50,
    "tracking.C_conf": 0.0,
    "tracking.Q_conf": 1.5,
    "tracking.rel_error": 1e-3,
    "tracking.delta_norm": 1e-3,
    "tracking.huber": 1.345,
    "tracking.match_frac_thresh": 0.333,
    "tracking.sigma_ray": 0.003,
    "tracking.sigma_dist": 10,
    "tracking.sigma_pixel": 1.0,
    "tracking.sigma_depth": 10,
    "tracking.sigma_point": 0.05,
    "tracking.pixel_border": -10,
    "tracking.depth_eps": 1e-6,
    "tracking.filtering_mode": "weighted_pointmap",
    "tracking.filtering_score": "median",
    "local_opt.pin": 1,
    "local_opt.window_size": 1e6,
    "local_opt.C_conf": 0.0,
    "local_opt.Q_conf": 1.5,
    "local_opt.min_match_frac": 0.1,
    "local_opt.pixel_border": -10,
    "local_opt.depth_eps": 1e-6,
    "local_opt.max_iters": 10,
    "local_opt.sigma_ray": 0.003,
    "local_opt.sigma_dist": 10,
    "local_opt.sigma_pixel": 1,
    "local_opt.sigma_depth": 10,
    "local_opt.sigma_point": 0.05,
    "local_opt.delta_norm": 1e-8,
    "local_opt.use_cuda": True,
    "retrieval.k": 3,
    "retrieval.min_thresh": 5e-3,
    "reloc.min_match_frac": 0.3,
    "reloc.strict": True,
}
# docs/interfaces.md
RUNTIME = {
    "runtime.device": "auto",
    "runtime.kernel_backend": "auto",
    "runtime.precision": "fp32",
    "runtime.head_precision": "fp32",
    "runtime.max_keyframes": 2000,
    "runtime.img_size": 512,
    "runtime.loop_closure": True,
    "runtime.sync_backend": False,
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("source", ["defaults", "slam_base.yaml"])
def test_defaults_equal_upstream(source):
    cfg = load_config(None if source == "defaults" else BASE)
    flat = flatten_config(cfg)
    assert set(flat) == set(UPSTREAM_BASE) | set(RUNTIME)
    for key, value in {**UPSTREAM_BASE, **RUNTIME}.items():
        assert flat[key] == value and type(flat[key]) in ((type(value), float) if isinstance(value, int)
                                                           and not isinstance(value, bool) else (type(value),)), key
    assert isinstance(cfg.matching.lambda_init, float) and isinstance(cfg.local_opt.window_size, float)


def test_base_yaml_lists_every_key():
    raw = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    keys = {f"{s}.{k}" for s, v in raw.items() if isinstance(v, dict) for k in v} | {
        k for k, v in raw.items() if not isinstance(v, dict)}
    assert keys == set(UPSTREAM_BASE) | set(RUNTIME)


def test_calib_inherits_base():
    cfg = load_config(CALIB)
    assert cfg.use_calib is True and cfg.dataset.subsample == 2
    flat = flatten_config(cfg)
    for key, value in {**UPSTREAM_BASE, **RUNTIME}.items():
        if key not in ("use_calib", "dataset.subsample"):
            assert flat[key] == value, key
    assert default_config_dir() == REPO / "config"


def test_inherit_relative_path_and_deep_merge(tmp_path):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    _write(tmp_path / "a" / "parent.yaml", "inherit: ../base_copy.yaml\ntracking:\n  max_iters: 7\n  huber: 2\n")
    _write(tmp_path / "base_copy.yaml", BASE.read_text(encoding="utf-8"))
    child = _write(sub / "child.yaml", "inherit: ../parent.yaml\ntracking:\n  huber: 3.5\nretrieval:\n  k: 5\n")
    cfg = load_config(child)
    assert cfg.tracking.max_iters == 7 and cfg.tracking.huber == 3.5 and cfg.retrieval.k == 5
    assert cfg.tracking.Q_conf == 1.5 and cfg.retrieval.min_thresh == 5e-3  # untouched siblings kept
    _write(tmp_path / "loop1.yaml", "inherit: loop2.yaml\n")
    _write(tmp_path / "loop2.yaml", "inherit: loop1.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop1.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(_write(tmp_path / "missing_parent.yaml", "inherit: nope.yaml\n"))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "does_not_exist.yaml")


def test_yaml_scientific_notation_is_float(tmp_path):
    f = _write(tmp_path / "c.yaml", "matching:\n  lambda_init: 1e-7\nlocal_opt:\n  delta_norm: 5E-3\n"
                                    "  window_size: 2e6\n")
    cfg = load_config(f)
    assert cfg.matching.lambda_init == 1e-7 and cfg.local_opt.delta_norm == 5e-3 and cfg.local_opt.window_size == 2e6
    assert yaml.safe_load("x: 1e-8")["x"] == "1e-8"  # plain PyYAML would have given a string


def test_unknown_key_names_key_and_file(tmp_path):
    f = _write(tmp_path / "bad.yaml", "tracking:\n  max_iterz: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert "tracking.max_iterz" in str(ei.value) and "bad.yaml" in str(ei.value)
    f2 = _write(tmp_path / "bad2.yaml", "trackin:\n  max_iters: 3\n")
    with pytest.raises(ConfigError, match="trackin"):
        load_config(f2)
    # error in the inherited file names that file
    _write(tmp_path / "parent_bad.yaml", "reloc:\n  strictt: true\n")
    child = _write(tmp_path / "child_ok.yaml", "inherit: parent_bad.yaml\n")
    with pytest.raises(ConfigError, match=r"parent_bad\.yaml.*reloc\.strictt"):
        load_config(child)
    with pytest.raises(ConfigError, match="runtime.gpu"):
        load_config(None, {"runtime.gpu": 1})


@pytest.mark.parametrize(
    "text,key",
    [
        ("tracking:\n  max_iters: 3.5\n", "tracking.max_iters"),          # float for int
        ("tracking:\n  max_iters: true\n", "tracking.max_iters"),         # bool is not int
        ("tracking:\n  huber: true\n", "tracking.huber"),                 # bool is not float
        ("tracking:\n  huber: abc\n", "tracking.huber"),
        ("use_calib: 1\n", "use_calib"),                                  # int is not bool
        ("use_calib: 'yes please'\n", "use_calib"),
        ("tracking:\n  filtering_mode: average\n", "tracking.filtering_mode"),
        ("runtime:\n  precision: fp8\n", "runtime.precision"),
        ("runtime:\n  head_precision: tf32\n", "runtime.head_precision"),
        ("runtime:\n  img_size: 384\n", "runtime.img_size"),
        ("runtime:\n  device: gpu\n", "runtime.device"),
        ("runtime:\n  max_keyframes: 0\n", "runtime.max_keyframes"),
        ("tracking: 5\n", "tracking"),                                    # section given a value
    ],
)
def test_bad_type_names_key_and_file(tmp_path, text, key):
    f = _write(tmp_path / "wrong.yaml", text)
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert f"'{key}'" in str(ei.value) and "wrong.yaml" in str(ei.value)


def test_int_accepted_for_float():
    cfg = load_config(None, {"tracking.huber": 2, "local_opt.sigma_ray": 1})
    assert cfg.tracking.huber == 2.0 and isinstance(cfg.tracking.huber, float)


def test_overrides_dotted_and_nested():
    cfg = load_config(CALIB, {"tracking.max_iters": 10, "runtime": {"device": "cuda:1", "img_size": 224},
                              "use_calib": False})
    assert cfg.tracking.max_iters == 10 and cfg.runtime.device == "cuda:1" and cfg.runtime.img_size == 224
    assert cfg.use_calib is False and cfg.dataset.subsample == 2
    assert cfg.runtime.precision == "fp32"
    with pytest.raises(ConfigError, match="tracking.max_iters"):
        load_config(None, {"tracking.max_iters": "ten"})
    assert dotted_to_nested({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError):
        dotted_to_nested({"a": 1, "a.b": 2})
    cfg2 = apply_overrides(cfg, {"reloc.strict": False})
    assert cfg2.reloc.strict is False and cfg.reloc.strict is True  # original untouched
    assert cfg2.tracking.max_iters == 10


def test_dict_round_trip(tmp_path):
    cfg = load_config(CALIB, {"runtime.precision": "bf16"})
    d = config_to_dict(cfg)
    assert d["tracking"]["filtering_mode"] == "weighted_pointmap" and d["runtime"]["precision"] == "bf16"
    f = tmp_path / "dump.yaml"
    f.write_text(yaml.safe_dump(d), encoding="utf-8")
    assert load_config(f) == cfg
    assert config_from_dict(flatten_config(cfg)) == cfg
    assert SlamConfig() == load_config()


def test_fast_preset_only_changes_the_network_precision():
    """config/slam_fast.yaml (issue 8) = base + bf16 trunk and heads; the SLAM parameters stay the upstream ones."""
    fast = load_config(REPO / "config" / "slam_fast.yaml")
    base = load_config(BASE)
    assert (fast.runtime.precision, fast.runtime.head_precision) == ("bf16", "bf16")
    assert fast.tracking == base.tracking and fast.matching == base.matching and fast.local_opt == base.local_opt
