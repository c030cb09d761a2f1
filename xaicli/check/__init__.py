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
  model-parameter randomisation test (:mod:`xaicli.sanity`), run for the check;
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
table that pairs them (a new kind: its key in the schema, a parse and a measure function, one
entry in the table); :mod:`.report` writes JUnit XML and the
rich table; this module runs the whole check (:func:`run_check`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, build_dataclass
from ..errors import ConfigError, InputError
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
    """The model section of a run.json's config, when it is a valid one."""
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
    """What `xai check` found: the outcome of every rule, and the run it read."""

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
    import time

    from ..outputs import write_json
    from ..plan import resolve_plan

    t0 = time.perf_counter()
    cfg = resolve_plan(cfg).cfg  # canonical method names
    default_method = cfg.method[0] if len(cfg.method) == 1 else None
    exp = load_expectations(expect, default_method)
    if run_dir is None and images is None:
        raise ConfigError("give IMAGES to explain, or --run DIR to check an existing run")
    if run_dir is not None:
        records, run = _read_run_dir(run_dir)
        model = model_of_run(run) if run else None
        check_classes(exp, labels_for(model) if model else None, (run or {}).get("n_classes"))
    else:
        assert images is not None
        check_classes(exp, labels_for(cfg.model))
        records, run = _explain(cfg, images, out, progress=progress, overwrite=overwrite, argv=argv)
        check_classes(exp, None, run.get("n_classes"))
    sanity: dict[Any, dict[str, Any]] = {}
    groups = _sanity_groups(exp)
    if groups:
        recorded = (run or {}).get("input")
        source = images if images is not None else (Path(recorded) if recorded else None)
        sanity = _run_sanity(groups, cfg, source, out, sanity_progress)
    try:
        outcomes = evaluate(exp, records, run, sanity)
    except ConfigError as e:
        raise ConfigError(f"{expect}: {e.message}", e.hint) from None
    res = CheckResult(outcomes, run_dir if run_dir is not None else out, run, records, sanity,
                      time.perf_counter() - t0)
    if out is not None:
        write_json(out / "check.json", {**res.to_dict(), "expectations": str(expect)})
    return res


def _read_run_dir(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The scores.jsonl records and the run.json of an existing run folder (None when run.json is
    absent or unreadable)."""
    from ..outputs import SCORES
    from ..records import is_run_folder, read_run

    if not is_run_folder(run_dir):
        raise InputError(f"--run {run_dir}: no {SCORES} there", "point --run at the --out folder of `xai explain`")
    folder = read_run(run_dir)
    return folder.records, folder.run


def _explain(cfg: Any, images: Path, out: Path | None, *, progress: Any, overwrite: bool,
             argv: list[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`xai explain` of ``images`` into ``out`` (a temporary folder, removed after, when None):
    its scores.jsonl records and run.json."""
    import contextlib
    import tempfile

    from ..outputs import SCORES, read_scores
    from ..run import run_explain

    with contextlib.ExitStack() as temporary:
        where = out if out is not None else Path(temporary.enter_context(
            tempfile.TemporaryDirectory(prefix="xai-check-")))
        result = run_explain(cfg, images, where, progress=progress, overwrite=overwrite, argv=argv)
        return read_scores(where / SCORES), result.run


def _sanity_groups(exp: Expectations) -> dict[tuple[int, int, tuple[str, ...]], list[str]]:
    """The sanity cascades the rules need: their methods by :meth:`Rule.sanity_key`, in rule order."""
    groups: dict[tuple[int, int, tuple[str, ...]], list[str]] = {}
    for r in exp.rules:
        if r.sanity is not None:
            methods = groups.setdefault(r.sanity_key(), [])
            if r.sanity.method not in methods:
                methods.append(r.sanity.method)
    return groups


def _run_sanity(groups: Mapping[tuple[int, int, tuple[str, ...]], list[str]], cfg: Any, source: Path | None,
                out: Path | None, progress: Callable[[], Any] | None) -> dict[Any, dict[str, Any]]:
    """One sanity cascade per group on the images in ``source``; each report also written to
    ``out`` (sanity.json, sanity-2.json, ...)."""
    from ..config import apply_overrides
    from ..outputs import write_json
    from ..sanity import run_sanity

    if source is None or not source.exists():
        raise ConfigError("a sanity rule needs the images: give IMAGES with --run")
    reports: dict[Any, dict[str, Any]] = {}
    for i, (key, methods) in enumerate(groups.items()):
        steps, max_images, globs = key
        sub = apply_overrides(cfg, method=",".join(methods))
        rep = run_sanity(sub, source, steps=steps, max_images=max_images, select=selector(globs),
                         progress=progress() if progress else None).report
        reports[key] = rep
        if out is not None:
            write_json(out / ("sanity.json" if i == 0 else f"sanity-{i + 1}.json"), rep)
    return reports
