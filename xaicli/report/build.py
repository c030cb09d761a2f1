"""Building report.html: the runs' summaries, the metrics table and plots, the check and sanity
results, and the image grid's data, rendered by the Jinja2 template."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..records import RunFolder, ok_records, read_json
from . import plots
from .data import REPORT_DIR, Column, Grid, RunView, build_grid, input_root, run_legend, url
from .thumbs import THUMB_SIZE, write_thumbnails

TEMPLATES = Path(__file__).resolve().parent / "templates"
SHOWN_SIZE = 200  # CSS px of a thumbnail on the page (the files are THUMB_SIZE: sharp on high-density screens)


def build_report(folders: Sequence[RunFolder], out: Path, *, images: Path | None = None,
                 progress: Any = None) -> Path:
    """Write ``out/report.html`` and its ``out/report/`` folder for one run or several
    (``progress``: a run.ProgressHook for the thumbnails, or None)."""
    from ..outputs import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    views = _views(folders, images, out)
    grid = build_grid(views, out)
    grid.drop_missing(write_thumbnails(grid.pictures, THUMB_SIZE, progress))
    _add_ground_truth(grid, views[0])
    page = render_page(views, grid, out)
    path = out / "report.html"
    atomic_write(path, page.encode("utf-8"))
    return path


def _views(folders: Sequence[RunFolder], images: Path | None, out: Path) -> list[RunView]:
    multi = len(folders) > 1
    return [RunView(f, chr(ord("A") + k) if multi and k < 26 else (f"run{k + 1}" if multi else f.path.name),
                    input_root(f.run or {}, images), f"run{k + 1}" if multi else "overlays").locate(out)
            for k, f in enumerate(folders)]


def _add_ground_truth(grid: Grid, view: RunView) -> None:
    """Ground-truth boxes of each row (the first run's ground truth), when the run had some."""
    gt_cfg = (view.run.get("config") or {}).get("ground_truth") or {}
    if not (gt_cfg.get("masks") or gt_cfg.get("boxes")):
        return
    from ..errors import XaiError
    from ..metrics.ground_truth import load_ground_truth

    try:
        gt = load_ground_truth(gt_cfg.get("masks"), gt_cfg.get("boxes"))
    except XaiError:  # moved or changed since the run: the report goes without it
        return
    if gt is None:
        return
    for row in grid.rows:
        if not row.get("w"):
            continue
        try:
            boxes = gt.boxes_for(row["p"], row["h"], row["w"])
        except XaiError:
            continue
        if boxes is not None and len(boxes):
            row["g"] = [[float(v) for v in b] for b in boxes]


# --------------------------------------------------------------------------------------------
# The page


def render_page(views: Sequence[RunView], grid: Grid, out: Path) -> str:
    import jinja2
    from markupsafe import Markup

    from .. import __version__

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    plot_files, curves_note = _plots(views, out)
    context = {
        "version": __version__,
        "title": _title(views),
        "subtitle": f"generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by xaicli {__version__}",
        "runs": [run_summary(v) for v in views],
        "metrics": _metrics_table(views),
        "plots": plot_files,
        "curves_note": curves_note,
        "checks": _checks(views, out),
        "shown": SHOWN_SIZE,
        "data_json": _json_for_script(grid_data(views, grid)),
        "script": Markup((TEMPLATES / "report.js").read_text(encoding="utf-8")),  # our own file, verbatim
    }
    return env.get_template("report.html.j2").render(**context)


def _title(views: Sequence[RunView]) -> str:
    if len(views) == 1:
        return f"xaicli report: {views[0].folder.path.resolve().name}"
    return "xaicli comparison: " + " vs ".join(f"{v.name} ({v.folder.path.resolve().name})" for v in views)


def _json_for_script(data: Any) -> Any:
    """JSON safe inside a <script> element (no "</", no HTML comment openers)."""
    from markupsafe import Markup

    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def grid_data(views: Sequence[RunView], grid: Grid) -> dict[str, Any]:
    """What the page's script needs: runs, columns (title, legend, sortable keys), rows."""
    from ..metrics.compare import HIGHER_IS_BETTER, LOWER_IS_BETTER

    keys: list[set[str]] = [set() for _ in grid.columns]
    for row in grid.rows:
        for i, cell in enumerate(row["c"]):
            if cell:
                keys[i].update(cell["v"])
    cols = [{"run": c.run, "method": c.method, "title": _column_title(c, views), "keys": _key_order(keys[i]),
             "legend": legend_for(views[c.run].run, c.method)} for i, c in enumerate(grid.columns)]
    runs = []
    for v in views:
        boxes = next((m for m in v.run.get("metrics") or [] if m.get("name") == "boxes"), None)
        params = (boxes or {}).get("params") or {}
        runs.append({"name": v.name, "path": str(v.folder.path), "draw_boxes": bool(boxes) and not params.get("draw"),
                     "box_thresholds": ", ".join(f"{t:g}·max" for t in params.get("thresholds") or [])})
    return {"runs": runs, "columns": cols, "rows": grid.rows, "lower": sorted(LOWER_IS_BETTER),
            "higher": sorted(HIGHER_IS_BETTER)}


def _column_title(c: Column, views: Sequence[RunView]) -> str:
    return c.method + (f" · target {c.nth + 1}" if c.nth else "")


def _key_order(keys: set[str]) -> list[str]:
    first = [k for k in ("prob",) if k in keys]
    return first + sorted(keys - set(first))


def legend_for(run: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    """What a column's colours mean, for its header: end labels and a CSS gradient of the colours
    as the overlays blend them (on white)."""
    from ..annotate import bar_colours

    legend = run_legend(run, method)
    if legend is None:
        return None
    stops = bar_colours(legend, 11, background=(255, 255, 255))
    css = "linear-gradient(to right, " + ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops.tolist()) + ")"
    return {"low": legend.low, "high": legend.high, "mid": legend.mid, "note": legend.note, "css": css}


# --------------------------------------------------------------------------------------------
# Summary, metrics, checks


def run_summary(v: RunView) -> dict[str, Any]:
    run, counts = v.run, v.run.get("counts") or {}
    records = v.folder.records
    failed = [r for r in records if r.get("status") != "ok"]
    t = run.get("timings") or {}
    dev = run.get("device") or {}
    rate = t.get("images_per_s")
    time_text = (f"{t['run_s']:.1f} s for {counts.get('processed', len(records))} images" if t.get("run_s") else "–")
    if rate:
        time_text += f" ({rate:.2f} images/s)" if rate >= 1 else f" ({1 / rate:.1f} s/image)"
    if t.get("load_s") is not None:
        time_text += f", model loaded in {t['load_s']:.1f} s"
    versions = run.get("versions") or {}
    return {
        "name": v.name, "path": str(v.folder.path), "model": run.get("model", "?"), "layer": run.get("layer"),
        "target": run.get("target", "?"), "methods": [_method_line(m) for m in run.get("methods") or []],
        "ok": len(records) - len(failed), "failed": len(failed), "ignored": counts.get("ignored_files"),
        "time": time_text,
        "device": " ".join(str(x) for x in (dev.get("type"), dev.get("name")) if x) + f", {run.get('precision', '')}",
        "started": run.get("started", "?"), "finished": run.get("finished", "?"),
        "versions": ", ".join(f"{k} {versions[k]}" for k in ("xaicli", "torch", "torchvision") if k in versions),
        "command": _command(run.get("command") or []),
        "failures": [{"path": r["path"], "type": (r.get("error") or {}).get("type", "error"),
                      "message": (r.get("error") or {}).get("message", "")} for r in failed],
    }


def _command(argv: Sequence[str]) -> str:
    """The command line as typed: ``xai ...`` for the console script or ``python -m xaicli.cli``."""
    import shlex

    if not argv:
        return ""
    first = Path(str(argv[0]))
    name = "xai" if first.name in ("xai", "cli.py", "__main__.py") else str(argv[0])
    return " ".join([name, *(shlex.quote(str(a)) for a in argv[1:])])


def _method_line(m: Mapping[str, Any]) -> dict[str, str]:
    params = m.get("params") or {}
    knobs = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    style = m.get("style") or {}
    drawn = (f"clip at the {style['clip']:g}th percentile of |map|, " if style.get("clip", 100) < 100 else "") + (
        "heat blend" if style.get("blend") == "heat" else "constant alpha") if style else "constant alpha"
    return {"name": str(m.get("name")), "passes": str(m.get("passes", "")), "knobs": knobs, "style": drawn}


def _metrics_table(views: Sequence[RunView]) -> dict[str, Any] | None:
    from ..metrics.compare import HIGHER_IS_BETTER, LOWER_IS_BETTER, compare_runs

    if not any(ok_records(v.folder.records) and _has_metrics(v.folder.records) for v in views):
        return None
    try:
        res = compare_runs([v.folder for v in views])
    except Exception:  # nothing in common: the grid still shows every image
        return None
    names = {str(v.folder.path): v.name for v in views}
    best: dict[str, float] = {}
    for col in res["columns"]:
        vals = [_value(r["values"][col]) for r in res["rows"] if col in r["values"]]
        if len(vals) > 1 and (col in LOWER_IS_BETTER or col in HIGHER_IS_BETTER):
            best[col] = min(vals) if col in LOWER_IS_BETTER else max(vals)
    rows = []
    for r in res["rows"]:
        cells = []
        for col in res["columns"]:
            v = r["values"].get(col)
            text = "–" if v is None else (f"{v['value']:.4f}" if "value" in v else f"{v['mean']:.4f} ± {v['std']:.4f}")
            if v is not None and v["n"] != r["images"]:
                text += f" (n={v['n']})"
            cells.append({"text": text, "best": v is not None and col in best and _value(v) == best[col]})
        rows.append({"run": names.get(r["run"], r["run"]), "method": r["method"], "cells": cells})
    cols = [{"name": c, "arrow": " ↓" if c in LOWER_IS_BETTER else (" ↑" if c in HIGHER_IS_BETTER else "")}
            for c in res["columns"]]
    return {"images": res["images"], "columns": cols, "rows": rows}


def _value(v: Mapping[str, Any]) -> float:
    return float(v["value"] if "value" in v else v["mean"])


def _has_metrics(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(e.get("metrics") for r in records for e in r.get("explanations") or [])


def _plots(views: Sequence[RunView], out: Path) -> tuple[list[dict[str, str]], str | None]:
    """The metric distributions and mean curves as SVG files under ``out/report/plots``."""
    from ..outputs import atomic_write

    multi = len(views) > 1
    common = set.intersection(*({r["path"] for r in ok_records(v.folder.records)} for v in views))
    groups: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for v in views:
        recs = [r for r in v.folder.records if r.get("path") in common]
        for metric, by_method in plots.metric_values(recs).items():
            for method, vals in by_method.items():
                groups.setdefault(metric, {})[f"{v.name}: {method}" if multi else method] = vals
        for name, by_method in plots.mean_curves(recs).items():
            for method, c in by_method.items():
                curves.setdefault(name, {})[f"{v.name}: {method}" if multi else method] = c
    files = []
    folder = out / REPORT_DIR / "plots"
    for metric in sorted(groups):
        path = folder / f"{_safe(metric)}.svg"
        atomic_write(path, plots.distribution_svg(metric, groups[metric]).encode())
        files.append({"src": url(path, out), "alt": f"distribution of {metric} per method"})
    note = None
    if curves:
        path = folder / "curves.svg"
        atomic_write(path, plots.curves_svg(curves).encode())
        files.append({"src": url(path, out), "alt": "mean deletion and insertion curves"})
    elif any(k in groups for k in ("deletion_auc", "insertion_auc")):
        note = ("Mean deletion / insertion curves: switch on save_curve (metrics: {deletion: {save_curve: true}, "
                "insertion: {save_curve: true}}) to plot them.")
    return files, note


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _checks(views: Sequence[RunView], out: Path) -> list[dict[str, Any]]:
    """`xai check` (check.json) and `xai sanity` (sanity*.json) results found in the run folders."""
    from ..outputs import atomic_write

    found: list[dict[str, Any]] = []
    for k, v in enumerate(views):
        check = read_json(v.folder.path / "check.json")
        if check and isinstance(check.get("rules"), list):
            rules = [{**r, "measured": _num(r.get("measured"))} for r in check["rules"]]
            found.append({"kind": "check", "run": v.name, "rules": rules, "passed": bool(check.get("passed")),
                          "passed_rules": sum(1 for r in rules if r.get("passed")),
                          "expectations": check.get("expectations")})
        for i, path in enumerate(sorted(v.folder.path.glob("sanity*.json"))):
            rep = read_json(path)
            if not rep or not isinstance(rep.get("methods"), dict):
                continue
            plot = out / REPORT_DIR / "plots" / f"sanity-{k + 1}-{i + 1}.svg"
            atomic_write(plot, plots.sanity_svg(rep).encode())
            found.append(_sanity_entry(rep, v.name, url(plot, out)))
    return found


def _sanity_entry(rep: Mapping[str, Any], run: str, plot: str) -> dict[str, Any]:
    methods = []
    for name, r in rep["methods"].items():
        full = r.get("full_randomization") or {}
        methods.append({"name": name, "passed": r.get("verdict") == "pass",
                        **{q: _num(full.get(q)) for q in ("spearman_abs", "spearman", "ssim")}})
    return {"kind": "sanity", "run": run, "images": len(rep.get("images") or rep.get("targets") or []),
            "bound": rep.get("max_spearman"), "methods": methods, "plot": plot}


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, (int, float)):
        return "–" if isinstance(v, float) and not math.isfinite(v) else f"{v:.4g}"
    return str(v)
