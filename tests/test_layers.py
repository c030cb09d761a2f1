"""Layer resolution, automatic choice, the shape table and `xai layers`."""

from __future__ import annotations

import pytest
import torchvision
from typer.testing import CliRunner

from tests.nets import GapNet
from xaicli.cli import app
from xaicli.errors import LayerError
from xaicli.layers import auto_layer, layer_table, resolve_layer


def test_resolve_output_and_input():
    m = GapNet()
    ref = resolve_layer(m, "features.3")
    assert ref.module is m.features[3] and not ref.use_input and ref.spec == "features.3"
    ref = resolve_layer(m, "pool:input")
    assert ref.module is m.pool and ref.use_input and ref.spec == "pool:input"


def test_wrong_layer_lists_close_matches():
    with pytest.raises(LayerError) as e:
        resolve_layer(GapNet(), "featurs")
    assert "no module named 'featurs'" in e.value.message
    assert "'features'" in e.value.hint


def test_bad_port():
    with pytest.raises(LayerError, match="unknown port 'inptu'"):
        resolve_layer(GapNet(), "pool:inptu")


def test_auto_layer_takes_the_pooling_input():
    assert auto_layer(GapNet(), (32, 32)).spec == "pool:input"
    assert auto_layer(torchvision.models.resnet18(), (64, 64)).spec == "avgpool:input"


def test_layer_table_shapes():
    rows = {r.name: r for r in layer_table(GapNet(), (32, 32))}
    assert rows["features"].output_shape == (1, 16, 16, 16)
    assert rows["pool"].output_shape == (1, 16, 1, 1)
    assert rows["fc"].output_shape == (1, 5)


def test_xai_layers_command(tiny_config):
    r = CliRunner().invoke(app, ["layers", "--config", str(tiny_config())])
    assert r.exit_code == 0, r.output
    assert "features" in r.output and "1x16x16x16" in r.output
    assert "target layer: features" in r.output
