"""Per-image targets: a CSV/JSON file of path -> class, the parent folder (ImageFolder layout), and
the prediction beside either (issue 12, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_images
from tests.nets import GapNet
from xaicli.cli import app
from xaicli.config import TargetConfig, parse_target
from xaicli.engine import Explainer
from xaicli.errors import ConfigError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner
from xaicli.plan import method_params
from xaicli.targets import load_image_targets

LABELS = ["ant", "bee", "cat", "dog", "eel"]


def xai(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def scores(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """images/ant/img0{0,1}, images/dog/img0{0,1}, images/zebra/img00 (not a class), images/img00."""
    root = tmp_path / "images"
    write_images(root / "ant", n=2, seed=1)
    write_images(root / "dog", n=2, seed=2)
    write_images(root / "zebra", n=1, seed=3)
    write_images(root, n=1, seed=4)
    return root


@pytest.fixture
def labelled_config(tmp_path: Path, tiny_config):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cfg = tiny_config("gradcam,saliency")
    cfg.write_text(cfg.read_text().replace("kwargs: {num_classes: 5}", f"kwargs: {{num_classes: 5}}\n  labels: {labels}"))
    return cfg


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("folder", TargetConfig(mode="folder")),
        ("labels.csv", TargetConfig(mode="file", file="labels.csv")),
        ("a/b.JSON", TargetConfig(mode="file", file="a/b.JSON")),
        ("predicted,folder", TargetConfig(mode="folder", also_predicted=True)),
        (["predicted", "t.json"], TargetConfig(mode="file", file="t.json", also_predicted=True)),
        ("folder, predicted", TargetConfig(mode="folder", also_predicted=True)),
    ],
)
def test_parse_per_image_targets(value, expected):
    t = parse_target(value)
    assert t == expected and t.per_image
    assert parse_target(t.describe()) == t  # run.json's "target" reads back


def test_bad_per_image_targets_say_what_to_write():
    with pytest.raises(ConfigError) as e:
        parse_target("predicted_and_true")
    assert "predicted,folder" in e.value.hint
    with pytest.raises(ConfigError, match="'predicted' and one per-image source"):
        parse_target("predicted,top3")
    with pytest.raises(ConfigError, match="'predicted' and one per-image source"):
        parse_target(["folder", "t.csv"])


def test_targets_file_csv_and_json(tmp_path: Path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,path,target\n1,./ant/a.png, bee\n2,dog\\b.jpg,3\n\n")
    t = load_image_targets(parse_target(str(csv)), LABELS, 5)
    assert t is not None and t.by_path == {"ant/a.png": 1, "dog/b.jpg": 3}
    assert t.resolve("ant/a.png", Path("x")) == 1
    assert t.resolve("cat/c.png", Path("x")) == f"no target for cat/c.png in {csv}"
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"a.png": "EEL", "b.png": 0}))
    assert load_image_targets(parse_target(str(js)), LABELS, 5).by_path == {"a.png": 4, "b.png": 0}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "file,class\na.png,1\n", "the first row must be a header with the columns path and target"),
        ("t.csv", "path,target\na.png,antt\nb.png,9\n", "a.png: unknown class name 'antt' (did you mean 'ant'"),
        ("t.csv", "path,target\na.png,antt\nb.png,9\n", "b.png: class index 9 out of range (the model has 5 classes)"),
        ("t.csv", "path,target\na.png,1\na.png,2\n", "a.png is listed twice with different targets"),
        ("t.csv", "path,target\n", "lists no images"),
        ("t.json", "[1, 2]", "expected a JSON object {path: target}"),
        ("t.json", '{"a.png": [1]}', "a.png: expected a class index or name"),
        ("t.json", "{", "not valid JSON"),
    ],
)
def test_bad_targets_files_are_usage_errors(tmp_path: Path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_image_targets(parse_target(str(p)), LABELS, 5)
    assert message in e.value.message


def test_class_names_need_labels(tmp_path: Path):
    p = tmp_path / "t.csv"
    p.write_text("path,target\na.png,cat\nb.png,2\n")
    with pytest.raises(ConfigError, match="the model has no class names"):
        load_image_targets(parse_target(str(p)), None, 5)


def test_explainer_takes_targets_as_a_function_of_the_logits(gap_net):
    x = torch.randn(3, 3, 32, 32)
    spec = get_method("gradcam")
    exp = Explainer(gap_net, [(spec, method_params(spec))], resolve_layer(gap_net, "features"), TargetConfig(),
                    Runner(gap_net, 8))
    known = torch.tensor([4, 0, 2])
    res = exp(x, targets=lambda logits: torch.stack([logits.argmax(1), known], 1))
    assert res.targets[:, 0].tolist() == gap_net(x).argmax(1).tolist() and res.targets[:, 1].tolist() == [4, 0, 2]
    fixed = exp(x, targets=known)
    torch.testing.assert_close(res.methods[0].maps[1], fixed.methods[0].maps[0])
    with pytest.raises(ConfigError, match="gives a class per image file"):
        Explainer(gap_net, [(spec, method_params(spec))], resolve_layer(gap_net, "features"),
                  TargetConfig(mode="folder"), Runner(gap_net, 8))(x)


def test_folder_targets_end_to_end(tmp_path: Path, class_tree: Path, labelled_config: Path):
    out = tmp_path / "out"
    r = xai("explain", class_tree, "-c", labelled_config, "-o", out, "--target", "folder", "--save-maps")
    assert r.exit_code == 1, r.output  # two images have no class folder
    recs = scores(out)
    for path, want in (("ant/img00.png", 0), ("ant/img01.jpg", 0), ("dog/img00.png", 3), ("dog/img01.jpg", 3)):
        assert recs[path]["status"] == "ok"
        for e in recs[path]["explanations"]:
            assert e["target"]["index"] == want and e["target"]["source"] == "folder"
            assert e["target"]["label"] == LABELS[want]
        stem = path.rsplit(".", 1)[0]
        assert recs[path]["explanations"][0]["files"]["overlay"] == f"overlays/{stem}.gradcam.png"  # no suffix
    assert recs["zebra/img00.png"]["error"] == {
        "type": "target", "message": "folder 'zebra': unknown class name 'zebra' (valid choices: ant, bee, cat, dog, eel)"}
    assert recs["img00.png"]["error"]["type"] == "target"
    run = json.loads((out / "run.json").read_text())
    assert run["target"] == "folder" and run["counts"]["failed"] == 2
    # The per-image class gives the map a fixed --target of that class gives.
    fixed = tmp_path / "fixed"
    assert xai("explain", class_tree / "dog", "-c", labelled_config, "-o", fixed, "--target", "dog",
               "--save-maps").exit_code == 0
    for name in ("img00.gradcam.npy", "img01.saliency.npy"):
        np.testing.assert_array_equal(np.load(out / "maps" / "dog" / name), np.load(fixed / "maps" / name))


def test_targets_file_end_to_end_missing_image_is_an_error(tmp_path: Path, class_tree: Path, labelled_config: Path):
    table = tmp_path / "targets.csv"
    table.write_text("path,target\nant/img00.png,bee\nant/img01.jpg,4\ndog/img00.png,Dog\nzebra/img00.png,0\n"
                     "img00.png,cat\n")
    out = tmp_path / "out"
    r = xai("explain", class_tree, "-c", labelled_config, "-o", out, "--target", table)
    assert r.exit_code == 1, r.output
    recs = scores(out)
    got = {p: [e["target"]["index"] for e in r["explanations"]] for p, r in recs.items() if r["status"] == "ok"}
    assert got == {"ant/img00.png": [1, 1], "ant/img01.jpg": [4, 4], "dog/img00.png": [3, 3],
                   "zebra/img00.png": [0, 0], "img00.png": [2, 2]}
    assert {e["target"]["source"] for r in recs.values() for e in r.get("explanations") or []} == {"file"}
    assert recs["dog/img01.jpg"]["error"] == {"type": "target", "message": f"no target for dog/img01.jpg in {table}"}
    assert "no target for dog/img01.jpg" in r.output  # named in the summary too


def test_predicted_and_folder_gives_both_maps(tmp_path: Path, class_tree: Path, labelled_config: Path):
    out = tmp_path / "out"
    r = xai("explain", class_tree / "ant", "-c", labelled_config, "-o", out, "--target", "predicted,folder")
    assert r.exit_code == 0, r.output
    rec = scores(out)["img00.png"]
    predicted = rec["topk"][0]["index"]
    entries = [(e["method"], e["target"]["index"], e["target"]["source"], e["target"]["rank"], e["files"]["overlay"])
               for e in rec["explanations"]]
    assert entries[:2] == [("gradcam", predicted, "predicted", 1, "overlays/img00.gradcam.predicted.png"),
                           ("gradcam", 0, "folder", entries[1][3], "overlays/img00.gradcam.true.png")]
    assert [e[0] for e in entries] == ["gradcam", "gradcam", "saliency", "saliency"]
    assert all((out / e[4]).is_file() for e in entries)
    assert json.loads((out / "run.json").read_text())["target"] == "predicted,folder"


def test_sanity_explains_each_images_own_class(tmp_path: Path, class_tree: Path, labelled_config: Path):
    from xaicli.config import apply_overrides, load_config
    from xaicli.sanity import run_sanity

    cfg = apply_overrides(load_config(labelled_config), target="folder", method="gradcam")
    res = run_sanity(cfg, class_tree, steps=1)
    assert res.result.targets.tolist() == [0, 0, 3, 3]
    assert sorted(f["path"] for f in res.report["failed_images"]) == ["img00.png", "zebra/img00.png"]


def test_gap_net_is_deterministic():
    """The fixtures above compare maps across runs: the tiny network must be the same each time."""
    a, b = GapNet(), GapNet()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
