"""`xai check`: expectations over a run's scores, for CI pipelines.

An expectations file (YAML) holds ``rules``. Each rule measures one number over the run and
compares it with ``at_least`` / ``at_most``; a rule passes when every bound holds. Kinds, one per
rule (see README "CI gates with xai check"):

* ``predicted_in: [names or indices]`` - the fraction of the selected images whose top-1
  prediction is one of the classes (default bound ``at_least: 1.0``);
* ``metric: NAME`` (+ ``method``, ``aggregate``) - a per-explanation number of scores.jsonl:
  ``explanations[].metrics.NAME`` first, then the explanation's own fields (``target.prob``,
  ``map.max``, method extras), then the image record's (``topk.0.prob``); dotted paths and list
  indices (``box_iou.0``) reach inside; aggregated by mean, median, min, max or fraction_true;
* ``failed_images: {at_most: 0}`` - images that could not be processed (count, or ``fraction: true``);
* ``sanity: {method: gradcam, spearman_at_full_randomization: {at_most: 0.5}}`` - the
  model-parameter randomisation test (:mod:`xaicli.metrics.sanity`), run for the check;
* ``run: DOTTED.PATH`` - a number of run.json (``counts.ok``, ``timings.images_per_s``,
  ``aggregates.gradcam.target_prob.mean``).

``images`` (a glob or a list of globs over scores.jsonl paths; ``**`` crosses folders, ``*`` does
not) narrows any per-image rule.

Missing versus unknown: whatever a rule needs that the run lacks - a metric that was not switched
on, a method that was not run, images that match no glob, a run.json field - makes the rule
FAIL with a message saying what is missing (a gate never passes on nothing). A name xaicli does
not know at all - an unknown key, method or class name, or a metric name that is neither a known
scores field nor present in the run - is a usage error (exit 2) with the close matches.

Layout: :mod:`.rules` reads the expectations file (the YAML schema, one parse function per kind,
globs); :mod:`.measure` holds one measure function per kind and :data:`~.measure.RULE_KINDS`, the
table that pairs them (a new kind is one entry there); :mod:`.report` writes JUnit XML and the
rich table; this module runs the whole check (:func:`run_check`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, build_dataclass
from ..errors import ConfigError
from .measure import (
    ENTRY_FIELDS,
    KINDS,
    RECORD_FIELDS,
    RULE_KINDS,
    Missing,
    Outcome,
    RuleKind,
    evaluate,
    known_metric_names,
    lookup,
    run_methods,
)
from .report import junit_xml, table
from .rules import (
    SANITY_MEASURES,
    Aggregate,
    Bounds,
    Expectations,
    Rule,
    SanitySpec,
    check_classes,
    expectations_from_dict,
    glob_regex,
    load_expectations,
    parse_rule,
    selector,
)

__all__ = [
    "ENTRY_FIELDS", "KINDS", "RECORD_FIELDS", "RULE_KINDS", "SANITY_MEASURES", "Aggregate", "Bounds", "CheckResult",
    "Expectations", "Missing", "Outcome", "Rule", "RuleKind", "SanitySpec", "check_classes", "evaluate",
    "expectations_from_dict", "glob_regex", "junit_xml", "known_metric_names", "labels_for", "load_expectations",
    "lookup", "model_of_run", "parse_rule", "run_check", "run_methods", "selector", "table",
]


def labels_for(model: ModelConfig) -> list[str] | None:
    """The model's class names without building it: a labels file, or torchvision weights' meta."""
    from ..models import load_labels

    if model.labels is not None:
        return load_labels(model.labels)
    if model.source == "torchvision" and model.name and model.weights and "/" not in model.weights:
        try:
            import torchvision.models as tvm

            return list(tvm.get_model_weights(model.name)[model.weights].meta["categories"])
        except (KeyError, ValueError, AttributeError):
            return None
    return None


def model_of_run(run: Mapping[str, Any]) -> ModelConfig | None:
    m = (run.get("config") or {}).get("model")
    if not isinstance(m, Mapping):
        return None
    try:
        return build_dataclass(ModelConfig, m, "model")
    except ConfigError:
        return None


# --------------------------------------------------------------------------------------------
# The whole check behind `xai check`


@dataclass
class CheckResult:
    outcomes: list[Outcome]
    run_dir: Path | None
    run: dict[str, Any] | None
    records: list[dict[str, Any]]
    sanity: dict[Any, dict[str, Any]]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        failed = [r for r in self.records if r.get("status") != "ok"]
        return {"passed": self.passed, "run": str(self.run_dir) if self.run_dir else None,
                "images": len(self.records), "failed_images": len(failed), "seconds": round(self.seconds, 3),
                "rules": [o.to_dict() for o in self.outcomes]}


def run_check(
    expect: Path,
    *,
    cfg: Any,
    images: Path | None = None,
    out: Path | None = None,
    run_dir: Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
    sanity_progress: Callable[[], Any] | None = None,
    argv: list[str] | None = None,
) -> CheckResult:
    """Explain ``images`` with ``cfg`` into ``out`` (a temporary folder when None), or read the
    existing run in ``run_dir``; run the sanity test where a rule needs it; evaluate the rules.
    With ``out``, check.json (and sanity.json) are written there."""
    import json
    import tempfile
    import time

    from ..errors import InputError
    from ..outputs import RUN, SCORES, read_scores, write_json

    t0 = time.perf_counter()
    default_method = cfg.method[0] if len(cfg.method) == 1 else None
    exp = load_expectations(expect, default_method)
    if run_dir is None and images is None:
        raise ConfigError("give IMAGES to explain, or --run DIR to check an existing run")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if run_dir is not None:
            if not (run_dir / SCORES).is_file():
                raise InputError(f"--run {run_dir}: no {SCORES} there", "point --run at the --out folder of `xai explain`")
            records = read_scores(run_dir / SCORES)
            try:
                run = json.loads((run_dir / RUN).read_text(encoding="utf-8")) if (run_dir / RUN).is_file() else None
            except (OSError, ValueError):
                run = None
            model = model_of_run(run) if run else None
            check_classes(exp, labels_for(model) if model else None, (run or {}).get("n_classes"))
            where = run_dir
        else:
            assert images is not None
            from ..engine import run_explain

            check_classes(exp, labels_for(cfg.model))
            if out is None:
                tmp = tempfile.TemporaryDirectory(prefix="xai-check-")
                where = Path(tmp.name)
            else:
                where = out
            result = run_explain(cfg, images, where, progress=progress, overwrite=overwrite, argv=argv)
            records, run = read_scores(where / SCORES), result.run
            check_classes(exp, None, run.get("n_classes"))
        sanity_reports: dict[Any, dict[str, Any]] = {}
        groups: dict[Any, list[str]] = {}
        for r in exp.rules:
            if r.sanity is not None:
                groups.setdefault(r.sanity_key(), [])
                if r.sanity.method not in groups[r.sanity_key()]:
                    groups[r.sanity_key()].append(r.sanity.method)
        if groups:
            from ..metrics.sanity import run_sanity

            source = images if images is not None else Path(str((run or {}).get("input") or ""))
            if not str(source) or not source.exists():
                raise ConfigError("a sanity rule needs the images: give IMAGES with --run")
            for i, (key, methods) in enumerate(groups.items()):
                steps, max_images, globs = key
                sub = dataclasses.replace(cfg, method=tuple(methods))
                rep = run_sanity(sub, source, steps=steps, max_images=max_images, select=selector(globs),
                                 progress=sanity_progress() if sanity_progress else None).report
                sanity_reports[key] = rep
                if out is not None:
                    write_json(out / ("sanity.json" if i == 0 else f"sanity-{i + 1}.json"), rep)
        try:
            outcomes = evaluate(exp, records, run, sanity_reports)
        except ConfigError as e:
            raise ConfigError(f"{expect}: {e.message}", e.hint) from None
        res = CheckResult(outcomes, run_dir if run_dir is not None else out, run, records, sanity_reports,
                          time.perf_counter() - t0)
        if out is not None:
            write_json(out / "check.json", {**res.to_dict(), "expectations": str(expect)})
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()
