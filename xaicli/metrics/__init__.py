"""The metric registry: name -> MetricSpec. A metric scores one method's maps for a batch.

A metric is a function ``fn(batch, maps, params) -> dict[str, Tensor]``:

* ``batch`` is the method's :class:`xaicli.methods.batch.Batch` (input, targets, chunked runner);
* ``maps`` is (B, H, W) float32 on the device at the model input's resolution, non-negative and
  scaled to [0, 1] per image (how the engine normalises for rendering);
* the result maps score names to per-image values (B,) (or per-image lists as (B, N) / (B, N, 4)
  tensors; NaN means "no value" and is written as null), written under ``metrics`` in the method's
  entry of scores.jsonl and aggregated in run.json.

A metric registered with ``context=True`` gets a fourth argument, a
:class:`xaicli.metrics.context.MetricContext`: each image's original size, the window of it that
the model input shows, and (``ground_truth=True``) its ground truth mapped into the input frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[..., Any]
    summary: str
    params: type
    # (params) -> forwards per image and method
    cost: Callable[[Any], int]
    context: bool = False  # fn takes a 4th argument: the per-image MetricContext
    ground_truth: bool = False  # needs ground truth (config `ground_truth`); implies context
    outputs: tuple[str, ...] = ()  # the keys fn may return (scores.jsonl, `xai check` rules)


_metrics: Registry[MetricSpec] = Registry("metric", __name__)


def register(
    name: str,
    *,
    summary: str,
    params: type,
    cost: Callable[[Any], int] | None = None,
    context: bool = False,
    ground_truth: bool = False,
    outputs: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` under ``name``; a duplicate name fails at import."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"{name}: params must be a dataclass")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = MetricSpec(
            name, fn, summary, params, cost or (lambda p: 0), context or ground_truth, ground_truth,
            outputs or (name,),
        )
        _metrics.register(name, spec, module=fn.__module__)
        return fn

    return deco


def all_metrics() -> list[MetricSpec]:
    return _metrics.all()


def get_metric(name: str, path: str = "metrics") -> MetricSpec:
    """The spec of a metric by name; the error lists the close matches."""
    return _metrics.get(name, path)
