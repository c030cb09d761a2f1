"""The embedded default (EfficientNet-Lite0, ImageNet, offline) and the shipped configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import ROOT, SAMPLES
from xaicli.api import explain_tensor
from xaicli.cli import app
from xaicli.config import load_config
from xaicli.models import build_model

CAT_CLASSES = {281, 282, 283, 284, 285, 286, 287}  # tabby .. lynx, the ImageNet cats
CAT_BOX = (30, 0, 385, 300)  # x0, y0, x1, y1 around the cat's head in chelsea.png (451 x 300)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "run"
    r = CliRunner().invoke(app, ["explain", str(SAMPLES), "--out", str(out), "--method", "gradcam,cam"])
    assert r.exit_code == 0, r.output
    return out


def _records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}


def test_default_model_predicts_the_sample_photos(default_run):
    recs = _records(default_run)
    assert set(recs) == {"astronaut.jpg", "camera.png", "chelsea.png", "coffee.png", "coffee_rgba.png", "rocket.jpg"}
    assert all(r["status"] == "ok" for r in recs.values())
    assert recs["chelsea.png"]["topk"][0]["index"] in CAT_CLASSES
    assert recs["chelsea.png"]["topk"][0]["label"] == "Egyptian cat"
    assert recs["chelsea.png"]["topk"][0]["prob"] == pytest.approx(0.79, abs=0.02)
    assert recs["coffee.png"]["topk"][0]["label"] in ("espresso", "cup")
    assert recs["coffee_rgba.png"]["topk"][0]["label"] in ("espresso", "cup")  # RGBA works
    assert recs["camera.png"]["topk"][0]["label"] == "tripod"  # grayscale works


def test_gradcam_peak_lies_on_the_cat(default_run):
    rec = _records(default_run)["chelsea.png"]
    grad = next(e for e in rec["explanations"] if e["method"] == "gradcam")
    x, y = grad["map"]["peak"]
    x0, y0, x1, y1 = CAT_BOX
    assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)
    assert (default_run / grad["files"]["overlay"]).is_file()


def test_cam_works_on_the_default_head(default_run):
    rec = _records(default_run)["coffee.png"]
    methods = {e["method"]: e for e in rec["explanations"]}
    assert methods["cam"]["map"]["max"] > 0
    # CAM and Grad-CAM agree up to scale on a GAP + linear head: same peak.
    assert methods["cam"]["map"]["peak"] == methods["gradcam"]["map"]["peak"]


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_build_without_weights_and_give_a_map(path):
    cfg = load_config(path)
    assert cfg.model.source == "torchvision" and cfg.model.weights
    model_cfg = dataclasses.replace(cfg.model, weights="random", kwargs={"num_classes": 10})  # asked for
    model = build_model(model_cfg, cfg.preprocess).module
    with torch.no_grad():  # torchvision's ViT starts with a zero head: every map would be zero
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    size = 224 if cfg.model.name.startswith("vit") else 96  # a ViT takes the size it was built for
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    m = explain_tensor(model, x, cfg.method[0], cfg.target_layer)
    assert m.dim() == 3 and m.shape[1] >= 2 and torch.isfinite(m).all() and m.max() > 0


def test_shipped_configs_cover_the_required_models():
    assert {p.stem for p in SHIPPED} >= {"resnet50", "vgg16", "densenet121", "mobilenet_v3_large", "convnext_tiny"}
