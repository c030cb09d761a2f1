"""Run-level aggregates of the per-image numbers in scores.jsonl (for run.json and `xai compare`).

Per method, every numeric per-image value gets ``{mean, std, n}``. Values that only exist over a
run get ``{value, n, ...}`` from the ``summarise`` hook of the metric that declares them (box_iou's
``max_box_acc`` and ``max_box_acc_v2``, see metrics/localization.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ..records import ENTRY_FIELDS


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    """Numeric per-explanation values worth aggregating: metrics and method extras."""
    out: dict[str, float] = {}
    for k, v in (entry.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    for k, v in entry.items():
        if k in ENTRY_FIELDS:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    out["target_prob"] = float(entry.get("target", {}).get("prob", float("nan")))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def aggregate(
    records: list[dict[str, Any]], metrics: list[dict[str, Any]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> value name -> {mean, std, n} over the run's successful images, plus run-level
    values. ``metrics``: run.json's list of {name, params} (the knobs of run-level values, e.g.
    MaxBoxAcc's IoU bounds; defaults where a metric is not listed)."""
    from . import all_metrics

    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("status") != "ok":
            continue
        for e in r.get("explanations", []):
            for k, v in _numbers(e).items():
                values[e["method"]][k].append(v)
            per_image[e["method"]].append(e.get("metrics") or {})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, by_name in values.items():
        out[method] = {}
        for name, vs in by_name.items():
            n = len(vs)
            mean = sum(vs) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (n - 1)) if n > 1 else 0.0
            out[method][name] = {"mean": mean, "std": std, "n": n}
    knobs = {m.get("name"): m.get("params") or {} for m in metrics or []}
    for spec in all_metrics():
        if spec.summarise is None:
            continue
        for method, entries in per_image.items():
            run_level = spec.summarise(entries, knobs.get(spec.name, {}))
            if run_level:
                out.setdefault(method, {}).update(run_level)
    return out
