"""What `xai methods` and `xai metrics` print: one JSON-ready row per registered method or metric
(with its knobs as the config sets them) and the rich tables made of those rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Config
from .methods import all_methods
from .metrics import all_metrics
from .plan import config_params, metric_params


def knobs(params: Any) -> dict[str, Any]:
    """A knob object as JSON-ready ``{name: value}`` (tuples as lists), in declaration order;
    fields that only Python code fills (tensors) are left out."""
    out = {}
    for f in dataclasses.fields(params):
        if not f.init or not f.repr:
            continue
        v = getattr(params, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def method_rows(cfg: Config, channels: int | None = None) -> list[dict[str, Any]]:
    """Every method with the knobs ``cfg`` gives it (defaults elsewhere) and its cost per image
    (Score-CAM's for ``channels`` at the target layer when known)."""
    rows = []
    for spec in all_methods():
        params = config_params(cfg, spec)
        rows.append({
            "name": spec.name,
            "family": spec.family,
            "gradients": spec.needs_grad,
            "space": spec.space,
            "signed": spec.signed,
            "passes": spec.cost_text(params, channels),
            "summary": spec.summary,
            "paper": spec.paper,
            "aliases": list(spec.aliases),
            "knobs": knobs(params),
        })
    return rows


def metric_rows(cfg: Config) -> list[dict[str, Any]]:
    """Every metric with the knobs ``cfg`` gives it, the keys it writes and its cost."""
    rows = []
    for spec in all_metrics():
        params = metric_params(spec, cfg.metrics.get(spec.name))
        rows.append({
            "name": spec.name,
            "summary": spec.summary,
            "ground_truth": spec.ground_truth,
            "writes": list(spec.outputs),
            "forwards": spec.cost(params),
            "knobs": knobs(params),
        })
    return rows


def _knob_text(values: dict[str, Any]) -> str:
    """``knob: value`` in YAML's own spelling, as a config would write it."""
    import yaml
    from rich.markup import escape

    if not values:
        return "[dim]no knobs[/]"
    flat = [f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]
    return "[dim]knobs:[/] " + escape(", ".join(flat))


def methods_table(rows: list[dict[str, Any]], title: str) -> Any:
    """Names never wrap; the summary, aliases and knobs share one column that folds in a narrow
    terminal."""
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("name", no_wrap=True)
    # Family, map and passes share one narrow column, so that 80 columns leave the description room.
    table.add_column("kind; passes / image", max_width=14)
    table.add_column("what it does; knobs (as configured)", overflow="fold")
    for r in rows:
        kind = f"{r['family']}\n{r['space']}{', signed' if r['signed'] else ''}"
        kind += "\ngradients" if r["gradients"] else ""
        text = r["summary"]
        if r["aliases"]:
            text += f"\n[dim]aliases: {', '.join(r['aliases'])}[/]"
        table.add_row(r["name"], f"{kind}\n[bold]{r['passes']}[/]", text + "\n" + _knob_text(r["knobs"]))
    return table


def metrics_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="xai metrics (switch on with --metrics a,b or `metrics:` in the config)", show_lines=True)
    table.add_column("name", no_wrap=True)
    table.add_column("forwards / image", justify="right", max_width=9)
    table.add_column("what it measures; keys written; knobs (as configured)", overflow="fold")
    for r in rows:
        text = r["summary"] + ("\nneeds ground truth (--ground-truth)" if r["ground_truth"] else "")
        text += f"\n[dim]writes:[/] {', '.join(r['writes'])}\n" + _knob_text(r["knobs"])
        table.add_row(r["name"], str(r["forwards"]), text)
    return table
