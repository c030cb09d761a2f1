"""Layer resolution, automatic choice, the shape table and `xai layers`."""

from __future__ import annotations

import json

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


# --- the automatic layer on torchvision's models (built without weights) ---------------------

# name -> (input size, the automatic layer). CNNs: the pooling's input (or the last spatial module);
# ViT: the norm before the last block's attention; Swin / MaxViT: the last stage where the pooling
# reads it. Small inputs where the model allows (the choice does not depend on the size).
AUTO_TABLE = {
    "resnet18": (64, "avgpool:input"),
    "resnet50": (64, "avgpool:input"),
    "vgg16": (64, "avgpool"),
    "densenet121": (64, "features"),
    "mobilenet_v3_large": (64, "avgpool:input"),
    "efficientnet_b0": (64, "avgpool:input"),
    "convnext_tiny": (64, "avgpool:input"),
    "regnet_y_400mf": (64, "avgpool:input"),
    "squeezenet1_1": (64, "classifier.3:input"),
    "vit_b_16": (224, "encoder.layers.encoder_layer_11.ln_1"),
    "swin_t": (64, "avgpool:input"),
    "maxvit_t": (224, "classifier.0:input"),
}


@pytest.fixture(scope="module", params=sorted(AUTO_TABLE))
def traced(request):
    """A torchvision model without weights, its input size and one dummy forward's trace."""
    from xaicli.layers import trace_modules

    name = request.param
    size = (AUTO_TABLE[name][0],) * 2
    model = torchvision.models.get_model(name, weights=None).eval()
    return name, model, size, trace_modules(model, size)


def test_auto_layer_on_torchvision_models(traced):
    from xaicli.layers import detect_layout

    name, model, size, seen = traced
    ref = auto_layer(model, size, seen=seen)
    assert ref.spec == AUTO_TABLE[name][1]
    t = seen[ref.name]
    layout = detect_layout(t.input_shape if ref.use_input else t.output_shape, size)
    assert layout is not None
    assert layout.kind == ("tokens" if name.startswith("vit") else "nchw")
    if layout.kind == "tokens":
        assert (layout.prefix_tokens, layout.grid) == (1, (14, 14))


def test_shipped_configs_name_the_map_the_automatic_layer_takes(traced):
    """A shipped config's layer records the same tensor as the automatic choice (a layer4 output is
    the pooling's input). vgg16's config takes the 14x14 map before the last max-pool on purpose."""
    import torch

    from tests.test_default_model import ROOT
    from xaicli.capture import record
    from xaicli.config import load_config

    name, model, size, _ = traced
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file() or name == "vgg16":
        pytest.skip(f"no shipped config naming the automatic map for {name}")
    cfg = load_config(path)
    assert cfg.target_layer is not None
    automatic = auto_layer(model, size)  # its own dummy forward, before the hooks below
    with record(resolve_layer(model, cfg.target_layer)) as shipped, record(automatic) as auto, torch.no_grad():
        model(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(shipped.tensor(), auto.tensor())


def test_xai_layers_marks_the_automatic_layer_and_prints_the_layout(tmp_path):
    cfg = tmp_path / "vit.yaml"
    cfg.write_text("model: {source: factory, factory: 'tests.nets:tiny_vit', weights: random}\n"
                   "preprocess: {resize: [32, 32]}\n")
    r = CliRunner().invoke(app, ["layers", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "<- target" in r.output and "(auto)" in r.output
    assert "layout: tokens (1 prefix + 4x4 grid)" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["layers", "--config", str(cfg), "--json"])
    out = json.loads(r.output)
    assert out["auto_layer"] == out["target_layer"] == "encoder.layers.encoder_layer_1.ln_1"
    assert out["layer_layout"] == {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4], "source": "detected",
                                   "shape": [17, 16]}
