"""The metric registry: name -> MetricSpec. A metric scores one method's maps for a batch.

A metric is a function ``fn(batch, maps, params, ctx) -> dict[str, Tensor]``:

* ``batch`` is the method's :class:`xaicli.methods.batch.Batch` (input, targets, chunked runner);
* ``maps`` is (B, H, W) float32 on the device at the model input's resolution, non-negative and
  scaled to [0, 1] per image (how the engine normalises for rendering);
* ``ctx`` is the batch's :class:`xaicli.metrics.context.MetricContext`: each image's path and
  original size, the window of it that the model input shows, and (for a metric registered with
  ``ground_truth=True``, which the run refuses to start without) its ground truth mapped into the
  input frame;
* the result maps score names to per-image values (B,) (or per-image lists as (B, N) / (B, N, 4)
  tensors; NaN means "no value" and is written as null), written under ``metrics`` in the method's
  entry of scores.jsonl and aggregated in run.json (mean, std, n); a ``summarise`` hook adds values
  that only exist over a run (MaxBoxAcc).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

from ..registry import Registry


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[..., Any]
    summary: str
    params: type
    # (params) -> forwards per image and method
    cost: Callable[[Any], int]
    ground_truth: bool = False  # needs ground truth (config `ground_truth`)
    outputs: tuple[str, ...] = ()  # the keys fn may return (scores.jsonl, `xai check` rules)
    # Run-level values: (one method's per-image ``metrics`` dicts of scores.jsonl, the metric's knobs
    # as run.json records them) -> value name -> {value, n, ...} for run.json's aggregates.
    summarise: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, dict[str, Any]]] | None = None
    # An output holding boxes (B, T, 4) that the overlays outline when the metric's `draw` knob is on.
    draws: str | None = None

    def boxes_to_draw(self, params: Any, values: dict[str, Tensor]) -> Tensor | None:
        """The boxes this metric puts on the overlays for these values, if any."""
        if self.draws is None or not getattr(params, "draw", False):
            return None
        return values.get(self.draws)


_metrics: Registry[MetricSpec] = Registry("metric", __name__)


def register(
    name: str,
    *,
    summary: str,
    params: type,
    cost: Callable[[Any], int] | None = None,
    ground_truth: bool = False,
    outputs: tuple[str, ...] = (),
    summarise: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, dict[str, Any]]] | None = None,
    draws: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` under ``name``; a duplicate name fails at import."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"{name}: params must be a dataclass")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = MetricSpec(name, fn, summary, params, cost or (lambda p: 0), ground_truth, outputs or (name,),
                          summarise, draws)
        _metrics.register(name, spec, module=fn.__module__)
        return fn

    return deco


def all_metrics() -> list[MetricSpec]:
    return _metrics.all()


def get_metric(name: str, path: str = "metrics") -> MetricSpec:
    """The spec of a metric by name; the error lists the close matches."""
    return _metrics.get(name, path)
