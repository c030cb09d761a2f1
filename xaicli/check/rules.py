"""The expectations file of `xai check`: its YAML schema, the rules it parses into, one parse
function per rule kind, and the globs that select images (see the package docstring)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import build_dataclass, non_negative, positive, read_yaml
from ..errors import ConfigError, quote, suggest

Aggregate = Literal["mean", "median", "min", "max", "fraction_true"]
SANITY_MEASURES = {
    "spearman_at_full_randomization": "spearman_abs",
    "signed_spearman_at_full_randomization": "spearman",
    "ssim_at_full_randomization": "ssim",
}
# Keys a rule may give beside its kind's own, in the order they are checked; each kind of
# measure.RULE_KINDS says which of them it takes.
SHARED_KEYS = ("method", "aggregate", "images", "at_least", "at_most")


@dataclass(frozen=True)
class Bounds:
    """A rule's bounds: it passes when the measured number is at least / at most these."""

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
    """One parsed rule: its kind (a key of measure.RULE_KINDS), bounds, globs and what its kind reads."""

    name: str
    kind: str
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
    """A parsed expectations file: its rules in order, and the file they came from."""

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


def _bounds(b: Any, path: str) -> Bounds:
    """Bounds from anything with ``at_least`` / ``at_most``: at least one, and not crossed."""
    at_least, at_most = b.at_least, b.at_most
    if at_least is None and at_most is None:
        raise ConfigError(f"{path}: give at_least, at_most or both")
    if at_least is not None and at_most is not None and at_least > at_most:
        raise ConfigError(f"{path}: at_least {at_least} is above at_most {at_most}")
    return Bounds(at_least, at_most)


def _method_name(name: str | None, path: str) -> str | None:
    """A ``method:`` as its registered name (unknown names: close matches); None when not given."""
    from ..methods import get_method

    return get_method(name, path=path).name if name else None


def _globs(images: str | tuple[str, ...] | None, path: str) -> tuple[str, ...]:
    """The ``images:`` glob or globs, each checked to compile."""
    globs = (images,) if isinstance(images, str) else tuple(images or ())
    for g in globs:
        if not g.strip():
            raise ConfigError(f"{path}.images: empty glob")
        try:
            glob_regex(g)
        except ConfigError as e:
            raise ConfigError(f"{path}.{e.message}", e.hint) from None
    return globs


@dataclass(frozen=True)
class RuleInput:
    """One rule as written, after the checks every kind shares: what a kind's parse function gets."""

    raw: _RuleFields
    path: str  # the rule's key path for error messages, e.g. "rules[2] (cats)"
    images: tuple[str, ...]
    method: str | None  # the rule's method:, as registered
    default_method: str | None  # the config's method when it has exactly one


def parse_rule(data: Any, path: str, default_method: str | None = None) -> Rule:
    """One rule mapping -> Rule; every mistake is a ConfigError naming its key path. The keys
    all kinds share are checked here, the rest by the kind's own parse function."""
    # The table of kinds pairs this module's parse functions with measure.py's; imported when
    # called, since measure.py imports this module.
    from .measure import RULE_KINDS

    raw = build_dataclass(_RuleFields, data, path)
    given = set(data)
    kinds = [k for k in RULE_KINDS if k in given]
    if len(kinds) != 1:
        what = "none" if not kinds else ", ".join(kinds)
        raise ConfigError(f"{path}: a rule checks exactly one of {', '.join(RULE_KINDS)}; got {what}")
    kind = kinds[0]
    for key in SHARED_KEYS:
        if key in given and key not in RULE_KINDS[kind].keys:
            hint = "put the bound inside it, e.g. failed_images: {at_most: 0}" if key.startswith("at_") else None
            raise ConfigError(f"{path}.{key}: does not apply to a {kind} rule", hint)
    images = _globs(raw.images, path)
    method = _method_name(raw.method, f"{path}.method")
    return RULE_KINDS[kind].parse(RuleInput(raw, path, images, method, default_method))


def parse_predicted_in(r: RuleInput) -> Rule:
    """``predicted_in: [names or indices]``; without bounds, every selected image must be one."""
    raw = r.raw
    # (`predicted_in: null` passes as (None,), a class no prediction matches.)
    classes: tuple[Any, ...] = raw.predicted_in if isinstance(raw.predicted_in, tuple) else (raw.predicted_in,)
    if not classes:
        raise ConfigError(f"{r.path}.predicted_in: give at least one class name or index")
    for c in classes:
        if isinstance(c, int) and c < 0:
            raise ConfigError(f"{r.path}.predicted_in: class index must be >= 0, got {c}")
    bounds = Bounds(at_least=1.0) if raw.at_least is None and raw.at_most is None else _bounds(raw, r.path)
    return Rule(raw.name or f"predicted in {list(classes)}", "predicted_in", bounds, r.images, classes=classes)


def parse_metric(r: RuleInput) -> Rule:
    """``metric: NAME`` (a dotted path) with an optional ``method`` and ``aggregate``."""
    raw = r.raw
    metric = (raw.metric or "").strip()
    if not metric or any(not p for p in metric.split(".")):
        raise ConfigError(f"{r.path}.metric: expected a field name such as energy or target.prob, got {quote(raw.metric)}")
    name = raw.name or f"{raw.aggregate} {metric}" + (f" ({r.method})" if r.method else "")
    return Rule(name, "metric", _bounds(raw, r.path), r.images, method=r.method, metric=metric,
                aggregate=raw.aggregate)


def parse_failed_images(r: RuleInput) -> Rule:
    """``failed_images: {at_most: N}``: a count, or with ``fraction: true`` a fraction (at most 1)."""
    path = f"{r.path}.failed_images"
    f = build_dataclass(_FailedFields, r.raw.failed_images, path)
    if f.fraction and f.at_most is not None and f.at_most > 1:
        raise ConfigError(f"{path}.at_most: a fraction is at most 1, got {f.at_most}")
    return Rule(r.raw.name or "failed images", "failed_images", _bounds(f, path), r.images, fraction=f.fraction)


def parse_sanity(r: RuleInput) -> Rule:
    """``sanity: {method, one measure with its bound, steps, max_images}``; the method defaults to
    the rule's, then to the config's only one."""
    sp = f"{r.path}.sanity"
    s = build_dataclass(_SanityFields, r.raw.sanity, sp)
    measures = [k for k in SANITY_MEASURES if getattr(s, k) is not None]
    if len(measures) != 1:
        raise ConfigError(f"{sp}: give exactly one of {', '.join(SANITY_MEASURES)} with its bound, e.g. "
                          "spearman_at_full_randomization: {at_most: 0.5}")
    key = measures[0]
    bounds = _bounds(build_dataclass(_BoundFields, getattr(s, key), f"{sp}.{key}"), f"{sp}.{key}")
    method = _method_name(s.method, f"{sp}.method") or r.method
    if method and r.method and method != r.method:
        raise ConfigError(f"{sp}.method: {method!r} differs from the rule's method {r.method!r}")
    method = method or r.default_method
    if method is None:
        raise ConfigError(f"{sp}.method: name the method to test, e.g. method: gradcam")
    spec = SanitySpec(method, SANITY_MEASURES[key], s.steps, s.max_images)
    return Rule(r.raw.name or f"sanity {method} {key}", "sanity", bounds, r.images, method=method, sanity=spec)


def parse_run(r: RuleInput) -> Rule:
    """``run: DOTTED.PATH`` into run.json."""
    field_path = (r.raw.run or "").strip()
    if not field_path:
        raise ConfigError(f"{r.path}.run: expected a dotted path into run.json such as counts.ok")
    return Rule(r.raw.name or f"run.json {field_path}", "run", _bounds(r.raw, r.path), run_field=field_path)


def expectations_from_dict(data: Any, source: str | None = None, default_method: str | None = None) -> Expectations:
    """A parsed expectations mapping: version 1, at least one rule, names unique."""
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
    data = read_yaml(path, "expectations")
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
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as e:
        raise ConfigError(f"images: {quote(pattern)} is not a valid glob: {e.msg}",
                          "a class like [a-z] needs its range in order; write [[] for a literal [") from None


def selector(globs: Sequence[str]) -> Callable[[str], bool]:
    """path -> kept: any glob matches (no globs: every path)."""
    if not globs:
        return lambda _: True
    regs = [glob_regex(g) for g in globs]
    return lambda path: any(r.match(path) for r in regs)


def _fmt(v: float | None) -> str:
    """A number as the reports show it: integers without a point, else 4 significant digits."""
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


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

