"""The plan: method and metric names checked against the registries and knobs validated in one
place, above the config."""

from __future__ import annotations

import pytest

from xaicli.config import Config, apply_overrides, config_from_dict
from xaicli.errors import ConfigError
from xaicli.methods import get_method
from xaicli.plan import config_params, method_pairs, resolve_plan


def test_unknown_method_close_match():
    with pytest.raises(ConfigError) as e:
        resolve_plan(config_from_dict({"method": "gradcamm"}))
    assert "unknown method 'gradcamm'" in e.value.message
    assert "'gradcam'" in e.value.hint


def test_method_list_forms_and_aliases():
    assert resolve_plan(config_from_dict({"method": "gradcam, gradcam++"})).cfg.method == ("gradcam", "gradcampp")
    assert resolve_plan(config_from_dict({"method": ["eigencam", "cam"]})).cfg.method == ("eigencam", "cam")
    plan = resolve_plan(config_from_dict({"method": "grad-cam, gradcam"}))
    assert [s.name for s, _ in plan.methods] == ["gradcam"]  # one method, once


def test_method_knobs_validated():
    with pytest.raises(ConfigError) as e:
        resolve_plan(config_from_dict({"methods": {"gradcam": {"rellu": False}}}))
    assert e.value.message == "methods.gradcam.rellu: unknown key"
    plan = resolve_plan(config_from_dict({"methods": {"gradcam": {"relu": False}}}))
    assert plan.params("gradcam").relu is False
    # Knobs of a method that does not run are validated too, and keyed by its canonical name.
    plan = resolve_plan(config_from_dict({"method": "cam", "methods": {"grad-cam": {"relu": False}}}))
    assert plan.cfg.methods == {"gradcam": {"relu": False}}
    assert config_params(plan.cfg, get_method("gradcam")).relu is False
    with pytest.raises(ConfigError, match="methods: unknown method 'gradcan'"):
        resolve_plan(config_from_dict({"methods": {"gradcan": {}}}))


def test_command_line_method_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--method: unknown method"):
        resolve_plan(apply_overrides(Config(), method="nope"))
    with pytest.raises(ConfigError, match="^method: unknown method"):
        resolve_plan(config_from_dict({"method": "nope"}))


def test_metric_names_and_knobs():
    plan = resolve_plan(config_from_dict({"metrics": "Deletion, insertion"}))
    assert [s.name for s, _ in plan.metrics] == ["deletion", "insertion"]
    assert list(plan.cfg.metrics) == ["deletion", "insertion"]
    with pytest.raises(ConfigError, match="metrics: unknown metric 'delition'"):
        resolve_plan(config_from_dict({"metrics": ["delition"]}))
    with pytest.raises(ConfigError, match="metrics.deletion.steps: must be positive"):
        resolve_plan(config_from_dict({"metrics": {"deletion": {"steps": 0}}}))


def test_method_pairs_take_names_specs_and_pairs():
    spec = get_method("gradcam")
    pairs = method_pairs(["eigencam", spec, (spec, spec.params(relu=False))])
    assert [s.name for s, _ in pairs] == ["eigencam", "gradcam", "gradcam"]
    assert pairs[1][1].relu is True and pairs[2][1].relu is False
