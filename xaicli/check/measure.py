"""Evaluation of `xai check` rules: one number measured over a run's scores.jsonl records,
run.json or sanity reports, compared with the rule's bounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, suggest
from .rules import Expectations, Rule, selector

# Per-explanation fields every run writes (docs/architecture.md, scores.jsonl); with the keys the
# registered metrics return, the names a rule may use even when the run at hand lacks them.
RECORD_FIELDS = ("path", "status", "width", "height", "topk")
ENTRY_FIELDS = ("method", "layer", "target", "map", "files", "metrics")


@dataclass(frozen=True)
class Outcome:
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



_MISSING = object()


def _walk(obj: Any, parts: Sequence[str]) -> Any:
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
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


def _aggregate(values: list[float], how: str) -> float:
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
    names: list[str] = []
    for m in (run or {}).get("methods") or []:
        if isinstance(m, Mapping) and m.get("name") not in names:
            names.append(m["name"])
    for r in records:
        for e in r.get("explanations") or []:
            if e.get("method") not in names:
                names.append(e.get("method"))
    return names



def evaluate(
    exp: Expectations,
    records: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any] | None = None,
    sanity: Mapping[tuple[int, int, tuple[str, ...]], Mapping[str, Any]] | None = None,
) -> list[Outcome]:
    """Every rule against a run's scores.jsonl records (and run.json, and the sanity reports by
    :meth:`Rule.sanity_key`). Raises ConfigError for names that are unknown (see module doc)."""
    methods = run_methods(records, run)
    vocabulary = known_metric_names(records)
    outcomes = []
    for rule in exp.rules:
        outcomes.append(_evaluate(rule, records, run, sanity or {}, methods, vocabulary))
    return outcomes


def _evaluate(rule: Rule, records: Sequence[Mapping[str, Any]], run: Mapping[str, Any] | None,
              sanity: Mapping[Any, Mapping[str, Any]], methods: list[str], vocabulary: set[str]) -> Outcome:
    b = rule.bounds

    def measured(v: float, detail: str, n: int) -> Outcome:
        return Outcome(rule, b.holds(v), v, detail, n)

    def missing(detail: str) -> Outcome:
        return Outcome(rule, False, None, detail)

    if rule.kind == "run":
        assert rule.run_field is not None
        if run is None:
            return missing("no run.json to read")
        v = _walk(run, rule.run_field.split("."))
        if v is _MISSING:
            top = sorted(run) if isinstance(run, Mapping) else []
            return missing(f"run.json has no {rule.run_field} ({suggest(rule.run_field.split('.')[0], top)})")
        num = _number(v)
        if num is None:
            return missing(f"run.json {rule.run_field} is {type(v).__name__} {v!r}, not a number")
        return measured(num, f"run.json {rule.run_field}", 1)

    if rule.kind == "sanity":
        assert rule.sanity is not None
        rep = sanity.get(rule.sanity_key())
        m = (rep or {}).get("methods", {}).get(rule.sanity.method)
        if m is None:
            return missing(f"no sanity result for {rule.sanity.method}")
        v = m["full_randomization"][rule.sanity.measure]
        n = len(rep.get("images") or []) if rep else 0
        steps = len(rep.get("steps") or []) - 1 if rep else 0
        return measured(float(v), f"mean {rule.sanity.measure} of {n} images after {steps} randomization step(s)", n)

    keep = selector(rule.images)
    chosen = [r for r in records if keep(str(r.get("path", "")))]
    where = f" matching {', '.join(rule.images)}" if rule.images else ""
    if not chosen:
        return missing(f"no images{where} in the run")

    if rule.kind == "failed_images":
        bad = sum(1 for r in chosen if r.get("status") != "ok")
        if rule.fraction:
            return measured(bad / len(chosen), f"{bad} of {len(chosen)} images{where} failed", len(chosen))
        return measured(float(bad), f"{bad} of {len(chosen)} images{where} failed", len(chosen))

    ok = [r for r in chosen if r.get("status") == "ok"]
    if not ok:
        return missing(f"none of the {len(chosen)} images{where} was processed")

    if rule.kind == "predicted_in":
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
        return measured(hits / len(ok), detail, len(ok))

    # metric
    assert rule.metric is not None
    method = rule.method
    if method is None:
        if len(methods) != 1:
            raise ConfigError(f"rule {rule.name!r}: the run has methods {', '.join(methods) or '(none)'}; "
                              "say which with method:")
        method = methods[0]
    if method not in methods:
        return missing(f"method {method} is not in the run (it has {', '.join(methods) or 'none'})")
    path = rule.metric.removeprefix("metrics.")
    values: list[float] = []
    kinds: set[str] = set()
    for r in ok:
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
    if kinds and not values:
        raise ConfigError(f"rule {rule.name!r}: metric {rule.metric!r} is a {'/'.join(sorted(kinds))}, not a number",
                          "point at one number inside it, e.g. box_iou.0")
    if not values:
        head = path.split(".")[0]
        if head not in vocabulary:
            raise ConfigError(f"rule {rule.name!r}: unknown metric {rule.metric!r}",
                              suggest(head, sorted(vocabulary | set(_present_fields(records, method)))))
        present = _present_fields(records, method)
        return missing(f"{rule.metric} is absent for {method}{where}: switch on the metric that computes it "
                       f"(metrics: in the config or --metrics); present: {', '.join(present) or 'none'}")
    v = _aggregate(values, rule.aggregate)
    n_expl = sum(1 for r in ok for e in r.get("explanations") or [] if e.get("method") == method)
    note = f" ({n_expl - len(values)} without a value)" if len(values) < n_expl else ""
    return measured(v, f"{rule.aggregate} of {len(values)} values, {method}{where}{note}", len(values))
