"""The report's plots, drawn by matplotlib as SVG: the distribution of each metric per method (and
run), the mean deletion / insertion curves, and the sanity test's similarity per randomisation step.

matplotlib's object API (``Figure``), not pyplot: no global state and no GUI backend, safe in any
thread. SVGs are deterministic (fixed hash salt, no date) so an unchanged run gives unchanged files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..metrics.compare import HIGHER_IS_BETTER, LOWER_IS_BETTER

_RC: dict[str, Any] = {"svg.hashsalt": "xaicli", "svg.fonttype": "path", "font.size": 9, "axes.spines.top": False,
       "axes.spines.right": False}
_CURVES = ("deletion_curve", "insertion_curve")
MAX_POINTS = 300  # points drawn over a box plot (a random sample of larger groups)


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        return Figure(figsize=(width, height), layout="constrained")


def metric_values(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """metric -> method -> the per-image numbers of the successful images."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        for e in r.get("explanations") or []:
            for k, v in (e.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out.setdefault(k, {}).setdefault(e["method"], []).append(float(v))
    return out


def distribution_svg(metric: str, groups: Mapping[str, Sequence[float]]) -> str:
    """Box plots (with the points) of one metric, one row per group (method, or run: method)."""
    import numpy as np

    names = list(groups)
    with_rc = _figure(6.4, 0.9 + 0.32 * len(names))
    ax = with_rc.add_subplot()
    data = [np.asarray(groups[n], dtype=float) for n in names]
    ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=False, medianprops={"color": "#c0392b"})
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, 1):
        shown = d if len(d) <= MAX_POINTS else rng.choice(d, MAX_POINTS, replace=False)  # a light SVG for big runs
        ax.scatter(shown, i + rng.uniform(-0.18, 0.18, len(shown)), s=6, alpha=0.45, color="#2c3e50", linewidths=0)
        ax.text(1.01, i, f"mean {d.mean():.3f}  n={len(d)}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=8, color="#555")
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.invert_yaxis()
    arrow = " (lower is better)" if metric in LOWER_IS_BETTER else (
        " (higher is better)" if metric in HIGHER_IS_BETTER else "")
    ax.set_title(metric + arrow, loc="left", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _svg(with_rc)


def mean_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """curve name -> method -> the mean curve over images (curves saved with ``save_curve``)."""
    import numpy as np

    acc: dict[str, dict[str, list[list[float]]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        for e in r.get("explanations") or []:
            for name in _CURVES:
                c = (e.get("metrics") or {}).get(name)
                if isinstance(c, list) and c and all(isinstance(v, (int, float)) for v in c):
                    acc.setdefault(name, {}).setdefault(e["method"], []).append([float(v) for v in c])
    out: dict[str, dict[str, list[float]]] = {}
    for name, by_method in acc.items():
        for method, cs in by_method.items():
            if len({len(c) for c in cs}) == 1:
                out.setdefault(name, {})[method] = np.mean(np.asarray(cs), 0).tolist()
    return out


def curves_svg(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    """The mean deletion and insertion curves side by side, one line per method."""
    import numpy as np

    names = [n for n in _CURVES if n in curves]
    fig = _figure(3.4 * len(names), 2.8)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for method, c in curves[name].items():
            ax.plot(np.linspace(0, 1, len(c)), c, label=method, linewidth=1.4)
        ax.set_xlabel("fraction of pixels " + ("removed" if name.startswith("deletion") else "inserted"))
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"mean {name.replace('_', ' ')}", loc="left", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if names:
        fig.axes[0].legend(fontsize=7, frameon=False)
    return _svg(fig)


def sanity_svg(report: Mapping[str, Any]) -> str:
    """Mean Spearman of |map| (solid) and SSIM (dashed) per cumulative randomisation step."""
    steps = report.get("steps") or []
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    x = list(range(len(steps)))
    for method, r in (report.get("methods") or {}).items():
        ys = [s.get("spearman_abs", {}).get("mean") for s in r.get("steps") or []]
        line = ax.plot(x[: len(ys)], ys, marker="o", markersize=3, label=f"{method} (Spearman |map|)")
        ss = [s.get("ssim", {}).get("mean") for s in r.get("steps") or []]
        if any(v is not None for v in ss):
            ax.plot(x[: len(ss)], ss, linestyle="--", color=line[0].get_color(), label=f"{method} (SSIM)")
    bound = report.get("max_spearman")
    if bound is not None:
        ax.axhline(bound, color="#c0392b", linewidth=0.8, linestyle=":", label=f"pass bound {bound}")
    ax.set_xticks(x, ["none" if k == 0 else f"+{len(s.get('cumulative') or [])}" for k, s in enumerate(steps)])
    ax.set_xlabel("layers re-initialised (cumulative, from the logits down)")
    ax.set_ylabel("similarity to the trained model's maps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig)
