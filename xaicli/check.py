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
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ModelConfig, build_dataclass, non_negative, positive
from .errors import ConfigError, suggest

Aggregate = Literal["mean", "median", "min", "max", "fraction_true"]
Kind = Literal["predicted_in", "metric", "failed_images", "sanity", "run"]
KINDS: tuple[str, ...] = ("predicted_in", "metric", "failed_images", "sanity", "run")

# Per-explanation fields every run writes (docs/architecture.md, scores.jsonl); with the keys the
# registered metrics return, the names a rule may use even when the run at hand lacks them.
RECORD_FIELDS = ("path", "status", "width", "height", "topk")
ENTRY_FIELDS = ("method", "layer", "target", "map", "files", "metrics")
SANITY_MEASURES = {
    "spearman_at_full_randomization": "spearman_abs",
    "signed_spearman_at_full_randomization": "spearman",
    "ssim_at_full_randomization": "ssim",
}


# --------------------------------------------------------------------------------------------
# The expectations file


@dataclass(frozen=True)
class Bounds:
    at_least: float | None = None
    at_most: float | None = None

    def holds(self, v: float) -> bool:
        return (self.at_least is None or v >= self.at_least) and (self.at_most is None or v <= self.at_most)

    def describe(self) -> str:
        lo, hi = self.at_least, self.at_most
        if lo is not None and hi is not None:
            return f"{_fmt(lo)} <= x <= {_fmt(hi)}"
        return f">= {_fmt(lo)}" if lo is not None else f"<= {_fmt(hi)}"


@dataclass(frozen=True)
class SanitySpec:
    """What a sanity rule runs; rules with equal (steps, max_images, images) share one cascade."""

    method: str
    measure: str  # spearman_abs | spearman | ssim, at full randomisation
    steps: int = 1
    max_images: int = 16


@dataclass(frozen=True)
class Rule:
    name: str
    kind: Kind
    bounds: Bounds
    images: tuple[str, ...] = ()
    method: str | None = None
    classes: tuple[int | str, ...] = ()
    metric: str | None = None
    aggregate: Aggregate = "mean"
    fraction: bool = False  # failed_images: the fraction of the selected images, not the count
    sanity: SanitySpec | None = None
    run_field: str | None = None

    def sanity_key(self) -> tuple[int, int, tuple[str, ...]]:
        assert self.sanity is not None
        return (self.sanity.steps, self.sanity.max_images, self.images)


@dataclass(frozen=True)
class Expectations:
    rules: tuple[Rule, ...]
    source: str | None = None


# The YAML as written, validated key by key by config.build_dataclass.


@dataclass(frozen=True)
class _FileFields:
    rules: tuple[Any, ...] = ()
    version: int = 1


@dataclass(frozen=True)
class _RuleFields:
    name: str | None = None
    images: str | tuple[str, ...] | None = None
    method: str | None = None
    predicted_in: int | str | tuple[int | str, ...] | None = None
    metric: str | None = None
    aggregate: Aggregate = "mean"
    failed_images: dict[str, Any] | None = None
    sanity: dict[str, Any] | None = None
    run: str | None = None
    at_least: float | None = None
    at_most: float | None = None


@dataclass(frozen=True)
class _BoundFields:
    at_least: float | None = None
    at_most: float | None = None


@dataclass(frozen=True)
class _FailedFields:
    at_least: float | None = field(default=None, metadata={"check": non_negative})
    at_most: float | None = field(default=None, metadata={"check": non_negative})
    fraction: bool = False


@dataclass(frozen=True)
class _SanityFields:
    method: str | None = None
    spearman_at_full_randomization: dict[str, Any] | None = None
    signed_spearman_at_full_randomization: dict[str, Any] | None = None
    ssim_at_full_randomization: dict[str, Any] | None = None
    steps: int = field(default=1, metadata={"check": positive})
    max_images: int = field(default=16, metadata={"check": positive})


# Keys that only make sense with some kinds.
_ONLY_FOR = {"method": ("metric", "sanity"), "aggregate": ("metric",), "images": ("predicted_in", "metric",
             "failed_images", "sanity"), "at_least": ("predicted_in", "metric", "run"),
             "at_most": ("predicted_in", "metric", "run")}


def _bounds(b: Any, path: str) -> Bounds:
    at_least, at_most = b.at_least, b.at_most
    if at_least is None and at_most is None:
        raise ConfigError(f"{path}: give at_least, at_most or both")
    if at_least is not None and at_most is not None and at_least > at_most:
        raise ConfigError(f"{path}: at_least {at_least} is above at_most {at_most}")
    return Bounds(at_least, at_most)


def parse_rule(data: Any, path: str, default_method: str | None = None) -> Rule:
    """One rule mapping -> Rule; every mistake is a ConfigError naming its key path."""
    from .methods import get_method

    raw = build_dataclass(_RuleFields, data, path)
    given = set(data)
    kinds = [k for k in KINDS if k in given]
    if len(kinds) != 1:
        what = "none" if not kinds else ", ".join(kinds)
        raise ConfigError(f"{path}: a rule checks exactly one of {', '.join(KINDS)}; got {what}")
    kind = kinds[0]
    for key, allowed in _ONLY_FOR.items():
        if key in given and kind not in allowed:
            hint = "put the bound inside it, e.g. failed_images: {at_most: 0}" if key.startswith("at_") else None
            raise ConfigError(f"{path}.{key}: does not apply to a {kind} rule", hint)
    images = (raw.images,) if isinstance(raw.images, str) else tuple(raw.images or ())
    for g in images:
        if not g.strip():
            raise ConfigError(f"{path}.images: empty glob")
        glob_regex(g)
    method = get_method(raw.method, path=f"{path}.method").name if raw.method else None
    top = _BoundFields(raw.at_least, raw.at_most)
    name = raw.name
    if kind == "predicted_in":
        classes = raw.predicted_in if isinstance(raw.predicted_in, tuple) else (raw.predicted_in,)
        if not classes:
            raise ConfigError(f"{path}.predicted_in: give at least one class name or index")
        for c in classes:
            if isinstance(c, int) and c < 0:
                raise ConfigError(f"{path}.predicted_in: class index must be >= 0, got {c}")
        bounds = Bounds(at_least=1.0) if raw.at_least is None and raw.at_most is None else _bounds(top, path)
        return Rule(name or f"predicted in {list(classes)}", "predicted_in", bounds, images, classes=classes)
    if kind == "metric":
        metric = (raw.metric or "").strip()
        if not metric or any(not p for p in metric.split(".")):
            raise ConfigError(f"{path}.metric: expected a field name such as energy or target.prob, got {raw.metric!r}")
        return Rule(name or f"{raw.aggregate} {metric}" + (f" ({method})" if method else ""), "metric",
                    _bounds(top, path), images, method=method, metric=metric, aggregate=raw.aggregate)
    if kind == "failed_images":
        f = build_dataclass(_FailedFields, raw.failed_images, f"{path}.failed_images")
        if f.fraction and f.at_most is not None and f.at_most > 1:
            raise ConfigError(f"{path}.failed_images.at_most: a fraction is at most 1, got {f.at_most}")
        return Rule(name or "failed images", "failed_images", _bounds(f, f"{path}.failed_images"), images,
                    fraction=f.fraction)
    if kind == "sanity":
        sp = f"{path}.sanity"
        s = build_dataclass(_SanityFields, raw.sanity, sp)
        measures = [k for k in SANITY_MEASURES if getattr(s, k) is not None]
        if len(measures) != 1:
            raise ConfigError(f"{sp}: give exactly one of {', '.join(SANITY_MEASURES)} with its bound, e.g. "
                              "spearman_at_full_randomization: {at_most: 0.5}")
        b = _bounds(build_dataclass(_BoundFields, getattr(s, measures[0]), f"{sp}.{measures[0]}"),
                    f"{sp}.{measures[0]}")
        sm = get_method(s.method, path=f"{sp}.method").name if s.method else method
        if sm and method and sm != method:
            raise ConfigError(f"{sp}.method: {sm!r} differs from the rule's method {method!r}")
        sm = sm or default_method
        if sm is None:
            raise ConfigError(f"{sp}.method: name the method to test, e.g. method: gradcam")
        spec = SanitySpec(sm, SANITY_MEASURES[measures[0]], s.steps, s.max_images)
        return Rule(name or f"sanity {sm} {measures[0]}", "sanity", b, images, method=sm, sanity=spec)
    field_path = (raw.run or "").strip()
    if not field_path:
        raise ConfigError(f"{path}.run: expected a dotted path into run.json such as counts.ok")
    return Rule(name or f"run.json {field_path}", "run", _bounds(top, path), run_field=field_path)


def expectations_from_dict(data: Any, source: str | None = None, default_method: str | None = None) -> Expectations:
    f = build_dataclass(_FileFields, data, "")
    if f.version != 1:
        raise ConfigError(f"version: expected 1, got {f.version}")
    if not f.rules:
        raise ConfigError("rules: no rules given", "add a list of rules under `rules:` (see README)")
    rules = []
    for i, r in enumerate(f.rules):
        label = f"rules[{i}]" + (f" ({r['name']})" if isinstance(r, Mapping) and isinstance(r.get("name"), str) else "")
        rules.append(parse_rule(r, label, default_method))
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ConfigError(f"rules: two rules are named {r.name!r}", "give each rule its own name:")
        seen.add(r.name)
    return Expectations(tuple(rules), source)


def load_expectations(path: Path, default_method: str | None = None) -> Expectations:
    """Read and validate an expectations YAML (safe loader); errors name the file and key path."""
    if not path.is_file():
        raise ConfigError(f"expectations file not found: {path}", "pass an existing YAML file to --expect")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    try:
        return expectations_from_dict(data, str(path), default_method)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", e.hint) from None


# --------------------------------------------------------------------------------------------
# Image selection


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over POSIX relative paths: ``**`` any number of folders, ``*`` and ``?`` within one
    name, ``[abc]`` / ``[!abc]`` classes; a trailing ``/`` means everything below that folder."""
    p = pattern.strip().lstrip("./") if pattern.strip().startswith("./") else pattern.strip()
    if p.endswith("/"):
        p += "**"
    out, i = [], 0
    while i < len(p):
        if p.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif p[i] == "*":
            out.append("[^/]*")
            i += 1
        elif p[i] == "?":
            out.append("[^/]")
            i += 1
        elif p[i] == "[" and "]" in p[i + 2:]:
            j = p.index("]", i + 2)
            body = p[i + 1:j]
            neg = body.startswith("!")
            body = re.escape(body[1:] if neg else body).replace("\\-", "-")
            out.append(f"[{'^' if neg else ''}{body}]")
            i = j + 1
        else:
            out.append(re.escape(p[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def selector(globs: Sequence[str]) -> Callable[[str], bool]:
    """path -> kept: any glob matches (no globs: every path)."""
    if not globs:
        return lambda _: True
    regs = [glob_regex(g) for g in globs]
    return lambda path: any(r.match(path) for r in regs)


# --------------------------------------------------------------------------------------------
# Evaluation


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


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


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
    from .metrics import all_metrics

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


def check_classes(exp: Expectations, labels: Sequence[str] | None, n_classes: int | None = None) -> None:
    """Class names of predicted_in rules must be the model's (close matches on error)."""
    lower = {lab.lower() for lab in labels} if labels is not None else None
    for r in exp.rules:
        for c in r.classes:
            if isinstance(c, str) and lower is not None and c.lower() not in lower:
                raise ConfigError(f"rule {r.name!r}: predicted_in: unknown class name {c!r}",
                                  suggest(c, list(labels or [])))
            if isinstance(c, int) and n_classes is not None and c >= n_classes:
                raise ConfigError(f"rule {r.name!r}: predicted_in: class index {c} out of range "
                                  f"(the model has {n_classes} classes)")


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


# --------------------------------------------------------------------------------------------
# Reports


def junit_xml(outcomes: Sequence[Outcome], suite: str = "xai check", time_s: float = 0.0) -> bytes:
    """JUnit XML: one <testcase> per rule, a <failure> carrying the measured value when it fails."""
    failures = sum(1 for o in outcomes if not o.passed)
    root = ET.Element("testsuites", name=suite, tests=str(len(outcomes)), failures=str(failures), errors="0",
                      time=f"{time_s:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)), failures=str(failures),
                       errors="0", skipped="0", time=f"{time_s:.3f}")
    for o in outcomes:
        tc = ET.SubElement(ts, "testcase", classname=f"xai.check.{o.rule.kind}", name=o.rule.name, time="0")
        text = f"measured {_fmt(o.measured)}, expected {o.rule.bounds.describe()}: {o.detail}"
        if not o.passed:
            msg = (f"measured {_fmt(o.measured)}, expected {o.rule.bounds.describe()}" if o.measured is not None
                   else o.detail)
            fail = ET.SubElement(tc, "failure", message=msg, type="ExpectationFailed")
            fail.text = text
        else:
            ET.SubElement(tc, "system-out").text = text
    ET.indent(root)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def table(outcomes: Sequence[Outcome], title: str = "xai check") -> Any:
    """A rich table: rule, PASS/FAIL, measured value, bound, how it was measured."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("rule", "left"), ("result", "left"), ("measured", "right"), ("bound", "left"),
                      ("detail", "left")):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for o in outcomes:
        t.add_row(escape(o.rule.name), "[bold green]PASS[/]" if o.passed else "[bold red]FAIL[/]",
                  _fmt(o.measured), o.rule.bounds.describe(), escape(o.detail))
    return t


def labels_for(model: ModelConfig) -> list[str] | None:
    """The model's class names without building it: a labels file, or torchvision weights' meta."""
    from .models import load_labels

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

    from .errors import InputError
    from .outputs import RUN, SCORES, read_scores, write_json

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
            from .run import run_explain

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
            from .sanity import run_sanity

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
