"""Config: safe loading, validation errors that name key, value and choices, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import ROOT
from xaicli.config import Config, TargetConfig, apply_overrides, config_from_dict, load_config, parse_target
from xaicli.errors import ConfigError


def test_default_yaml_is_the_embedded_default():
    shipped = load_config(ROOT / "configs" / "default.yaml")
    assert dataclasses.replace(shipped, source_path=None) == Config()


def test_shipped_configs_validate():
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(p)
        assert cfg.method


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_top_level_key_suggests(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("methd: gradcam\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "methd: unknown key" in e.value.message
    assert "'method'" in e.value.hint


def test_unknown_nested_key_names_path():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"runtime": {"batchsize": 4}})
    assert e.value.message == "runtime.batchsize: unknown key"
    assert "batch_size" in e.value.hint


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"runtime": {"batch_size": "big"}}, "runtime.batch_size: expected an integer, got 'big'"),
        ({"runtime": {"batch_size": 0}}, "runtime.batch_size: must be >= 1"),
        ({"runtime": {"device": "gpu"}}, "runtime.device: expected one of 'auto', 'cpu', 'cuda', 'mps', got 'gpu'"),
        ({"runtime": {"precision": "fp64"}}, "runtime.precision: expected one of"),
        ({"output": {"alpha": 2}}, "output.alpha: must be between 0 and 1"),
        ({"output": {"colormap": "rainbow"}}, "output.colormap: expected one of"),
        ({"preprocess": {"mean": [0.5, 0.5]}}, "preprocess.mean: expected a list of 3 a number"),
        ({"model": {"source": "onnx"}}, "model.source: expected one of 'torchvision', 'timm', 'factory'"),
        ({"model": {"source": "torchvision"}}, "model.name: required"),
        ({"runtime": [1, 2]}, "runtime: expected a mapping"),
        ({"target_layer": 3}, "target_layer: expected a dotted module path"),
    ],
)
def test_bad_values_name_key_and_value(data, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert fragment in e.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, TargetConfig()),
        ("predicted", TargetConfig()),
        (285, TargetConfig(mode="index", index=285)),
        ("285", TargetConfig(mode="index", index=285)),
        ("Egyptian cat", TargetConfig(mode="name", name="Egyptian cat")),
        ("top3", TargetConfig(mode="topk", k=3)),
        ({"topk": 2}, TargetConfig(mode="topk", k=2)),
    ],
)
def test_targets(value, expected):
    assert parse_target(value) == expected


def test_bad_target():
    with pytest.raises(ConfigError, match="index must be >= 0"):
        parse_target(-1)
    with pytest.raises(ConfigError, match="exactly one key 'topk'"):
        parse_target({"k": 3})


def test_yaml_is_loaded_safely(tmp_path: Path):
    p = tmp_path / "evil.yaml"
    p.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_model_section_resets_embedded_preprocess_and_layer():
    cfg = config_from_dict({"model": {"source": "torchvision", "name": "resnet18"}})
    assert cfg.preprocess.mean is None and cfg.target_layer is None
    assert Config().target_layer == "_avg_pooling:input"


def test_overrides_merge_in_one_place():
    cfg = apply_overrides(Config(), method="cam,gradcam", layer="x.y", target="top2", device="cpu", batch_size=3,
                          seed=7)
    assert cfg.method == ("cam", "gradcam")
    assert cfg.target_layer == "x.y"
    assert cfg.target == TargetConfig(mode="topk", k=2)
    assert cfg.runtime.device == "cpu" and cfg.runtime.batch_size == 3 and cfg.runtime.seed == 7
    with pytest.raises(ConfigError, match="runtime.device"):
        apply_overrides(Config(), device="tpu")
    with pytest.raises(ConfigError, match="runtime.batch_size: must be >= 1"):
        apply_overrides(Config(), batch_size=0)
    with pytest.raises(TypeError, match="unknown override"):
        apply_overrides(Config(), colour="red")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="model.factory: required"):
        config_from_dict({"model": {"source": "factory"}})
    with pytest.raises(ConfigError, match="ground_truth: give either masks"):
        config_from_dict({"ground_truth": {"masks": "a", "boxes": "b"}})
    with pytest.raises(ConfigError, match="preprocess.crop: sizes must be >= 1"):
        config_from_dict({"preprocess": {"crop": [0, 3]}})
    with pytest.raises(ConfigError, match="preprocess.std: values must be positive"):
        config_from_dict({"preprocess": {"std": [1, 0, 1]}})
    with pytest.raises(ConfigError, match="output.jpeg_quality: must be between 1 and 100"):
        config_from_dict({"output": {"jpeg_quality": 0}})


def test_config_does_not_import_the_registries():
    """config.py is below the method and metric registries: it keeps names and knobs as data."""
    import ast

    tree = ast.parse((ROOT / "xaicli" / "config.py").read_text())
    imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"methods", "metrics", "plan", "engine", "run"}, imported
