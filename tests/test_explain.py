"""`xai explain` end to end through the CLI on the tiny network: outputs, exit codes, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import BROKEN, write_images
from tests.nets import GapNet
from xaicli.api import explain_tensor
from xaicli.cli import app
from xaicli.render import normalize

runner = CliRunner()


def xai(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def scores(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_explain_writes_overlays_scores_and_run_json(tmp_path, image_dir, tiny_config):
    (image_dir / "sub" / "deeper").mkdir(parents=True)
    write_images(image_dir / "sub" / "deeper", n=2, seed=3)
    before = tree_digest(image_dir)
    out = tmp_path / "out"
    r = xai("explain", image_dir, "-c", tiny_config("gradcam,cam"), "-o", out, "--save-maps")
    assert r.exit_code == 0, r.output
    recs = scores(out)
    assert [x["path"] for x in recs] == sorted(x["path"] for x in recs)
    assert len(recs) == 7 and all(x["status"] == "ok" for x in recs)
    rec = next(x for x in recs if x["path"] == "sub/deeper/img00.png")
    assert [e["method"] for e in rec["explanations"]] == ["gradcam", "cam"]
    for e in rec["explanations"]:
        assert (out / e["files"]["overlay"]).is_file()
        assert e["files"]["overlay"] == f"overlays/sub/deeper/img00.{e['method']}.png"
        raw = np.load(out / e["files"]["map"])
        assert raw.shape == (rec["height"], rec["width"])
        assert e["layer"] == "features" and e["map"]["shape"] == [16, 16]
        assert 0 <= e["map"]["peak"][0] < rec["width"] and 0 <= e["map"]["peak"][1] < rec["height"]
    ov = Image.open(out / rec["explanations"][0]["files"]["overlay"])
    # The image's own size, with a caption strip below (on a canvas at least 200 px wide).
    assert ov.size[0] == max(rec["width"], 200) and ov.size[1] > rec["height"] and ov.mode == "RGB"
    assert len(rec["topk"]) == 5 and rec["topk"][0]["prob"] >= rec["topk"][1]["prob"]
    assert rec["explanations"][0]["target"]["index"] == rec["topk"][0]["index"]
    assert rec["explanations"][0]["target"]["rank"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["schema_version"] == 1 and run["exit_code"] == 0
    assert run["counts"]["ok"] == 7 and run["counts"]["failed"] == 0
    assert run["versions"]["torch"] == torch.__version__
    assert run["config"]["method"] == ["gradcam", "cam"]
    assert not list(out.rglob("*.tmp"))
    assert tree_digest(image_dir) == before  # the input folder is never modified


def test_maps_match_the_in_memory_core(tmp_path, tiny_config):
    """The file pipeline (decode, preprocess, batch, place, write) gives the core's map."""
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(img).save(d / "a.png")
    out = tmp_path / "out"
    assert xai("explain", d, "-c", tiny_config(), "-o", out, "--save-maps").exit_code == 0
    saved = np.load(out / "maps" / "a.gradcam.npy").astype(np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    core = explain_tensor(GapNet(num_classes=5).eval(), x[None], "gradcam", "features")
    up = torch.nn.functional.interpolate(core[None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(saved, up.numpy(), rtol=2e-3, atol=2e-3 * float(up.abs().max()))


def test_batch_size_does_not_change_results(tmp_path, image_dir, tiny_config):
    a, b = tmp_path / "a", tmp_path / "b"
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", a, "-b", "1", "--save-maps").exit_code == 0
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", b, "-b", "8", "--save-maps").exit_code == 0
    for ra, rb in zip(scores(a), scores(b), strict=True):
        assert ra["topk"] == rb["topk"]
        ea, eb = ra["explanations"][0], rb["explanations"][0]
        assert ea["map"]["peak"] == eb["map"]["peak"]
        np.testing.assert_allclose(np.load(a / ea["files"]["map"]), np.load(b / eb["files"]["map"]), atol=1e-3)


def test_bad_files_are_reported_and_the_rest_completes(tmp_path, image_dir, tiny_config):
    for name in ("truncated.jpg", "empty.jpg", "random_bytes.png", "photo.heic"):
        shutil.copy(BROKEN / name, image_dir / name)
    out = tmp_path / "out"
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", out)
    assert r.exit_code == 1, r.output
    recs = {x["path"]: x for x in scores(out)}
    assert len(recs) == 9
    assert recs["empty.jpg"]["status"] == "error" and recs["empty.jpg"]["error"]["type"] == "empty"
    assert recs["truncated.jpg"]["error"]["type"] == "decode"
    assert recs["photo.heic"]["error"]["type"] == "unsupported"
    good = [x for x in recs.values() if x["status"] == "ok"]
    assert len(good) == 5 and all((out / x["explanations"][0]["files"]["overlay"]).is_file() for x in good)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["failed"] == 4 and run["exit_code"] == 1
    assert {f["path"] for f in run["failures"]} == {"truncated.jpg", "empty.jpg", "random_bytes.png", "photo.heic"}
    assert "4 failed" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradcamm"], "unknown method 'gradcamm'"),
        (["--layer", "featurs"], "no module named 'featurs'"),
        (["--target", "top9"], "top9 but the model has only 5 classes"),
        (["--target", "17"], "class index 17 out of range"),
        (["--device", "tpu"], "runtime.device"),
        (["--method", "cam", "--layer", "features.0"], "cam needs a linear classifier with 8 inputs"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(tmp_path, image_dir, tiny_config, args, message):
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert "Traceback" not in r.output
    assert not (tmp_path / "out" / "scores.jsonl").exists()  # checked before anything is written


def test_missing_and_empty_folders_exit_2(tmp_path, tiny_config):
    r = xai("explain", tmp_path / "nope", "-c", tiny_config(), "-o", tmp_path / "o")
    assert r.exit_code == 2 and "input not found" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    r = xai("explain", empty, "-c", tiny_config(), "-o", tmp_path / "o")
    assert r.exit_code == 2 and "no images in" in r.output and "1 other files ignored" in r.output


def test_existing_run_needs_resume_or_overwrite(tmp_path, image_dir, tiny_config):
    out = tmp_path / "out"
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", out).exit_code == 0
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", out)
    assert r.exit_code == 2 and "already holds a run" in r.output
    (out / "overlays" / "img00.gradcam.png").unlink()
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", out, "--resume")
    assert r.exit_code == 0 and "5 ok" in r.output and "4 already done" in r.output
    assert "on 1 images" in r.output  # only the incomplete image is recomputed
    assert (out / "overlays" / "img00.gradcam.png").is_file()
    assert len(scores(out)) == 5
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", out, "--overwrite")
    assert r.exit_code == 0 and "5 ok" in r.output


def test_out_may_not_contain_the_input(tmp_path, image_dir, tiny_config):
    r = xai("explain", image_dir, "-c", tiny_config(), "-o", tmp_path)
    assert r.exit_code == 2 and "contains the input" in r.output


def test_out_inside_input_is_not_walked(tmp_path, image_dir, tiny_config):
    out = image_dir / "results"
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", out).exit_code == 0
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", out, "--overwrite").exit_code == 0
    assert len(scores(out)) == 5


def test_topk_files_named_by_rank_and_class(tmp_path, image_dir, tiny_config):
    labels = tmp_path / "labels.txt"
    labels.write_text("Ant\nhoney bee\nCat/Kitten\ndog\neel\n")
    cfg = tiny_config()
    cfg.write_text(cfg.read_text().replace("kwargs: {num_classes: 5}", f"kwargs: {{num_classes: 5}}\n  labels: {labels}"))
    out = tmp_path / "out"
    r = xai("explain", image_dir, "-c", cfg, "-o", out, "--target", "top2", "--format", "jpg", "--save-maps")
    assert r.exit_code == 0, r.output
    safe = {"Ant": "ant", "honey bee": "honey_bee", "Cat/Kitten": "cat_kitten", "dog": "dog", "eel": "eel"}
    for rec in scores(out):
        assert [e["target"]["rank"] for e in rec["explanations"]] == [1, 2]
        stem = Path(rec["path"]).with_suffix("").as_posix()
        for e in rec["explanations"]:
            name = f"{stem}.gradcam.top{e['target']['rank']}-{safe[e['target']['label']]}"
            assert e["files"] == {"overlay": f"overlays/{name}.jpg", "map": f"maps/{name}.npy"}
            assert Image.open(out / e["files"]["overlay"]).format == "JPEG"


def test_overlays_describe_themselves_unless_told_not_to(tmp_path, image_dir, tiny_config):
    """Annotated overlays add a caption strip below the image and leave its pixels as the bare
    overlay has them; run.json records how each method was drawn."""
    config = tiny_config("gradcam,saliency")
    bare, annotated = tmp_path / "bare", tmp_path / "annotated"
    assert xai("explain", image_dir, "-c", config, "-o", bare, "--no-annotate").exit_code == 0
    assert xai("explain", image_dir, "-c", config, "-o", annotated).exit_code == 0
    for rec in scores(bare):
        for e in rec["explanations"]:
            plain = np.asarray(Image.open(bare / e["files"]["overlay"]))
            full = np.asarray(Image.open(annotated / e["files"]["overlay"]))
            assert plain.shape == (rec["height"], rec["width"], 3)
            assert full.shape[0] > rec["height"] and full.shape[1] >= max(rec["width"], 200)
            assert np.array_equal(full[: rec["height"], : rec["width"]], plain)
    run = json.loads((annotated / "run.json").read_text())
    assert run["config"]["output"]["annotate"] is True
    styles = {m["name"]: m["style"] for m in run["methods"]}
    assert styles == {"gradcam": {"clip": 100.0, "blend": "alpha"}, "saliency": {"clip": 99.0, "blend": "heat"}}
    assert json.loads((bare / "run.json").read_text())["config"]["output"]["annotate"] is False


def test_same_stem_different_extension_do_not_collide(tmp_path, tiny_config):
    d = tmp_path / "in"
    d.mkdir()
    arr = np.zeros((20, 20, 3), np.uint8)
    Image.fromarray(arr).save(d / "a.png")
    Image.fromarray(arr + 200).save(d / "a.jpg")
    out = tmp_path / "out"
    assert xai("explain", d, "-c", tiny_config(), "-o", out).exit_code == 0
    files = sorted(p.name for p in (out / "overlays").iterdir())
    assert files == ["a.jpg.gradcam.png", "a.png.gradcam.png"]


def test_class_name_target_and_labels(tmp_path, image_dir, tiny_config):
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncat\ndog\neel\n")
    cfg = tiny_config()
    text = cfg.read_text().replace("kwargs: {num_classes: 5}", f"kwargs: {{num_classes: 5}}\n  labels: {labels}")
    cfg.write_text(text)
    out = tmp_path / "out"
    r = xai("explain", image_dir, "-c", cfg, "-o", out, "--target", "Dog")
    assert r.exit_code == 0, r.output
    assert {e["target"]["label"] for x in scores(out) for e in x["explanations"]} == {"dog"}
    r = xai("explain", image_dir, "-c", cfg, "-o", tmp_path / "o2", "--target", "doge")
    assert r.exit_code == 2 and "unknown class name 'doge'" in r.output and "'dog'" in r.output


def test_overlay_colours_follow_the_map(tmp_path):
    """Red (jet high) where the map peaks, blue where it is low."""
    from xaicli.render import colormap, overlay

    lut = colormap("jet", torch.device("cpu"))
    img = torch.full((3, 2, 2), 128, dtype=torch.uint8)
    heat = normalize(torch.tensor([[[0.0, 1.0], [0.2, 0.6]]]))[0]
    ov = overlay(img, heat, lut, alpha=1.0)
    assert ov[0, 1].tolist()[0] > 100 and ov[0, 1].tolist()[2] < 50  # high -> red
    assert ov[0, 0].tolist()[2] > 100 and ov[0, 0].tolist()[0] < 50  # low -> blue
    assert normalize(torch.ones(1, 3, 3)).abs().sum() == 0  # constant map -> zeros, no NaN


def test_methods_and_version_commands():
    r = xai("methods")
    assert r.exit_code == 0
    for name in ("cam", "gradcam", "gradcampp", "hirescam", "xgradcam", "layercam", "eigencam"):
        assert name in r.output
    r = xai("methods", "--json")
    rows = json.loads(r.output)
    assert {"name": "gradcam", "passes": "1 fwd + 1 bwd"}.items() <= next(x for x in rows if x["name"] == "gradcam").items()
    assert xai("--version").output.startswith("xaicli ")


def test_methods_cost_counts_the_configured_layer_channels(tiny_config):
    cfg = tiny_config("scorecam", "methods:\n  smoothgrad: {samples: 8}\n")
    without = {r["name"]: r["passes"] for r in json.loads(xai("methods", "--json").output)}
    assert without["scorecam"] == "1 + C (channels) fwd" and without["smoothgrad"] == "51 fwd + 50 bwd"
    r = xai("methods", "-c", str(cfg), "--json")
    assert r.exit_code == 0, r.output
    rows = {r["name"]: r["passes"] for r in json.loads(r.output)}
    # GapNet's `features` ends with 16 channels: one forward per channel plus the shared one.
    assert rows["scorecam"] == "17 fwd" and rows["smoothgrad"] == "9 fwd + 8 bwd"


def test_methods_and_metrics_list_their_knobs(tiny_config):
    rows = {r["name"]: r for r in json.loads(xai("methods", "--json").output)}
    assert rows["smoothgrad"]["knobs"]["samples"] == 50 and rows["gradcam"]["knobs"] == {"relu": True, "counterfactual": False}
    assert "image_tensor" not in rows["integrated_gradients"]["knobs"]  # filled by code, not a knob
    cfg = tiny_config("gradcam", "methods:\n  smoothgrad: {samples: 8}\nmetrics:\n  deletion: {steps: 10}\n")
    rows = {r["name"]: r for r in json.loads(xai("methods", "-c", str(cfg), "--json").output)}
    assert rows["smoothgrad"]["knobs"]["samples"] == 8
    r = xai("metrics", "--json")
    assert r.exit_code == 0, r.output
    metrics = {m["name"]: m for m in json.loads(r.output)}
    assert metrics["deletion"]["writes"] == ["deletion_auc", "deletion_curve"]
    assert metrics["deletion"]["forwards"] == 51 and metrics["deletion"]["knobs"]["steps"] == 50
    assert metrics["energy"]["ground_truth"] and not metrics["deletion"]["ground_truth"]
    configured = {m["name"]: m for m in json.loads(xai("metrics", "-c", str(cfg), "--json").output)}
    assert configured["deletion"]["forwards"] == 11
    table = xai("metrics").output
    assert "deletion_auc" in table and "box_iou" in table and "needs ground truth" in table


def test_random_weights_are_asked_for_and_assumptions_are_said(tmp_path, image_dir, tiny_config):
    """No trained weights: exit 2 unless `weights: random`; `null` runs with a warning that is
    printed at the start and kept in run.json, as are the class names and preprocessing assumed."""
    tv = tmp_path / "tv.yaml"
    tv.write_text("model: {source: torchvision, name: resnet18}\nruntime: {device: cpu, workers: 0}\n")
    r = xai("explain", image_dir, "-c", tv, "-o", tmp_path / "o1")
    assert r.exit_code == 2 and "model.weights: not given" in r.output and "weights: random" in r.output
    cfg = tiny_config()
    cfg.write_text(cfg.read_text().replace("kwargs: {num_classes: 5}", "kwargs: {num_classes: 5}\n  weights: null"))
    out = tmp_path / "o2"
    r = xai("explain", image_dir, "-c", cfg, "-o", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert text.count("warning: model.weights is null: the model runs with random weights") == 1
    assert "warning: the model has no class names" in text
    run = json.loads((out / "run.json").read_text())
    assert run["warnings"][0].startswith("model.weights is null") and "no class names" in run["warnings"][1]
    assert run["sources"]["weights"] == "random" and run["sources"]["labels"] == "none"
    assert run["sources"]["preprocess"]["resize"] == "config" and run["model"].endswith("(random weights)")
    r = xai("explain", image_dir, "-c", cfg, "-o", tmp_path / "o3", "--quiet")
    assert "model.weights is null" in r.output  # a warning is not progress: --quiet keeps it


def test_compare_without_metrics_says_how_to_get_them(tmp_path, image_dir, tiny_config):
    out = tmp_path / "out"
    assert xai("explain", image_dir, "-c", tiny_config(), "-o", out).exit_code == 0
    r = xai("compare", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "note: no metric values in this run" in text and "`--metrics deletion,insertion`" in text
    result = json.loads(xai("compare", out, out, "--json").stdout)
    assert result["columns"] == [] and "no metric values in these runs" in result["notes"][0]


@pytest.mark.parametrize("command", ["methods", "metrics"])
def test_listings_fit_80_columns_without_splitting_names(command):
    """At an 80-column terminal every name stays on one line and no line is wider."""
    from rich.console import Console

    from xaicli.config import Config
    from xaicli.listing import method_rows, methods_table, metric_rows, metrics_table

    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    if command == "methods":
        rows = method_rows(Config())
        console.print(methods_table(rows, "xai methods"))
    else:
        rows = metric_rows(Config())
        console.print(metrics_table(rows))
    lines = console.export_text().splitlines()
    assert max(len(ln) for ln in lines) <= 80
    first_cells = [ln.split("│")[1].strip() for ln in lines if ln.startswith("│") and ln.split("│")[1].strip()]
    assert [r["name"] for r in rows] == first_cells  # integrated_gradients whole, one name per row
    assert sum(ln.count("knobs") for ln in lines) > len(rows)  # each row says its knobs (or "no knobs")
