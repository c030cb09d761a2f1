"""Evaluation of `xai check` rules: one measure function per rule kind, and the table of kinds
(:data:`RULE_KINDS`) that pairs it with the kind's parse function in :mod:`.rules`.

A measure function reads a run's scores.jsonl records, run.json or sanity reports and returns
one number with how it was measured; it raises :class:`Missing` when the run lacks what the rule
needs (the rule FAILs) and ConfigError for a name that is not known at all (a usage error)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import ConfigError, suggest
from ..records import ENTRY_FIELDS as _ENTRY
from ..records import RECORD_FIELDS as _RECORD
from .rules import (
    Expectations,
    Rule,
    RuleInput,
    parse_failed_images,
    parse_metric,
    parse_predicted_in,
    parse_run,
    parse_sanity,
    selector,
)

# Image-record and explanation fields every run writes (xaicli/records.py); with the keys the
# registered metrics return, the names a rule may use even when the run at hand lacks them.
RECORD_FIELDS = tuple(f for f in _RECORD if f not in ("error", "explanations"))  # the measurable ones
ENTRY_FIELDS = _ENTRY


@dataclass(frozen=True)
class Outcome:
    """A rule's result: PASS/FAIL, the measured number (None when the run lacks it) and how."""

    rule: Rule
    passed: bool
    measured: float | None
    detail: str  # how it was measured, or what is missing
    n: int = 0  # images (or values) the measurement covers

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.rule.name, "kind": self.rule.kind, "passed": self.passed,
                "measured": self.measured, "bound": self.rule.bounds.describe(),
                "at_least": self.rule.bounds.at_least, "at_most": self.rule.bounds.at_most,
                "n": self.n, "detail": self.detail}


class Measurement(NamedTuple):
    """What a measure function returns: the number, how it was measured, what it covers."""

    value: float
    detail: str
    n: int  # images (or values) the measurement covers


class Missing(Exception):
    """The run lacks what a rule needs; the rule FAILs with this message (never passes on nothing)."""


@dataclass(frozen=True)
class RunData:
    """What rules are measured against, with what :func:`evaluate` derives from it once."""

    records: Sequence[Mapping[str, Any]]  # scores.jsonl
    run: Mapping[str, Any] | None  # run.json; None when there is none
    sanity: Mapping[tuple[int, int, tuple[str, ...]], Mapping[str, Any]]  # reports by Rule.sanity_key
    methods: list[str]  # run_methods
    vocabulary: set[str]  # known_metric_names


_MISSING = object()


def _walk(obj: Any, parts: Sequence[str]) -> Any:
    """The value at a dotted path's parts (mapping keys, list indices), or _MISSING."""
    for p in parts:
        if isinstance(obj, Mapping) and p in obj:
            obj = obj[p]
        elif isinstance(obj, list) and p.lstrip("-").isdigit() and -len(obj) <= int(p) < len(obj):
            obj = obj[int(p)]
        else:
            return _MISSING
    return obj


def lookup(record: Mapping[str, Any], entry: Mapping[str, Any], path: str) -> Any:
    """A field of an explanation: under ``metrics`` first, then the entry's own, then the record's."""
    parts = path.split(".")
    for base in (entry.get("metrics") or {}, entry, record):
        v = _walk(base, parts)
        if v is not _MISSING:
            return v
    return _MISSING


def _number(v: Any) -> float | None:
    """A bool or finite int/float as a float; None for anything else (NaN and inf included)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


def _aggregate(values: list[float], how: str) -> float:
    """mean, median, min, max, or fraction_true (the fraction of values that are not 0)."""
    if how == "mean":
        return sum(values) / len(values)
    if how == "median":
        return float(statistics.median(values))
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    return sum(1 for v in values if v != 0) / len(values)


def known_metric_names(records: Sequence[Mapping[str, Any]]) -> set[str]:
    """First parts of field names a rule may use: xaicli's fields, the metric keys, registered
    metric names and whatever this run's explanations carry."""
    from ..metrics import all_metrics

    names = {*RECORD_FIELDS, *ENTRY_FIELDS, *(k for m in all_metrics() for k in (m.name, *m.outputs))}
    for r in records:
        names.update(r)
        for e in r.get("explanations") or []:
            names.update(e)
            names.update(e.get("metrics") or {})
    return names


def _present_fields(records: Sequence[Mapping[str, Any]], method: str) -> list[str]:
    """The numeric fields the method's explanations carry, for messages about an absent metric."""
    out: set[str] = set()
    for r in records:
        for e in r.get("explanations") or []:
            if e.get("method") != method:
                continue
            out.update(k for k, v in (e.get("metrics") or {}).items() if _number(v) is not None)
            out.update(k for k, v in e.items() if _number(v) is not None)
            out.update(f"{k}.{s}" for k in ("target", "map") for s, v in (e.get(k) or {}).items()
                       if _number(v) is not None)
    return sorted(out)


def run_methods(records: Sequence[Mapping[str, Any]], run: Mapping[str, Any] | None = None) -> list[str]:
    """The run's methods in order: run.json's, then any other the records' explanations name."""
    names: list[str] = []
    for m in (run or {}).get("methods") or []:
        if isinstance(m, Mapping) and m.get("name") not in names:
            names.append(m["name"])
    for r in records:
        for e in r.get("explanations") or []:
            if e.get("method") not in names:
                names.append(e.get("method"))
    return names


# --------------------------------------------------------------------------------------------
# One measure function per kind


def _selected(rule: Rule, records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str]:
    """The records the rule's globs select, and " matching GLOBS" for its details."""
    keep = selector(rule.images)
    chosen = [r for r in records if keep(str(r.get("path", "")))]
    where = f" matching {', '.join(rule.images)}" if rule.images else ""
    if not chosen:
        raise Missing(f"no images{where} in the run")
    return chosen, where


def _processed(rule: Rule, records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str]:
    """The selected records whose image was processed, and " matching GLOBS"."""
    chosen, where = _selected(rule, records)
    ok = [r for r in chosen if r.get("status") == "ok"]
    if not ok:
        raise Missing(f"none of the {len(chosen)} images{where} was processed")
    return ok, where


def measure_predicted_in(rule: Rule, data: RunData) -> Measurement:
    """The fraction of processed images whose top-1 class is one of the rule's (names ignore case)."""
    ok, where = _processed(rule, data.records)
    want_idx = {c for c in rule.classes if isinstance(c, int)}
    want_lab = {c.lower() for c in rule.classes if isinstance(c, str)}
    hits, off = 0, []
    for r in ok:
        top = (r.get("topk") or [{}])[0]
        if top.get("index") in want_idx or str(top.get("label", "")).lower() in want_lab:
            hits += 1
        else:
            off.append(f"{r['path']} -> {top.get('label', top.get('index'))}")
    detail = f"{hits} of {len(ok)} images{where}"
    if off:
        detail += "; not: " + ", ".join(off[:3]) + (f" (+{len(off) - 3})" if len(off) > 3 else "")
    return Measurement(hits / len(ok), detail, len(ok))


def measure_metric(rule: Rule, data: RunData) -> Measurement:
    """A per-explanation number of one method (see :func:`lookup`), aggregated over the processed
    images; explanations without it are counted in the detail."""
    assert rule.metric is not None
    ok, where = _processed(rule, data.records)
    method = _metric_method(rule, data.methods)
    values, kinds = _metric_values(ok, method, rule.metric.removeprefix("metrics."))
    if not values:
        raise _no_values(rule, data, method, kinds, where)
    v = _aggregate(values, rule.aggregate)
    n_expl = sum(1 for r in ok for e in r.get("explanations") or [] if e.get("method") == method)
    note = f" ({n_expl - len(values)} without a value)" if len(values) < n_expl else ""
    return Measurement(v, f"{rule.aggregate} of {len(values)} values, {method}{where}{note}", len(values))


def _metric_method(rule: Rule, methods: list[str]) -> str:
    """The method a metric rule reads: its own, or the run's only one."""
    method = rule.method
    if method is None:
        if len(methods) != 1:
            raise ConfigError(f"rule {rule.name!r}: the run has methods {', '.join(methods) or '(none)'}; "
                              "say which with method:")
        method = methods[0]
    if method not in methods:
        raise Missing(f"method {method} is not in the run (it has {', '.join(methods) or 'none'})")
    return method


def _metric_values(records: Sequence[Mapping[str, Any]], method: str, path: str) -> tuple[list[float], set[str]]:
    """The numbers at ``path`` in the method's explanations (null left out), and the type names
    of the values there that are not finite numbers."""
    values: list[float] = []
    kinds: set[str] = set()
    for r in records:
        for e in r.get("explanations") or []:
            if e.get("method") != method:
                continue
            v = lookup(r, e, path)
            if v is _MISSING or v is None:
                continue
            num = _number(v)
            if num is None:
                kinds.add(type(v).__name__)
                continue
            values.append(num)
    return values, kinds


def _no_values(rule: Rule, data: RunData, method: str, kinds: set[str], where: str) -> Exception:
    """Why a metric rule found no number: a usage error when the name holds no number or is not
    known at all, else Missing: a metric that was not switched on (saying which to switch on), or
    one that is there but null everywhere."""
    assert rule.metric is not None
    if kinds:
        return ConfigError(f"rule {rule.name!r}: metric {rule.metric!r} is a {'/'.join(sorted(kinds))}, not a number",
                           "point at one number inside it, e.g. box_iou.0")
    head = rule.metric.removeprefix("metrics.").split(".")[0]
    if head not in data.vocabulary:
        return ConfigError(f"rule {rule.name!r}: unknown metric {rule.metric!r}",
                           suggest(head, sorted(data.vocabulary | set(_present_fields(data.records, method)))))
    present = f"; present: {', '.join(_present_fields(data.records, method)) or 'none'}"
    nulls = sum(1 for r in data.records for e in r.get("explanations") or []
                if e.get("method") == method and head in (e.get("metrics") or {}))
    if nulls:
        return Missing(f"metric {rule.metric} has no value for {method}{where}: null in all {nulls} explanations "
                       "(no ground truth for these images?)")
    spec = _metric_writing(head)
    if spec is None:
        return Missing(f"{rule.metric} is absent for {method}{where}{present}")
    switch = f"add `--metrics {spec.name}`"
    if spec.ground_truth:
        switch += " with `--ground-truth PATH`"
    return Missing(f"metric {rule.metric} is not in the run: {switch} (or `metrics: [{spec.name}]` in the config)"
                   f"{present}")


def _metric_writing(key: str) -> Any:
    """The registered metric that writes ``key`` (by name or output key), or None."""
    from ..metrics import all_metrics

    return next((m for m in all_metrics() if key == m.name or key in m.outputs), None)


def measure_failed_images(rule: Rule, data: RunData) -> Measurement:
    """The selected images that could not be processed: a count, or a fraction."""
    chosen, where = _selected(rule, data.records)
    bad = sum(1 for r in chosen if r.get("status") != "ok")
    value = bad / len(chosen) if rule.fraction else float(bad)
    return Measurement(value, f"{bad} of {len(chosen)} images{where} failed", len(chosen))


def measure_sanity(rule: Rule, data: RunData) -> Measurement:
    """The sanity report's mean similarity at full randomisation, for the rule's method and measure."""
    spec = rule.sanity
    assert spec is not None
    rep = data.sanity.get(rule.sanity_key())
    m = (rep or {}).get("methods", {}).get(spec.method)
    if m is None:
        raise Missing(f"no sanity result for {spec.method}")
    v = m["full_randomization"][spec.measure]
    n = len(rep.get("images") or []) if rep else 0
    steps = len(rep.get("steps") or []) - 1 if rep else 0
    return Measurement(float(v), f"mean {spec.measure} of {n} images after {steps} randomization step(s)", n)


def measure_run(rule: Rule, data: RunData) -> Measurement:
    """The number at a dotted path of run.json."""
    assert rule.run_field is not None
    if data.run is None:
        raise Missing("no run.json to read")
    v = _walk(data.run, rule.run_field.split("."))
    if v is _MISSING:
        top = sorted(data.run) if isinstance(data.run, Mapping) else []
        raise Missing(f"run.json has no {rule.run_field} ({suggest(rule.run_field.split('.')[0], top)})")
    num = _number(v)
    if num is None:
        raise Missing(f"run.json {rule.run_field} is {type(v).__name__} {v!r}, not a number")
    return Measurement(num, f"run.json {rule.run_field}", 1)


# --------------------------------------------------------------------------------------------
# The table of kinds


@dataclass(frozen=True)
class RuleKind:
    """One kind of rule: which of rules.SHARED_KEYS it takes, how its YAML becomes a Rule, and
    how a run is measured for it."""

    keys: tuple[str, ...]
    parse: Callable[[RuleInput], Rule]
    measure: Callable[[Rule, RunData], Measurement]


# In the order error messages list them. A rule has exactly one of these keys.
RULE_KINDS: dict[str, RuleKind] = {
    "predicted_in": RuleKind(("images", "at_least", "at_most"), parse_predicted_in, measure_predicted_in),
    "metric": RuleKind(("method", "aggregate", "images", "at_least", "at_most"), parse_metric, measure_metric),
    "failed_images": RuleKind(("images",), parse_failed_images, measure_failed_images),
    "sanity": RuleKind(("method", "images"), parse_sanity, measure_sanity),
    "run": RuleKind(("at_least", "at_most"), parse_run, measure_run),
}
KINDS: tuple[str, ...] = tuple(RULE_KINDS)


def measure_rule(rule: Rule, data: RunData) -> Outcome:
    """One rule through its kind's measure function, against its bounds."""
    try:
        m = RULE_KINDS[rule.kind].measure(rule, data)
    except Missing as e:
        return Outcome(rule, False, None, str(e))
    return Outcome(rule, rule.bounds.holds(m.value), m.value, m.detail, m.n)


def evaluate(
    exp: Expectations,
    records: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any] | None = None,
    sanity: Mapping[tuple[int, int, tuple[str, ...]], Mapping[str, Any]] | None = None,
) -> list[Outcome]:
    """Every rule against a run's scores.jsonl records (and run.json, and the sanity reports by
    :meth:`Rule.sanity_key`). Raises ConfigError for names that are unknown (see package doc)."""
    data = RunData(records, run, sanity or {}, run_methods(records, run), known_metric_names(records))
    return [measure_rule(rule, data) for rule in exp.rules]
