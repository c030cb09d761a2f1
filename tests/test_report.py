"""`xai report`, `xai explain --report/--grid`, `xai compare --report` (issue 11): what the report
and the contact sheet hold, that they are built once when the whole run is on disk (unsharded,
--shard, `xai merge`), and that the HTML needs nothing but its own files. The page itself is
exercised in a real browser in tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import BROKEN, TINY_CONFIG, write_images
from xaicli.cli import app
from xaicli.config import load_config
from xaicli.report import REPORT_HTML, ReportError, write_report
from xaicli.report.grid import ROWS_PER_PAGE, grid_names
from xaicli.run import FINISH_STEPS, finish_pictures, merge_run, run_explain

runner = CliRunner()

EXTRA = """\
metrics:
  deletion: {steps: 4, save_curve: true}
  insertion: {steps: 4}
  boxes: {draw: true}
"""


def xai(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def scores(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def config(folder: Path, method: str = "gradcam,saliency", extra: str = EXTRA, seed: int = 0) -> Path:
    """The tiny network's config (``seed``: another set of random weights, another model)."""
    p = folder / f"tiny-{method.replace(',', '_')}-{seed}.yaml"
    p.write_text(TINY_CONFIG.format(method=method).replace("{num_classes: 5}", f"{{num_classes: 5, seed: {seed}}}")
                 + extra)
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report-images") / "images"
    write_images(d, n=6)
    write_images(d / "sub dir", n=2, seed=5)  # a space in a folder name: URLs are quoted
    shutil.copy(BROKEN / "truncated.png", d / "broken.png")
    return d


@pytest.fixture(scope="module")
def run_dir(images: Path, tmp_path_factory) -> Path:
    """A run with a failed image, metrics, drawn boxes; report and grid from the command line."""
    tmp = tmp_path_factory.mktemp("report-run")
    out = tmp / "run"
    r = xai("explain", images, "-c", config(tmp), "-o", out, "--report", "--grid")
    assert r.exit_code == 1, r.output  # one image failed, the rest completed
    assert f"wrote {out / REPORT_HTML}" in r.output.replace("\n", "")
    return out


def embedded(html: str) -> dict:
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S)
    assert m is not None
    return json.loads(m.group(1))


# --------------------------------------------------------------------------------------------
# The report's content


def test_report_is_offline_and_holds_every_image(run_dir: Path) -> None:
    html = (run_dir / REPORT_HTML).read_text()
    recs = scores(run_dir)
    data = embedded(html)
    assert [row["p"] for row in data["rows"]] == [r["path"] for r in recs]  # every image, failed ones too
    assert [c["method"] for c in data["columns"]] == ["gradcam", "saliency"]
    # Nothing from the network: no absolute URL, every picture a relative file under report/.
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", html) and "@import" not in html
    thumbs = [row["o"] for row in data["rows"] if row.get("o")] + [
        c["t"] for row in data["rows"] for c in row["c"] if c and c.get("t")]
    assert len(thumbs) == 3 * 8  # the 8 good images: original + 2 overlays each
    from urllib.parse import unquote

    for t in thumbs:
        assert t.startswith("report/thumbs/") and (run_dir / unquote(t)).is_file()
    assert any("sub%20dir/" in t for t in thumbs)
    # Thumbnails are cropped back to the image (no caption strip) and fit the box.
    rec = next(r for r in recs if r["status"] == "ok")
    thumb = Image.open(run_dir / "report/thumbs/overlays" / (rec["explanations"][0]["files"]["overlay"] + ".jpg"))
    assert abs(thumb.width / thumb.height - rec["width"] / rec["height"]) < 0.1
    # The failed image and its reason, in the summary and in its row.
    bad = next(r for r in recs if r["status"] != "ok")
    assert bad["path"] in html and bad["error"]["message"] in html
    row = next(row for row in data["rows"] if row["p"] == bad["path"])
    assert row["s"] == "error" and bad["error"]["message"] in row["e"]


def test_report_summary_plots_and_scores(run_dir: Path) -> None:
    html = (run_dir / REPORT_HTML).read_text()
    run = json.loads((run_dir / "run.json").read_text())
    for text in (run["model"], "8 ok", "1 failed", "gradcam", "saliency", "images/s", run["device"]["type"]):
        assert text in re.sub(r"<[^>]+>", "", html), text
    plots = sorted(p.name for p in (run_dir / "report/plots").iterdir())
    assert plots == ["curves.svg", "deletion_auc.svg", "insertion_auc.svg"]
    svg = (run_dir / "report/plots/deletion_auc.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "gradcam" in svg
    # Every score of a cell is there to sort by, with the explained class and its probability.
    data = embedded(html)
    rec = next(r for r in scores(run_dir) if r["status"] == "ok")
    cell = next(row for row in data["rows"] if row["p"] == rec["path"])["c"][0]
    e = rec["explanations"][0]
    assert cell["l"] == e["target"]["label"] and cell["q"] == e["target"]["prob"]
    assert cell["v"]["deletion_auc"] == pytest.approx(e["metrics"]["deletion_auc"], abs=1e-6)
    assert {"prob", "deletion_auc", "insertion_auc"} <= set(data["columns"][0]["keys"])
    assert data["columns"][1]["legend"]["low"] == "0" and "99th" in data["columns"][1]["legend"]["note"]


def test_report_regenerates_and_reuses_thumbnails(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    thumb = next((copy / "report/thumbs/overlays").rglob("*.jpg"))
    before = thumb.stat().st_mtime_ns
    r = xai("report", copy)
    assert r.exit_code == 0, r.output
    assert thumb.stat().st_mtime_ns == before  # up to date: not rewritten
    assert xai("report", tmp_path / "nowhere").exit_code == 2
    # Originals moved away: the report still opens, saying so; --images points at them again.
    data = embedded(write_report(copy, images=tmp_path / "gone").read_text())
    assert all(row["o"] is None for row in data["rows"])


def test_report_write_failure_is_a_runtime_error_that_keeps_the_run(run_dir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    from xaicli import outputs

    def refuse(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(outputs, "atomic_write", refuse)
    with pytest.raises(ReportError, match="the run's results are complete") as e:
        write_report(copy)
    assert e.value.exit_code == 3 and "xai report" in str(e.value.hint)
    assert (copy / "scores.jsonl").is_file()


# --------------------------------------------------------------------------------------------
# The contact sheet


def test_grid_png_has_a_row_per_image_and_a_column_per_method(run_dir: Path) -> None:
    from xaicli.report.grid import CELL_H, CELL_W, GAP

    grid = np.asarray(Image.open(run_dir / "grid.png"))
    n = len(scores(run_dir))
    assert grid.shape[1] == GAP + 3 * (CELL_W + GAP)  # original + gradcam + saliency
    assert grid.shape[0] > n * (CELL_H + GAP)
    assert grid_names(1) == ["grid.png"] and grid_names(3) == ["grid-001.png", "grid-002.png", "grid-003.png"]


def test_grid_pages_for_many_images(tmp_path: Path, monkeypatch) -> None:
    import xaicli.report.grid as grid_mod

    d = tmp_path / "in"
    write_images(d, n=5)
    out = tmp_path / "out"
    assert xai("explain", d, "-c", config(tmp_path, "gradcam", ""), "-o", out, "-q").exit_code == 0
    monkeypatch.setattr(grid_mod, "ROWS_PER_PAGE", 2)
    assert xai("report", out, "--grid").exit_code == 0
    assert sorted(p.name for p in out.glob("grid*.png")) == ["grid-001.png", "grid-002.png", "grid-003.png"]
    monkeypatch.setattr(grid_mod, "ROWS_PER_PAGE", ROWS_PER_PAGE)
    assert xai("report", out, "--grid").exit_code == 0
    assert sorted(p.name for p in out.glob("grid*.png")) == ["grid.png"]  # stale pages removed


# --------------------------------------------------------------------------------------------
# Built once, when the whole run is on disk


def test_sharded_run_writes_its_report_once_merged(images: Path, tmp_path: Path) -> None:
    assert finish_pictures in FINISH_STEPS
    cfg = load_config(config(tmp_path, "gradcam", "output: {report: true, grid: true}\n"))
    out = tmp_path / "sharded"
    first = run_explain(cfg, images, out, shard=(0, 2))
    assert first.pending == ["1/2"]
    assert not (out / REPORT_HTML).exists() and not (out / "grid.png").exists()
    second = run_explain(cfg, images, out, shard=(1, 2))
    assert second.merged is not None
    assert len(embedded((out / REPORT_HTML).read_text())["rows"]) == len(scores(out)) == 9
    assert (out / "grid.png").is_file()
    # `xai merge --partial` of an unfinished layout finishes the run there too.
    out2 = tmp_path / "partial"
    run_explain(cfg, images, out2, shard=(0, 3))
    assert not (out2 / REPORT_HTML).exists()
    merged = merge_run(out2, partial=True)
    assert merged is not None and (out2 / REPORT_HTML).is_file()


def test_report_includes_check_and_sanity_results(images: Path, tmp_path: Path) -> None:
    rules = tmp_path / "expect.yaml"
    rules.write_text(yaml.safe_dump({"rules": [
        {"name": "few failures", "failed_images": {"at_most": 0}},
        {"name": "sanity", "sanity": {"method": "gradcam", "max_images": 2,
                                      "spearman_at_full_randomization": {"at_most": 1.0}}}]}))
    out = tmp_path / "checked"
    cfg = config(tmp_path, "gradcam", "output: {report: true}\n")
    r = xai("check", images, "-e", rules, "-c", cfg, "--out", out, "-q")
    assert r.exit_code == 1, r.output  # the broken image fails the first rule
    html = (out / REPORT_HTML).read_text()
    text = re.sub(r"<[^>]+>", " ", html)
    assert "xai check" in text and "1 of 2 rules passed" in text and "few failures" in text and "FAIL" in text
    assert "xai sanity" in text and "Spearman |map| at full randomization" in text
    assert (out / "report/plots/sanity-1-1.svg").is_file()


def test_compare_report_puts_two_runs_side_by_side(images: Path, run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cfg = config(tmp_path, "gradcam", "", seed=1)  # another model on the same images
    assert xai("explain", images, "-c", cfg, "-o", other, "-q").exit_code == 1
    out = tmp_path / "cmp"
    r = xai("compare", run_dir, other, "--report", "--out", out)
    assert r.exit_code == 0, r.output
    data = embedded((out / REPORT_HTML).read_text())
    assert [r["name"] for r in data["runs"]] == ["A", "B"]
    assert [(c["run"], c["method"]) for c in data["columns"]] == [(0, "gradcam"), (0, "saliency"), (1, "gradcam")]
    assert len(data["rows"]) == 9 and all(len(row["k"]) == 2 for row in data["rows"])
    assert all(c["t"].startswith("report/thumbs/run") for row in data["rows"] for c in row["c"] if c and c.get("t"))
