"""The Python API (xaicli.explain, xaicli.run, load_config, load_model): every misuse of issue 13
raises a clear error, and the maps are the CLI's (same engine, same preprocessing)."""

from __future__ import annotations

import doctest
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import xaicli
from tests.conftest import ROOT, write_images
from tests.nets import GapNet
from xaicli import api
from xaicli.api import explain_tensor
from xaicli.cli import app
from xaicli.errors import ConfigError, InputError, LayerError, XaiError

LABELS = ["tabby cat", "tiger cat", "golden retriever", "espresso", "rocket"]


@pytest.fixture
def net() -> GapNet:
    return GapNet(num_classes=5).eval()


def pixels(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Targets: never the prediction in place of what was asked


def test_made_up_class_name_is_an_error_with_close_matches(net):
    with pytest.raises(ConfigError, match="unknown class name 'tabby'") as e:
        xaicli.explain(net, pixels(), layer="features", target="tabby", labels=LABELS, preprocess=None)
    assert "tabby cat" in str(e.value)  # the hint lists the close matches


def test_class_name_without_class_names_is_an_error(net):
    with pytest.raises(ConfigError, match="no class names"):
        xaicli.explain(net, pixels(), layer="features", target="tabby", preprocess=None)
    with pytest.raises(ConfigError, match="no class names"):
        explain_tensor(net, pixels(), "gradcam", "features", target="tabby")  # was: the prediction, silently


def test_class_name_resolves_through_the_labels(net):
    x = pixels()
    by_name = xaicli.explain(net, x, layer="features", target="golden retriever", labels=LABELS, preprocess=None)
    by_index = xaicli.explain(net, x, layer="features", target=2, preprocess=None)
    assert by_name.targets.tolist() == [2, 2, 2] and by_name.target_labels == ["golden retriever"] * 3
    torch.testing.assert_close(by_name.maps, by_index.maps)


def test_top3_gives_three_maps_per_image_in_rank_order(net):
    x = pixels()
    res = xaicli.explain(net, x, layer="features", target="top3", preprocess=None)
    assert res.maps.shape == (3, 3, 16, 16) and res.targets.shape == (3, 3)
    assert torch.equal(res.targets, net(x).topk(3, dim=1).indices)
    for r in range(3):
        one = explain_tensor(net, x[:1], "gradcam", "features", target=int(res.targets[0, r]))
        torch.testing.assert_close(res.maps[0, r], one[0])
    assert not torch.allclose(res.maps[:, 0], res.maps[:, 1])  # not the prediction three times
    assert res.scores.shape == (3, 3) and bool((res.scores[:, 0] >= res.scores[:, 1]).all())
    assert len(res.overlays(rank=2)) == 3
    torch.testing.assert_close(explain_tensor(net, x, "gradcam", "features", target="top3"), res.maps)  # was: rank 1 only
    with pytest.raises(ConfigError, match="rank 3"):
        res.overlays(rank=3)


def test_per_image_targets_list_names_and_tensor(net):
    x = pixels()
    res = xaicli.explain(net, x, layer="features", target=[4, 0, 2], preprocess=None)
    assert res.targets.tolist() == [4, 0, 2]
    alone = torch.cat([explain_tensor(net, x[i:i + 1], "gradcam", "features", target=t) for i, t in enumerate([4, 0, 2])])
    torch.testing.assert_close(res.maps, alone)
    named = xaicli.explain(net, x, layer="features", target=["rocket", "tabby cat", 2], labels=LABELS, preprocess=None)
    torch.testing.assert_close(named.maps, res.maps)
    as_tensor = xaicli.explain(net, x, layer="features", target=torch.tensor([4, 0, 2]), preprocess=None)
    torch.testing.assert_close(as_tensor.maps, res.maps)
    two = xaicli.explain(net, x, layer="features", target=torch.tensor([[4, 1], [0, 1], [2, 1]]), preprocess=None)
    assert two.maps.shape == (3, 2, 16, 16)
    torch.testing.assert_close(two.maps[:, 0], res.maps)


def test_per_image_targets_of_the_wrong_length_are_an_error(net):
    with pytest.raises(ConfigError, match="2 targets for 3 images"):
        xaicli.explain(net, pixels(), layer="features", target=[0, 1], preprocess=None)
    with pytest.raises(ConfigError, match="4 targets for 3 images"):
        xaicli.explain(net, pixels(), layer="features", target=torch.tensor([0, 1, 2, 3]), preprocess=None)


@pytest.mark.parametrize(("target", "message"), [
    ([0, 9, 1], "image 1: class index 9 out of range"),
    (7, "class index 7 out of range"),
    ("top9", "top9 but the model has only 5 classes"),
    ([0, "tabby", 1], "image 1: unknown class name 'tabby'"),
    ("folder", "per image file"),
    (-1, "must be >= 0"),
])
def test_targets_the_model_cannot_honour_are_errors(net, target, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        xaicli.explain(net, pixels(), layer="features", target=target, labels=LABELS, preprocess=None)


# --------------------------------------------------------------------------------------------
# Layers by name or module


def test_layer_as_module_object_equals_its_dotted_name(net):
    x = pixels()
    by_module = xaicli.explain(net, x, layer=net.features, preprocess=None)
    by_name = xaicli.explain(net, x, layer="features", preprocess=None)
    assert by_module.layer == "features"
    torch.testing.assert_close(by_module.maps, by_name.maps)
    inner = xaicli.explain(net, x, layer=net.features[3], preprocess=None)
    assert inner.layer == "features.3"
    # A method without a layer ignores it, as the folder run does with target_layer.
    assert xaicli.explain(net, x, "saliency", layer="no.such.layer", preprocess=None).layer is None


def test_module_not_in_the_model_is_an_error(net):
    other = GapNet()
    with pytest.raises(LayerError, match="not part of the model"):
        xaicli.explain(net, pixels(), layer=other.features, preprocess=None)
    with pytest.raises(LayerError, match="the model itself"):
        xaicli.explain(net, pixels(), layer=net, preprocess=None)
    with pytest.raises(LayerError, match="did you mean 'features'"):
        xaicli.explain(net, pixels(), layer="featurs", preprocess=None)


# --------------------------------------------------------------------------------------------
# Methods and knobs


def test_several_methods_give_a_dict_and_knobs_per_method(net):
    x = pixels(2)
    res = xaicli.explain(net, x, ["gradcam", "integrated_gradients"], layer="features", preprocess=None,
                         integrated_gradients={"steps": 4})
    assert set(res.maps) == {"gradcam", "integrated_gradients"}
    assert res.maps["integrated_gradients"].shape == (2, 32, 32)
    assert "completeness_gap" in res.extras["integrated_gradients"] and res.extras["gradcam"] == {}
    with pytest.raises(ConfigError, match="say which one"):
        res.overlays()
    assert len(res.overlays("integrated_gradients")) == 2
    with pytest.raises(ConfigError, match="steps"):
        xaicli.explain(net, x, "integrated_gradients", preprocess=None, steps=0)
    with pytest.raises(ConfigError, match="did you mean 'gradcam'"):
        xaicli.explain(net, x, "gradcm", layer="features", preprocess=None)


# --------------------------------------------------------------------------------------------
# Preprocessing: stated, never guessed where it matters


def test_unknown_normalisation_of_tensors_is_an_error_where_a_method_needs_it(net):
    x = pixels(2)
    with pytest.raises(ConfigError, match="normalisation is unknown") as e:
        xaicli.explain(net, x, "integrated_gradients", steps=4)
    assert "preprocess=None" in str(e.value)
    xaicli.explain(net, x, "gradcam", layer="features")  # Grad-CAM does not depend on it
    # preprocess=None: the tensor is the model input as is, the black image is the zero tensor.
    plain = xaicli.explain(net, x, "integrated_gradients", preprocess=None, steps=4)
    torch.testing.assert_close(plain.maps, explain_tensor(net, x, "integrated_gradients", params={"steps": 4}))
    # A stated normalisation: the black baseline is (0 - mean) / std in the model's space.
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    stated = xaicli.explain(net, x, "integrated_gradients", preprocess={"mean": mean, "std": std, "resize": [32, 32]},
                            steps=4)
    torch.testing.assert_close(stated.maps, explain_tensor(net, x, "integrated_gradients", params={"steps": 4},
                                                           mean=mean, std=std))
    assert not torch.allclose(stated.maps, plain.maps)


def test_images_are_preprocessed_like_the_cli(tmp_path, net):
    paths = write_images(tmp_path / "imgs", n=2, sizes=[(40, 48), (50, 30)])
    pre = {"resize": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    from_paths = xaicli.explain(net, paths, layer="features", preprocess=pre)
    from_pil = xaicli.explain(net, [Image.open(p) for p in paths], layer="features", preprocess=pre)
    torch.testing.assert_close(from_paths.maps, from_pil.maps)
    assert [m.shape for m in from_paths.image_maps()] == [(40, 48), (50, 30)]
    assert [o.size for o in from_paths.overlays()] == [(48, 40), (30, 50)]
    captioned = from_paths.overlays(caption=True)  # the CLI's strip below, on a canvas at least 200 px wide
    assert all(c.size[0] == 200 and c.size[1] > o.size[1] for c, o in zip(captioned, from_paths.overlays(), strict=True))
    with pytest.warns(UserWarning, match="ImageNet"):
        xaicli.explain(net, paths, layer="features")  # a bare module: ImageNet's recipe, said aloud
    with pytest.raises(InputError, match="same size"):
        xaicli.explain(net, paths, layer="features", preprocess=None)
    with pytest.raises(InputError, match="not a readable image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image")
        xaicli.explain(net, [bad], layer="features", preprocess=pre)
    with pytest.raises(InputError, match="mix of float tensors"):
        xaicli.explain(net, [pixels(1)[0], paths[0]], layer="features", preprocess=pre)


def test_errors_are_xai_errors_with_exit_codes(net):
    with pytest.raises(XaiError) as e:
        xaicli.explain(net, pixels(), layer="features", target=[0], preprocess=None)
    assert e.value.exit_code == 2 and e.value.hint


# --------------------------------------------------------------------------------------------
# The same code as the CLI


TINY = """
model: {{source: factory, factory: "tests.nets:gap_net", kwargs: {{num_classes: 5}}}}
preprocess: {{resize: [32, 32], mean: [0.5, 0.4, 0.3], std: [0.25, 0.2, 0.3]}}
target_layer: features
method: [gradcam, integrated_gradients, smoothgrad]
methods: {{integrated_gradients: {{steps: 8}}, smoothgrad: {{samples: 4}}}}
target: {target}
runtime: {{device: cpu, batch_size: 2, workers: 0}}
"""


@pytest.mark.parametrize("target", ["predicted", "top2"])
def test_api_maps_equal_the_cli_saved_maps(tmp_path, target):
    images = tmp_path / "imgs"
    paths = write_images(images, n=3, sizes=[(40, 48), (32, 32), (50, 30)])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(target=target))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["explain", str(images), "-c", str(cfg), "-o", str(out), "--save-maps"])
    assert r.exit_code == 0, r.output
    with pytest.warns(UserWarning, match="no class names"):  # what the CLI prints at the start, said here
        model = xaicli.load_model(cfg)
    # SmoothGrad's noise: seeded per image from its file name, as the folder run seeds it from its path.
    res = xaicli.explain(model, sorted(paths), ["gradcam", "integrated_gradients", "smoothgrad"],
                         target=xaicli.load_config(cfg).target, integrated_gradients={"steps": 8},
                         smoothgrad={"samples": 4})
    assert res.layer == "features"
    recs = {rec["path"]: rec for rec in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    compared = 0
    for i, p in enumerate(sorted(paths)):
        rec = recs[p.name]
        assert [t["index"] for t in rec["topk"]] == [t["index"] for t in res.topk[i]]
        for e in rec["explanations"]:
            rank = e["target"]["rank"] - 1 if target == "top2" else 0
            targets = res.targets[i, rank] if target == "top2" else res.targets[i]
            assert int(targets) == e["target"]["index"]
            saved = np.load(out / e["files"]["map"]).astype(np.float32)
            ours = res.image_maps(e["method"], rank)[i].numpy()
            np.testing.assert_allclose(ours, saved, rtol=2e-3, atol=2e-3 * float(np.abs(saved).max()))
            drawn = np.asarray(res.overlays(e["method"], rank, caption=True)[i])
            assert np.array_equal(drawn, np.asarray(Image.open(out / e["files"]["overlay"])))  # the same picture
            compared += 1
    assert compared == 3 * 3 * (2 if target == "top2" else 1)


def test_run_is_the_folder_run(tmp_path, tiny_config, image_dir):
    result = xaicli.run(tiny_config("gradcam"), image_dir, tmp_path / "out", target="top2")
    assert result.exit_code == 0 and result.ok == 5
    assert json.loads((tmp_path / "out" / "run.json").read_text())["target"] == "top2"
    with pytest.raises(ConfigError, match="did you mean"):
        xaicli.run(tiny_config("gradcam"), image_dir, tmp_path / "out2", method="gradcm")
    from xaicli import run as folder_run
    assert folder_run.run_explain is not None  # the module stays importable as before


def test_py_typed_is_packaged():
    assert (ROOT / "xaicli" / "py.typed").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^xaicli = \[.*"py\.typed"', text, re.MULTILINE)


# --------------------------------------------------------------------------------------------
# Documentation that runs


@pytest.mark.slow
def test_docstring_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    from xaicli import config

    for module in (api, xaicli.run, config):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert tried > 0 and failures == 0, module.__name__


def python_blocks(markdown: str, heading: str) -> list[str]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


@pytest.mark.slow
def test_readme_example_runs(monkeypatch, tmp_path):
    """The README's Python section, executed as written (in a folder holding sample_images)."""
    blocks = python_blocks((ROOT / "README.md").read_text(), "## Python")
    assert blocks
    os.symlink(ROOT / "sample_images", tmp_path / "sample_images")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)
    assert list(tmp_path.glob("*.png"))  # it saved its overlay


@pytest.mark.slow
def test_docs_api_examples_run(monkeypatch, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.DOTALL)
    assert blocks
    os.symlink(ROOT / "sample_images", tmp_path / "sample_images")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), scope)


def test_doc_page_lists_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in ("xaicli.explain", "xaicli.run", "xaicli.load_config", "xaicli.load_model", "Explained"):
        assert name in text, name
    assert Path(ROOT / "README.md").read_text().count("docs/api.md")


def test_bad_runtime_options_and_a_training_model():
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    bn.train()
    stats = bn[1].running_mean.clone()
    res = xaicli.explain(bn, pixels(2), "gradcam", preprocess=None)  # automatic layer: its dry run too in eval
    assert res.layer == "3:input" and bn.training and torch.equal(bn[1].running_mean, stats)
    with pytest.raises(ConfigError, match="precision"):
        xaicli.explain(bn, pixels(2), "gradcam", preprocess=None, precision="fp64")
    with pytest.raises(ConfigError, match="batch_size"):
        xaicli.explain(bn, pixels(2), "gradcam", preprocess=None, batch_size=0)


class DictNet(GapNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": super().forward(x)}


def test_a_model_returning_a_dict_works_with_many_forward_methods():
    net = DictNet().eval()
    x = pixels(2)
    res = xaicli.explain(net, x, ["gradcam", "occlusion"], preprocess=None, occlusion={"window": 8, "stride": 8})
    plain = xaicli.explain(GapNet().eval(), x, ["gradcam", "occlusion"], preprocess=None,
                           occlusion={"window": 8, "stride": 8})
    assert res.layer == "pool:input"
    for name in ("gradcam", "occlusion"):
        torch.testing.assert_close(res.maps[name], plain.maps[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_api_on_the_gpu_matches_the_cpu(net):
    x = pixels(3)
    cpu = xaicli.explain(net, x, ["gradcam", "integrated_gradients"], layer=net.features, target="top2",
                         preprocess=None, integrated_gradients={"steps": 8})
    gpu_net = GapNet(num_classes=5).eval().cuda()
    gpu = xaicli.explain(gpu_net, x.cuda(), ["gradcam", "integrated_gradients"], layer=gpu_net.features,
                         target="top2", preprocess=None, integrated_gradients={"steps": 8})
    assert torch.equal(cpu.targets, gpu.targets)
    for name in cpu.methods:
        torch.testing.assert_close(gpu.maps[name], cpu.maps[name], rtol=1e-3, atol=1e-4)
    assert len(gpu.overlays("gradcam", rank=1)) == 3
