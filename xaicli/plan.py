"""A run's plan, resolved once: the methods and metrics that run, each with its spec from the
registry and its validated knob object built from the config's ``methods:`` / ``metrics:``
sections. This is the one place knobs become objects (``config.build_dataclass``) and the one
place knobs that name files are read (once the model's preprocessing is known).

It sits above :mod:`xaicli.config` (names and knob mappings kept as plain data) and both
registries; the engine, ``xai methods``, the Python API, ``xai check`` and the sanity test take
their methods from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import IMAGE_FILE, Config, build_dataclass
from .errors import ConfigError
from .methods import MethodSpec, get_method
from .metrics import MetricSpec, get_metric
from .render import Style, default_style

if TYPE_CHECKING:
    from .preprocess import Preprocess


@dataclass(frozen=True)
class Plan:
    """The methods and metrics of a run with their knobs; ``cfg`` carries the canonical names."""

    cfg: Config
    methods: tuple[tuple[MethodSpec, Any], ...]
    metrics: tuple[tuple[MetricSpec, Any], ...]
    styles: Mapping[str, Style] = dataclasses.field(default_factory=dict)  # method name -> how it is drawn

    def params(self, name: str) -> Any:
        """The knob object of a method of the plan, by name or alias."""
        spec = get_method(name)
        return next(p for s, p in self.methods if s is spec)


def method_params(spec: MethodSpec, knobs: Mapping[str, Any] | None = None) -> Any:
    """The validated knob object of a method (defaults where ``knobs`` is silent)."""
    return build_dataclass(spec.params, knobs or {}, f"methods.{spec.name}")


def metric_params(spec: MetricSpec, knobs: Mapping[str, Any] | None = None) -> Any:
    return build_dataclass(spec.params, knobs or {}, f"metrics.{spec.name}")


def config_params(cfg: Config, spec: MethodSpec) -> Any:
    """A method's knobs as the config sets them, for any registered method (`xai methods`)."""
    return method_params(spec, cfg.methods.get(spec.name))


def method_pairs(items: Sequence[Any]) -> list[tuple[MethodSpec, Any]]:
    """(spec, knobs) pairs from what the Python API accepts: names, MethodSpecs (default knobs)
    or (spec, knobs) pairs."""
    out = []
    for m in items:
        if isinstance(m, tuple):
            out.append(m)
        else:
            spec = m if isinstance(m, MethodSpec) else get_method(str(m))
            out.append((spec, method_params(spec)))
    return out


def method_style(spec: MethodSpec, knobs: Mapping[str, Any] | None = None) -> Style:
    """How a method's maps are drawn: its default (render.default_style) with the config's
    ``output.style.METHOD`` knobs on top."""
    base = dataclasses.asdict(default_style(spec.family, spec.space, spec.signed))
    return build_dataclass(Style, {**base, **(knobs or {})}, f"output.style.{spec.name}")


def _styles(cfg: Config) -> tuple[dict[str, Any], dict[str, Style]]:
    """``output.style`` with canonical method names, and the style of every method of the run."""
    knobs: dict[str, Any] = {}
    for name, section in cfg.output.style.items():
        spec = get_method(str(name), path="output.style")
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"output.style.{name}: expected a mapping such as {{clip: 99, blend: heat}}, "
                              f"got {section!r}")
        method_style(spec, section)  # validated even when the method does not run
        knobs[spec.name] = dict(section or {})
    return knobs, {n: method_style(get_method(n), knobs.get(n)) for n in cfg.method}


def resolve_plan(cfg: Config) -> Plan:
    """Names checked against the registries (close matches on error), aliases made canonical,
    every knob section validated. Cheap: nothing is loaded."""
    names: list[str] = []
    for n in cfg.method:
        spec = get_method(n, path=cfg.method_key)
        if spec.name not in names:
            names.append(spec.name)
    knobs: dict[str, Any] = {}
    for name, section in cfg.methods.items():
        spec = get_method(str(name), path="methods")
        method_params(spec, section)  # validated even when the method does not run
        knobs[spec.name] = dict(section or {})
    metric_knobs: dict[str, Any] = {}
    for name, section in cfg.metrics.items():
        mspec = get_metric(str(name), path="metrics")
        metric_knobs[mspec.name] = dict(section or {})
    canonical = dataclasses.replace(cfg, method=tuple(names), methods=knobs, metrics=metric_knobs)
    style_knobs, styles = _styles(canonical)
    if style_knobs != cfg.output.style:
        canonical = dataclasses.replace(canonical, output=dataclasses.replace(cfg.output, style=style_knobs))
    methods = tuple((get_method(n), method_params(get_method(n), knobs.get(n))) for n in names)
    metrics = tuple((get_metric(n), metric_params(get_metric(n), k)) for n, k in metric_knobs.items())
    return Plan(canonical, methods, metrics, styles)


def prepare(plan: Plan, preprocess: Preprocess) -> Plan:
    """Read the knobs that name image files (e.g. an Integrated Gradients baseline image), once:
    decoded and preprocessed like the run's inputs."""
    methods = tuple((s, _read_image_knobs(s, p, preprocess)) for s, p in plan.methods)
    return dataclasses.replace(plan, methods=methods)


def _read_image_knobs(spec: MethodSpec, params: Any, preprocess: Preprocess) -> Any:
    changes = {}
    for f in dataclasses.fields(params):
        target = f.metadata.get(IMAGE_FILE)
        path = getattr(params, f.name)
        if target is None or path is None or getattr(params, target) is not None:
            continue
        from .data import DecodeError, decode_image

        try:
            img = decode_image(Path(path).expanduser())
        except DecodeError as e:
            raise ConfigError(f"methods.{spec.name}.{f.name}: {path}: {e.message}") from None
        changes[target] = preprocess(img)
    return dataclasses.replace(params, **changes) if changes else params
