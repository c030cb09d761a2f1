"""Compare methods (and runs) on the same images: `xai compare RUN_DIR...` and the table that a
run with metrics prints at its end.

Each run folder's scores.jsonl is read; only images that succeeded in every run are kept, so all
rows score the same images; each (run, method) becomes a row of metric means ± std.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..records import RunFolder, ok_records
from .summary import aggregate

# Direction of "better" for the known per-image and run-level values.
LOWER_IS_BETTER = {"deletion_auc", "avg_drop"}
HIGHER_IS_BETTER = {"insertion_auc", "increase", "pointing_hit", "energy", "box_iou", "max_box_acc", "max_box_acc_v2"}
_ORDER = ["deletion_auc", "insertion_auc", "avg_drop", "increase", "pointing_hit", "energy", "box_iou",
          "max_box_acc", "max_box_acc_v2"]
RUN_LEVEL = ("max_box_acc", "max_box_acc_v2")


def _metric_keys(records: list[dict[str, Any]]) -> set[str]:
    keys = set()
    for r in ok_records(records):
        for e in r.get("explanations", []):
            for k, v in (e.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.add(k)
    return keys


def compare_runs(runs: list[RunFolder]) -> dict[str, Any]:
    """A JSON-ready comparison: the common images, the metric columns and one row per run and method."""
    if not runs:
        raise InputError("no run folders given", "pass one or more folders written by `xai explain --out`")
    ok_sets = [{r["path"] for r in ok_records(run.records)} for run in runs]
    common = set.intersection(*ok_sets)
    union = set.union(*ok_sets)
    if not common:
        raise InputError(
            "the runs have no successful image in common" if len(runs) > 1 else f"{runs[0].path} has no successful image",
            "compare runs made on the same images" if len(runs) > 1 else None,
        )
    notes = []
    if len(union) > len(common):
        notes.append(f"{len(union) - len(common)} image(s) not successful in every run were left out")
    params: dict[str, dict[str, Any]] = {}
    for run in runs:
        for m in (run.run or {}).get("metrics") or []:
            prev = params.setdefault(m["name"], m.get("params") or {})
            if prev != (m.get("params") or {}):
                notes.append(f"metric {m['name']!r} has different parameters in different runs")
    keys: set[str] = set()
    rows = []
    for run in runs:
        records = [r for r in ok_records(run.records) if r["path"] in common]
        keys |= _metric_keys(records)
        manifest = run.run or {}
        agg = aggregate(records, manifest.get("metrics"))
        order = [m["name"] for m in manifest.get("methods") or []]
        for r in records:
            for e in r.get("explanations", []):
                if e["method"] not in order:
                    order.append(e["method"])
        for method in order:
            if method not in agg:
                continue
            values = {k: v for k, v in agg[method].items() if k in _metric_keys(records) or k in RUN_LEVEL}
            rows.append({"run": str(run.path), "method": method, "images": len(common), "values": values})
    keys |= {k for row in rows for k in row["values"] if k in RUN_LEVEL}
    columns = [k for k in _ORDER if k in keys] + sorted(keys - set(_ORDER))
    if not columns:
        notes.append("no metric values in " + ("these runs" if len(runs) > 1 else "this run")
                     + ": the table only counts images; to compare methods, rerun `xai explain` with "
                     "`--metrics deletion,insertion` (or `metrics:` in the config; `xai metrics` lists them)")
    return {"runs": [str(r.path) for r in runs], "images": len(common), "columns": columns, "rows": rows,
            "notes": notes}


def _value(v: dict[str, Any]) -> float:
    return float(v["value"] if "value" in v else v["mean"])


def comparison_table(result: dict[str, Any]) -> Any:
    """A rich table of ``compare_runs`` output; the best value of each column in bold."""
    from rich.markup import escape
    from rich.table import Table

    from ..errors import printable

    multi = len(result["runs"]) > 1
    table = Table(title=f"methods compared on {result['images']} image(s)")
    if multi:
        table.add_column("run", overflow="fold")
    table.add_column("method", no_wrap=True)
    best: dict[str, float] = {}
    for col in result["columns"]:
        arrow = " ↓" if col in LOWER_IS_BETTER else (" ↑" if col in HIGHER_IS_BETTER else "")
        table.add_column(col + arrow, justify="right", no_wrap=True)
        vals = [_value(r["values"][col]) for r in result["rows"] if col in r["values"]]
        if len(result["rows"]) > 1 and vals and (col in LOWER_IS_BETTER or col in HIGHER_IS_BETTER):
            best[col] = min(vals) if col in LOWER_IS_BETTER else max(vals)
    table.add_column("n", justify="right")
    for row in result["rows"]:
        cells = []
        for col in result["columns"]:
            v = row["values"].get(col)
            if v is None:
                cells.append("-")
                continue
            text = f"{v['value']:.4f}" if "value" in v else f"{v['mean']:.4f}±{v['std']:.4f}"
            if v["n"] != row["images"]:
                text += f" (n={v['n']})"
            if col in best and _value(v) == best[col]:
                text = f"[bold]{text}[/]"
            cells.append(text)
        label = [escape(printable(str(row["run"])))] if multi else []
        table.add_row(*label, row["method"], *cells, str(row["images"]))
    return table
