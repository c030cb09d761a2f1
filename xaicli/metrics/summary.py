"""Run-level aggregates of the per-image numbers in scores.jsonl (for run.json and `xai compare`).

Per method, every numeric per-image value gets ``{mean, std, n}``. Values that only exist over a
run get ``{value, n, ...}``: ``max_box_acc`` (MaxBoxAcc at the ``box_iou`` metric's ``delta``, with
the best ``threshold``) and ``max_box_acc_v2`` (mean over its ``deltas``), from the per-image
``box_iou_curve`` lists (images without ground truth have null curves and are left out).
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
    values. ``metrics``: run.json's list of {name, params} (for MaxBoxAcc's IoU bounds)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for r in records:
        if r.get("status") != "ok":
            continue
        for e in r.get("explanations", []):
            for k, v in _numbers(e).items():
                values[e["method"]][k].append(v)
            c = (e.get("metrics") or {}).get("box_iou_curve")
            if isinstance(c, list) and c and all(isinstance(v, (int, float)) for v in c):
                curves[e["method"]].append([float(v) for v in c])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, by_name in values.items():
        out[method] = {}
        for name, vs in by_name.items():
            n = len(vs)
            mean = sum(vs) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (n - 1)) if n > 1 else 0.0
            out[method][name] = {"mean": mean, "std": std, "n": n}
    params = next((m.get("params") or {} for m in metrics or [] if m.get("name") == "box_iou"), {})
    for method, cs in curves.items():
        out.setdefault(method, {}).update(max_box_acc_values(cs, params))
    return out


def max_box_acc_values(curves: list[list[float]], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """MaxBoxAcc (V1 at ``delta``) and MaxBoxAccV2 (mean over ``deltas``) from IoU-by-threshold curves
    on the ``curve_interval`` grid of the box_iou params."""
    import numpy as np

    from .localization import BoxIouParams, max_box_acc, threshold_grid

    defaults = BoxIouParams()
    delta = float(params.get("delta", defaults.delta))
    deltas = [float(d) for d in params.get("deltas", defaults.deltas)]
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:  # curves from different grids cannot be pooled
        return {}
    arr = np.asarray(curves, dtype=np.float64)
    grid = threshold_grid(float(params.get("curve_interval", defaults.curve_interval)))
    if len(grid) != arr.shape[1]:
        grid = np.arange(arr.shape[1]) / arr.shape[1]
    v1, t1 = max_box_acc(arr, grid, delta)
    v2 = [max_box_acc(arr, grid, d)[0] for d in deltas]
    return {
        "max_box_acc": {"value": v1, "n": len(curves), "delta": delta, "threshold": round(t1, 6)},
        "max_box_acc_v2": {"value": sum(v2) / len(v2), "n": len(curves), "deltas": deltas,
                           "per_delta": [round(v, 6) for v in v2]},
    }
