"""Run-level aggregates of the per-image numbers in scores.jsonl (for run.json and `xai compare`)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    """Numeric per-explanation values worth aggregating: metrics and method extras."""
    out: dict[str, float] = {}
    for k, v in (entry.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    for k, v in entry.items():
        if k in ("method", "layer", "target", "map", "files", "metrics"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    out["target_prob"] = float(entry.get("target", {}).get("prob", float("nan")))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> value name -> {mean, std, n} over the run's successful images."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") != "ok":
            continue
        for e in r.get("explanations", []):
            for k, v in _numbers(e).items():
                values[e["method"]][k].append(v)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, by_name in values.items():
        out[method] = {}
        for name, vs in by_name.items():
            n = len(vs)
            mean = sum(vs) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (n - 1)) if n > 1 else 0.0
            out[method][name] = {"mean": mean, "std": std, "n": n}
    return out
