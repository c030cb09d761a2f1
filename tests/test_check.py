"""`xai check`: the expectations file, rule evaluation on hand-written scores.jsonl records,
JUnit XML, exit codes through the CLI, and one end-to-end run on the tiny network."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from xaicli.check import (
    Bounds,
    Outcome,
    SanitySpec,
    evaluate,
    expectations_from_dict,
    glob_regex,
    junit_xml,
    load_expectations,
)
from xaicli.cli import app
from xaicli.errors import ConfigError


def entry(method: str, prob: float, **metrics: object) -> dict:
    return {"method": method, "layer": "features", "target": {"index": 1, "label": "tabby", "prob": prob, "rank": 1},
            "map": {"shape": [7, 7], "min": 0.0, "max": 2.0, "mean": 0.5, "peak": [3, 4]},
            "files": {"overlay": None, "map": None}, "metrics": metrics}


def record(path: str, top: tuple[int, str], *entries: dict) -> dict:
    return {"path": path, "status": "ok", "error": None, "width": 64, "height": 48,
            "topk": [{"index": top[0], "label": top[1], "prob": 0.8}, {"index": 0, "label": "other", "prob": 0.1}],
            "explanations": list(entries)}


# Keys as the metrics issue writes them (explanations[i].metrics): numbers, a bool, lists.
RECORDS = [
    record("cats/a.png", (281, "tabby"),
           entry("gradcam", 0.9, energy=0.7, deletion_auc=0.10, pointing_hit=True, box_iou=[0.6, 0.4],
                 boxes=[[1, 2, 30, 40], [3, 4, 20, 20]]),
           entry("layercam", 0.9, energy=0.2, deletion_auc=0.30, pointing_hit=False, box_iou=[0.1, 0.0])),
    record("cats/deep/b.jpg", (285, "Egyptian cat"),
           entry("gradcam", 0.6, energy=0.8, deletion_auc=0.15, pointing_hit=False, box_iou=[0.5, 0.3]),
           entry("layercam", 0.6, energy=0.3, deletion_auc=0.25, pointing_hit=True, box_iou=[0.2, 0.1])),
    record("dogs/c.png", (207, "golden retriever"),
           entry("gradcam", 0.5, energy=0.5, deletion_auc=None, pointing_hit=True, box_iou=[0.9, 0.8]),
           entry("layercam", 0.5, energy=0.4, deletion_auc=0.2, pointing_hit=True, box_iou=[0.3, 0.3])),
    {"path": "dogs/broken.jpg", "status": "error", "error": {"type": "decode", "message": "truncated"}},
]
RUN = {"methods": [{"name": "gradcam"}, {"name": "layercam"}], "counts": {"ok": 3, "failed": 1},
       "timings": {"images_per_s": 12.5}, "aggregates": {"gradcam": {"energy": {"mean": 0.6667, "std": 0.15, "n": 3}}}}


def run_rules(rules: list[dict], records: list[dict] = RECORDS, run: dict | None = RUN,
              sanity: dict | None = None) -> list[Outcome]:
    return evaluate(expectations_from_dict({"rules": rules}), records, run, sanity)


def one(rule: dict, **kw: object) -> Outcome:
    return run_rules([rule], **kw)[0]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Rules over hand-written records


def test_metric_rules_pass_and_fail_with_the_exact_value() -> None:
    o = one({"name": "e", "method": "gradcam", "metric": "energy", "at_least": 0.6})
    assert o.passed and o.measured == pytest.approx((0.7 + 0.8 + 0.5) / 3) and o.n == 3
    o = one({"name": "e", "method": "gradcam", "metric": "energy", "at_least": 0.7})
    assert not o.passed and o.measured == pytest.approx(2 / 3)
    for agg, want in (("min", 0.5), ("max", 0.8), ("median", 0.7)):
        o = one({"name": agg, "method": "gradcam", "metric": "energy", "aggregate": agg, "at_least": 0})
        assert o.measured == pytest.approx(want), agg
    o = one({"name": "d", "method": "layercam", "metric": "deletion_auc", "at_most": 0.2})
    assert not o.passed and o.measured == pytest.approx(0.25)
    o = one({"name": "r", "method": "layercam", "metric": "energy", "at_least": 0.2, "at_most": 0.35})
    assert o.passed and o.measured == pytest.approx(0.3)
    # Fields that exist in every run today: target.prob, map stats, topk of the record.
    assert one({"name": "p", "method": "gradcam", "metric": "target.prob", "aggregate": "min", "at_least": 0.5}).passed
    assert one({"name": "m", "method": "gradcam", "metric": "map.max", "at_most": 2}).measured == 2
    assert one({"name": "t", "method": "gradcam", "metric": "topk.1.prob", "at_most": 0.1}).measured == pytest.approx(0.1)
    # A list-valued metric reached by index; null values (non-finite) are left out and counted.
    o = one({"name": "iou", "method": "gradcam", "metric": "box_iou.1", "aggregate": "min", "at_least": 0.3})
    assert o.passed and o.measured == pytest.approx(0.3)
    o = one({"name": "d", "method": "gradcam", "metric": "deletion_auc", "at_most": 0.2})
    assert o.passed and o.measured == pytest.approx(0.125) and o.n == 2 and "1 without a value" in o.detail


def test_fraction_true_and_globs() -> None:
    o = one({"name": "hit", "method": "gradcam", "metric": "pointing_hit", "aggregate": "fraction_true",
             "at_least": 0.75})
    assert not o.passed and o.measured == pytest.approx(2 / 3)
    o = one({"name": "cats", "images": "cats/**", "method": "gradcam", "metric": "energy", "at_least": 0.75})
    assert o.passed and o.measured == pytest.approx(0.75) and o.n == 2
    # `*` stays inside one folder; `**/` crosses any number, including none; a list is a union.
    o = one({"name": "png", "images": ["*/*.png"], "method": "gradcam", "metric": "energy", "at_least": 0})
    assert o.n == 2 and o.measured == pytest.approx(0.6)
    o = one({"name": "deep", "images": "**/b.jpg", "method": "gradcam", "metric": "energy", "at_least": 0})
    assert o.n == 1 and o.measured == pytest.approx(0.8)
    o = one({"name": "none", "images": "birds/**", "method": "gradcam", "metric": "energy", "at_least": 0})
    assert not o.passed and o.measured is None and "no images matching birds/**" in o.detail


def test_glob_regex() -> None:
    cases = {
        "cats/**": (["cats/a.png", "cats/x/y/b.jpg"], ["dogs/a.png", "cats"]),
        "cats/": (["cats/a.png", "cats/x/b.png"], ["catsx/a.png"]),
        "*.png": (["a.png"], ["cats/a.png", "a.jpg"]),
        "**/*.png": (["a.png", "cats/a.png", "c/d/e.png"], ["a.pngx"]),
        "cats/img0?.[pj]*": (["cats/img01.png", "cats/img02.jpg"], ["cats/img10.png", "cats/img01.bmp"]),
        "[!c]*/*": (["dogs/a.png"], ["cats/a.png"]),
    }
    for pattern, (yes, no) in cases.items():
        rx = glob_regex(pattern)
        assert all(rx.match(p) for p in yes), pattern
        assert not any(rx.match(p) for p in no), pattern


def test_predicted_in_names_indices_and_fraction() -> None:
    cats = ["Egyptian cat", "TABBY", 282]
    o = one({"name": "cats", "images": "cats/**", "predicted_in": cats})
    assert o.passed and o.measured == 1.0 and o.rule.bounds.at_least == 1.0
    o = one({"name": "all", "predicted_in": cats})
    assert not o.passed and o.measured == pytest.approx(2 / 3) and "dogs/c.png -> golden retriever" in o.detail
    assert one({"name": "most", "predicted_in": cats, "at_least": 0.6}).passed
    assert one({"name": "idx", "predicted_in": [207], "images": "dogs/*"}).measured == 1.0
    assert one({"name": "one", "predicted_in": "tabby"}).measured == pytest.approx(1 / 3)


def test_failed_images_count_and_fraction() -> None:
    o = one({"name": "f", "failed_images": {"at_most": 0}})
    assert not o.passed and o.measured == 1 and o.n == 4
    o = one({"name": "f", "failed_images": {"at_most": 0.25, "fraction": True}})
    assert o.passed and o.measured == pytest.approx(0.25)
    assert one({"name": "f", "images": "cats/**", "failed_images": {"at_most": 0}}).passed


def test_missing_things_fail_and_unknown_names_are_usage_errors() -> None:
    # Known metric, not switched on in this run: FAIL, never a silent pass.
    o = one({"name": "ins", "method": "gradcam", "metric": "insertion_auc", "at_least": 0.5})
    assert not o.passed and o.measured is None
    assert o.detail.startswith("metric insertion_auc is not in the run: add `--metrics insertion` (or `metrics: "
                               "[insertion]` in the config); present: ")
    assert "energy" in o.detail  # what is present
    plain = [record("a.png", (1, "tabby"), entry("gradcam", 0.9, deletion_auc=0.2))]
    o = one({"name": "iou", "method": "gradcam", "metric": "box_iou.0", "at_least": 0.5}, records=plain)
    assert o.detail.startswith("metric box_iou.0 is not in the run: add `--metrics box_iou` with `--ground-truth PATH`")
    nulls = [record("a.png", (1, "tabby"), entry("gradcam", 0.9, energy=None))]
    o = one({"name": "en", "method": "gradcam", "metric": "energy", "at_least": 0.5}, records=nulls)
    assert not o.passed and o.detail == ("metric energy has no value for gradcam: null in all 1 explanations "
                                         "(no ground truth for these images?)")
    o = one({"name": "e", "method": "gradcam", "metric": "energy", "at_least": 0}, records=[RECORDS[3]])
    assert not o.passed and "none of the 1 images" in o.detail
    o = one({"name": "m", "method": "xgradcam", "metric": "energy", "at_least": 0})
    assert not o.passed and "xgradcam is not in the run" in o.detail
    o = one({"name": "r", "run": "timings.missing", "at_least": 0})
    assert not o.passed and "run.json has no timings.missing" in o.detail
    assert not one({"name": "r", "run": "counts.ok", "at_least": 0}, run=None).passed
    # Unknown names: usage errors with the close matches.
    with pytest.raises(ConfigError, match="unknown metric 'enrgy'") as e:
        one({"name": "typo", "method": "gradcam", "metric": "enrgy", "at_least": 0.5})
    assert "energy" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="is a list, not a number"):
        one({"name": "boxes", "method": "gradcam", "metric": "boxes", "at_least": 0})
    with pytest.raises(ConfigError, match="say which with method"):
        one({"name": "which", "metric": "energy", "at_least": 0})


def test_run_and_sanity_rules() -> None:
    o = one({"name": "speed", "run": "timings.images_per_s", "at_least": 10})
    assert o.passed and o.measured == 12.5
    o = one({"name": "agg", "run": "aggregates.gradcam.energy.mean", "at_least": 0.7})
    assert not o.passed and o.measured == pytest.approx(0.6667)
    rule = {"name": "s", "sanity": {"method": "gradcam", "spearman_at_full_randomization": {"at_most": 0.5}}}
    rep = {"images": ["a", "b"], "steps": [{}, {}],
           "methods": {"gradcam": {"full_randomization": {"spearman_abs": 0.2, "spearman": -0.1, "ssim": 0.7}}}}
    o = one(rule, sanity={(1, 16, ()): rep})
    assert o.passed and o.measured == 0.2 and o.n == 2
    ssim_rule = {"name": "s", "sanity": {"method": "gradcam", "ssim_at_full_randomization": {"at_most": 0.5}}}
    o = one(ssim_rule, sanity={(1, 16, ()): rep})
    assert not o.passed and o.measured == 0.7
    assert not one(rule).passed  # no sanity result: FAIL


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ([{"name": "a", "metrc": "energy"}], r"rules\[0\] \(a\)\.metrc: unknown key"),
        ([{"name": "a", "metric": "energy", "predicted_in": [1], "at_least": 0}], "exactly one of"),
        ([{"name": "a", "images": "x/**"}], "exactly one of"),
        ([{"name": "a", "metric": "energy"}], "give at_least, at_most or both"),
        ([{"name": "a", "metric": "energy", "at_least": 0.9, "at_most": 0.1}], "above at_most"),
        ([{"name": "a", "metric": "energy", "aggregate": "avg", "at_least": 0}], "expected one of 'mean'"),
        ([{"name": "a", "failed_images": {"at_most": 0}, "at_most": 0}], "does not apply to a failed_images rule"),
        ([{"name": "a", "failed_images": {"at_mots": 0}}], r"failed_images\.at_mots: unknown key"),
        ([{"name": "a", "predicted_in": [1], "method": "gradcam"}], "does not apply to a predicted_in rule"),
        ([{"name": "a", "method": "gradcm", "metric": "energy", "at_least": 0}], "unknown method 'gradcm'"),
        ([{"name": "a", "sanity": {"method": "gradcam"}}], "exactly one of spearman_at_full_randomization"),
        ([{"name": "a", "sanity": {"spearman_at_full_randomization": {"at_most": 0.5}}}], "name the method"),
        ([{"name": "a", "run": "counts.ok", "at_least": 1}, {"name": "a", "run": "counts.ok", "at_least": 1}],
         "two rules are named 'a'"),
        ([], "no rules given"),
    ],
)
def test_bad_expectations_are_usage_errors(rules: list[dict], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        expectations_from_dict({"rules": rules})


def test_unknown_top_level_key_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "e.yaml"
    p.write_text("rule:\n  - {failed_images: {at_most: 0}}\n")
    with pytest.raises(ConfigError, match="rule: unknown key") as e:
        load_expectations(p)
    assert "rules" in (e.value.hint or "")
    p.write_text("rules:\n  - {failed_images: {at_most: 0}}\n"
                 "  - {sanity: {spearman_at_full_randomization: {at_most: 0.4}}}\n")
    exp = load_expectations(p, default_method="gradcam")
    assert [r.name for r in exp.rules] == ["failed images", "sanity gradcam spearman_at_full_randomization"]
    assert exp.rules[1].sanity is not None and exp.rules[1].sanity.measure == "spearman_abs"
    p.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_expectations(p)


def test_junit_xml_one_testcase_per_rule() -> None:
    outcomes = run_rules([
        {"name": "no failures", "failed_images": {"at_most": 0}},
        {"name": "energy <cats>", "images": "cats/**", "method": "gradcam", "metric": "energy", "at_least": 0.6},
        {"name": "absent", "method": "gradcam", "metric": "insertion_auc", "at_least": 0.5},
    ])
    root = ET.fromstring(junit_xml(outcomes, time_s=1.5))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["no failures", "energy <cats>", "absent"]
    assert cases["energy <cats>"].find("failure") is None
    fail = cases["no failures"].find("failure")
    assert fail is not None and fail.get("message") == "measured 1, expected <= 0"
    assert "add `--metrics insertion`" in (cases["absent"].find("failure").get("message") or "")  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Through the CLI


def write_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "run.json").write_text(json.dumps(RUN))
    return folder


def write_rules(path: Path, rules: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def test_cli_exit_codes_and_junit_on_an_existing_run(tmp_path: Path) -> None:
    runner = CliRunner()
    run = write_run(tmp_path / "run")
    passing = write_rules(tmp_path / "ok.yaml", [
        {"name": "cats are cats", "images": "cats/**", "predicted_in": ["tabby", "Egyptian cat"]},
        {"name": "grad-cam energy", "method": "gradcam", "metric": "energy", "at_least": 0.6},
    ])
    junit = tmp_path / "reports" / "junit.xml"
    res = runner.invoke(app, ["check", "-e", str(passing), "--run", str(run), "--junit", str(junit)])
    assert res.exit_code == 0, res.output
    assert "2 of 2 rules passed" in res.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and [c.get("name") for c in suite] == ["cats are cats", "grad-cam energy"]
    assert not suite.findall("testcase/failure")

    failing = write_rules(tmp_path / "bad.yaml", [
        {"name": "no failed images", "failed_images": {"at_most": 0}},
        {"name": "deletion", "method": "layercam", "metric": "deletion_auc", "at_most": 0.2},
        {"name": "energy", "method": "gradcam", "metric": "energy", "at_least": 0.6},
    ])
    out = tmp_path / "check-out"
    res = runner.invoke(app, ["check", "-e", str(failing), "--run", str(run), "--junit", str(junit), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "1 of 3 rules passed" in res.output
    failed = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None]
    assert failed == ["no failed images", "deletion"]
    report = json.loads((out / "check.json").read_text())
    assert [r["passed"] for r in report["rules"]] == [False, False, True]
    assert report["rules"][1]["measured"] == pytest.approx(0.25)

    typo = write_rules(tmp_path / "typo.yaml", [{"name": "x", "failed_imgs": {"at_most": 0}}])
    res = runner.invoke(app, ["check", "-e", str(typo), "--run", str(run), "--junit", str(tmp_path / "j2.xml")])
    assert res.exit_code == 2
    assert not (tmp_path / "j2.xml").exists()
    unknown = write_rules(tmp_path / "unknown.yaml", [{"name": "x", "method": "gradcam", "metric": "enrgy",
                                                       "at_least": 0}])
    assert runner.invoke(app, ["check", "-e", str(unknown), "--run", str(run)]).exit_code == 2
    assert runner.invoke(app, ["check", "-e", str(passing)]).exit_code == 2  # neither IMAGES nor --run
    assert runner.invoke(app, ["check", "-e", str(passing), "--run", str(tmp_path)]).exit_code == 2  # no scores
    assert runner.invoke(app, ["check", "--run", str(run)]).exit_code == 2  # --expect missing


def test_cli_check_end_to_end_on_the_tiny_network(tiny_config, image_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = tiny_config("gradcam")
    rules = write_rules(tmp_path / "expect.yaml", [
        {"name": "no failed images", "failed_images": {"at_most": 0}},
        {"name": "probabilities", "metric": "target.prob", "aggregate": "min", "at_least": 0},
        {"name": "known classes", "predicted_in": [0, 1, 2, 3, 4]},
        {"name": "all processed", "run": "counts.ok", "at_least": 5},
        {"name": "sanity", "sanity": {"method": "gradcam", "max_images": 2,
                                      "spearman_at_full_randomization": {"at_most": 1.0}}},
    ])
    out, junit = tmp_path / "out", tmp_path / "junit.xml"
    res = runner.invoke(app, ["check", str(image_dir), "-e", str(rules), "-c", str(cfg), "--out", str(out),
                              "--junit", str(junit), "-q"])
    assert res.exit_code == 0, res.output
    assert "5 of 5 rules passed" in res.output
    assert len((out / "scores.jsonl").read_text().splitlines()) == 5
    sanity = json.loads((out / "sanity.json").read_text())
    assert len(sanity["images"]) == 2 and [s["step"] for s in sanity["steps"]] == [0, 1]
    report = json.loads((out / "check.json").read_text())
    assert report["passed"] and report["rules"][3]["measured"] == 5
    assert len(ET.parse(junit).getroot().find("testsuite")) == 5  # type: ignore[arg-type]
    # The same run checked again without recomputing: a bound it cannot meet fails with exit 1.
    strict = write_rules(tmp_path / "strict.yaml", [
        {"name": "certain", "metric": "target.prob", "aggregate": "min", "at_least": 1.01}])
    res = runner.invoke(app, ["check", "-e", str(strict), "--run", str(out)])
    assert res.exit_code == 1 and "0 of 1 rules passed" in res.output


def test_the_readme_example_parses() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("# expectations.yaml\n", 1)[1].split("```", 1)[0]
    exp = expectations_from_dict(yaml.safe_load(block))
    assert [r.kind for r in exp.rules] == ["predicted_in", "metric", "metric", "metric", "failed_images", "sanity",
                                           "run"]
    assert exp.rules[0].classes == ("Egyptian cat", "tabby", "tiger cat", 282)


# --------------------------------------------------------------------------------------------
# Each rule kind on its own: the exact parse errors, default names and measured details


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "a", "metric": "energy", "run": "x", "at_least": 0},
         "rules[0] (a): a rule checks exactly one of predicted_in, metric, failed_images, sanity, run; got metric, run"),
        ({"run": "counts.ok", "images": "a/*", "method": "gradcam", "at_least": 0},
         "rules[0].method: does not apply to a run rule"),
        ({"predicted_in": [1], "aggregate": "min"}, "rules[0].aggregate: does not apply to a predicted_in rule"),
        ({"run": "counts.ok", "images": "a/*", "at_least": 0}, "rules[0].images: does not apply to a run rule"),
        ({"sanity": {}, "at_least": 0}, "rules[0].at_least: does not apply to a sanity rule"),
        ({"metric": "energy", "images": ["a/*", " "], "at_least": 0}, "rules[0].images: empty glob"),
        ({"predicted_in": []}, "rules[0].predicted_in: give at least one class name or index"),
        ({"predicted_in": [1, -2]}, "rules[0].predicted_in: class index must be >= 0, got -2"),
        ({"predicted_in": [1], "at_least": 0.7, "at_most": 0.5}, "rules[0]: at_least 0.7 is above at_most 0.5"),
        ({"metric": "a..b", "at_least": 0},
         "rules[0].metric: expected a field name such as energy or target.prob, got 'a..b'"),
        ({"failed_images": {}}, "rules[0].failed_images: give at_least, at_most or both"),
        ({"failed_images": {"fraction": True, "at_most": 2}},
         "rules[0].failed_images.at_most: a fraction is at most 1, got 2.0"),
        ({"sanity": {"method": "gradcam", "ssim_at_full_randomization": {}}},
         "rules[0].sanity.ssim_at_full_randomization: give at_least, at_most or both"),
        ({"method": "layercam", "sanity": {"method": "gradcam", "ssim_at_full_randomization": {"at_most": 1}}},
         "rules[0].sanity.method: 'gradcam' differs from the rule's method 'layercam'"),
        ({"run": " ", "at_least": 0}, "rules[0].run: expected a dotted path into run.json such as counts.ok"),
    ],
)
def test_each_kind_parse_errors_name_the_key_path(rule: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        expectations_from_dict({"rules": [rule]})
    assert e.value.message == message
    if message.endswith("does not apply to a sanity rule"):
        assert e.value.hint == "put the bound inside it, e.g. failed_images: {at_most: 0}"


def test_each_kind_default_name_and_fields() -> None:
    exp = expectations_from_dict({"rules": [
        {"predicted_in": "tabby", "at_most": 0.5},
        {"metric": " metrics.energy ", "method": "gradcam", "aggregate": "max", "images": "cats/**", "at_least": 0},
        {"metric": "energy", "at_least": 0},
        {"failed_images": {"at_most": 0.5, "fraction": True}, "images": ["a/*", "b/*"]},
        {"method": "layercam", "images": "cats/**",
         "sanity": {"signed_spearman_at_full_randomization": {"at_most": 0.3}, "steps": 2, "max_images": 4}},
        {"run": " counts.ok ", "at_least": 1},
    ]}, default_method="gradcam")
    assert [(r.name, r.kind) for r in exp.rules] == [
        ("predicted in ['tabby']", "predicted_in"), ("max metrics.energy (gradcam)", "metric"),
        ("mean energy", "metric"), ("failed images", "failed_images"),
        ("sanity layercam signed_spearman_at_full_randomization", "sanity"), ("run.json counts.ok", "run")]
    p, m, m2, f, s, r = exp.rules
    assert p.classes == ("tabby",) and p.bounds == Bounds(None, 0.5)
    assert (m.metric, m.method, m.aggregate, m.images) == ("metrics.energy", "gradcam", "max", ("cats/**",))
    assert m2.method is None  # the config's default method is for sanity rules only
    assert f.fraction and f.images == ("a/*", "b/*") and f.bounds == Bounds(None, 0.5)
    assert s.sanity == SanitySpec("layercam", "spearman", 2, 4) and s.method == "layercam"
    assert s.sanity_key() == (2, 4, ("cats/**",)) and s.bounds == Bounds(None, 0.3)
    assert r.run_field == "counts.ok" and r.bounds == Bounds(1, None)


def test_each_kind_measured_detail() -> None:
    many_off = [record(f"x/{i}.png", (i, f"c{i}")) for i in range(5)]
    o = one({"name": "p", "predicted_in": [0]}, records=many_off)
    assert o.measured == pytest.approx(0.2) and o.n == 5
    assert o.detail == "1 of 5 images; not: x/1.png -> c1, x/2.png -> c2, x/3.png -> c3 (+1)"
    o = one({"name": "p", "predicted_in": [0], "images": "dogs/b*"})
    assert not o.passed and o.detail == "none of the 1 images matching dogs/b* was processed"
    o = one({"name": "m", "method": "gradcam", "metric": "energy", "images": ["cats/**", "dogs/c.png"], "at_least": 0})
    assert o.detail == "mean of 3 values, gradcam matching cats/**, dogs/c.png" and o.n == 3
    o = one({"name": "f", "images": "dogs/*", "failed_images": {"at_most": 0.4, "fraction": True}})
    assert (o.passed, o.measured, o.n, o.detail) == (False, 0.5, 2, "1 of 2 images matching dogs/* failed")
    o = one({"name": "f", "images": "birds/*", "failed_images": {"at_most": 0}})
    assert (o.passed, o.measured, o.detail) == (False, None, "no images matching birds/* in the run")
    o = one({"name": "r", "run": "counts.ok", "at_least": 0}, run=None)
    assert (o.measured, o.detail) == (None, "no run.json to read")
    o = one({"name": "r", "run": "timings", "at_least": 0})
    assert o.detail.startswith("run.json timings is dict {") and o.detail.endswith("}, not a number")
    o = one({"name": "r", "run": "countz.ok", "at_least": 0})
    assert o.detail == "run.json has no countz.ok (did you mean 'counts'?)"
    o = one({"name": "r", "run": "counts.failed", "at_most": 0})
    assert (o.passed, o.measured, o.n, o.detail) == (False, 1, 1, "run.json counts.failed")
    rep = {"images": ["a", "b", "c"], "steps": [{}, {}, {}],
           "methods": {"layercam": {"full_randomization": {"spearman_abs": 0.2, "spearman": -0.1, "ssim": 0.7}}}}
    rule = {"name": "s", "method": "layercam", "images": "cats/**",
            "sanity": {"steps": 2, "signed_spearman_at_full_randomization": {"at_most": -0.2}}}
    o = one(rule, sanity={(2, 16, ("cats/**",)): rep})
    assert (o.passed, o.measured, o.n) == (False, -0.1, 3)
    assert o.detail == "mean spearman of 3 images after 2 randomization step(s)"
    o = one(rule, sanity={(1, 16, ("cats/**",)): rep})
    assert (o.measured, o.detail) == (None, "no sanity result for layercam")
    assert o.to_dict() == {"name": "s", "kind": "sanity", "passed": False, "measured": None, "bound": "<= -0.2",
                           "at_least": None, "at_most": -0.2, "n": 0, "detail": "no sanity result for layercam"}


def test_metric_method_must_be_named_when_the_run_has_none_or_several() -> None:
    with pytest.raises(ConfigError) as e:
        one({"name": "w", "metric": "energy", "at_least": 0}, run=None)
    assert e.value.message == "rule 'w': the run has methods gradcam, layercam; say which with method:"
    only_gradcam = [{**r, "explanations": r["explanations"][:1]} for r in RECORDS[:3]]
    assert one({"name": "w", "metric": "energy", "at_least": 0}, records=only_gradcam, run=None).n == 3
    o = one({"name": "w", "method": "layercam", "metric": "energy", "at_least": 0}, records=only_gradcam, run=None)
    assert o.detail == "method layercam is not in the run (it has gradcam)"


def test_run_check_on_a_run_folder_reads_run_json_when_it_can(tmp_path: Path) -> None:
    from xaicli.check import run_check
    from xaicli.config import load_config

    cfg = load_config(None)
    run = write_run(tmp_path / "run")
    rules = write_rules(tmp_path / "e.yaml", [{"name": "ok", "run": "counts.ok", "at_least": 3},
                                              {"name": "f", "failed_images": {"at_most": 1}}])
    res = run_check(rules, cfg=cfg, run_dir=run)
    assert res.passed and res.run == RUN and len(res.records) == 4 and res.run_dir == run
    (run / "run.json").write_text("{not json")
    res = run_check(rules, cfg=cfg, run_dir=run, out=tmp_path / "out")
    assert res.run is None and [o.passed for o in res.outcomes] == [False, True]
    report = json.loads((tmp_path / "out" / "check.json").read_text())
    assert list(report) == ["passed", "run", "images", "failed_images", "seconds", "rules", "expectations"]
    assert (report["run"], report["images"], report["failed_images"]) == (str(run), 4, 1)
    assert report["rules"][0]["detail"] == "no run.json to read" and report["expectations"] == str(rules)
    # Class names are checked against the run's own model (its labels file), before any rule runs.
    labels = tmp_path / "labels.txt"
    labels.write_text("tabby\nEgyptian cat\n")
    model = {"source": "factory", "factory": "tests.nets:gap_net", "labels": str(labels)}
    (run / "run.json").write_text(json.dumps({**RUN, "n_classes": 2, "input": str(tmp_path / "gone"),
                                              "config": {"model": model}}))
    bad = write_rules(tmp_path / "bad.yaml", [{"name": "c", "predicted_in": ["tabbby"]}])
    with pytest.raises(ConfigError, match="unknown class name 'tabbby'") as e:
        run_check(bad, cfg=cfg, run_dir=run)
    assert e.value.hint == "did you mean 'tabby'?"
    bad = write_rules(tmp_path / "bad.yaml", [{"name": "c", "predicted_in": [2]}])
    with pytest.raises(ConfigError, match=r"class index 2 out of range \(the model has 2 classes\)"):
        run_check(bad, cfg=cfg, run_dir=run)
    sanity = write_rules(tmp_path / "s.yaml", [{"sanity": {"method": "gradcam", "ssim_at_full_randomization":
                                                          {"at_most": 1}}}])
    with pytest.raises(ConfigError, match="a sanity rule needs the images: give IMAGES with --run"):
        run_check(sanity, cfg=cfg, run_dir=run)
    unknown = write_rules(tmp_path / "u.yaml", [{"name": "u", "method": "gradcam", "metric": "enrgy", "at_least": 0}])
    with pytest.raises(ConfigError) as e:
        run_check(unknown, cfg=cfg, run_dir=run)
    assert e.value.message == f"{unknown}: rule 'u': unknown metric 'enrgy'"


def test_the_table_of_kinds_parses_and_measures_each_kind() -> None:
    from xaicli.check import KINDS, RULE_KINDS
    from xaicli.check.rules import SHARED_KEYS

    minimal = {
        "predicted_in": {"predicted_in": [281]},
        "metric": {"method": "gradcam", "metric": "energy", "at_least": 0},
        "failed_images": {"failed_images": {"at_most": 1}},
        "sanity": {"sanity": {"spearman_at_full_randomization": {"at_most": 0.5}}},
        "run": {"run": "counts.ok", "at_least": 3},
    }
    assert KINDS == tuple(RULE_KINDS) == tuple(minimal)
    assert all(set(k.keys) <= set(SHARED_KEYS) for k in RULE_KINDS.values())
    exp = expectations_from_dict({"rules": list(minimal.values())}, default_method="gradcam")
    assert [r.kind for r in exp.rules] == list(KINDS)
    rep = {"images": ["a"], "steps": [{}, {}], "methods": {"gradcam": {"full_randomization": {"spearman_abs": 0.1}}}}
    outcomes = evaluate(exp, RECORDS, RUN, {exp.rules[3].sanity_key(): rep})
    assert [(o.rule.kind, o.passed, o.measured) for o in outcomes] == [
        ("predicted_in", False, pytest.approx(1 / 3)), ("metric", True, pytest.approx(2 / 3)),
        ("failed_images", True, 1), ("sanity", True, 0.1), ("run", True, 3)]
