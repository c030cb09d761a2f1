"""What a report shows, as plain data: one or more runs (read through ``records.read_run``), the
rows (one per image; for several runs, the images they share), the columns (one per run, method
and target rank) and, per cell, the thumbnail, the explained class and every number to sort by.

The page's script gets these as JSON (``build.grid_data``). Paths in the data are relative URLs
from the report's folder (quoted), so the folder can move as a whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..records import RunFolder
from .thumbs import Picture, original_path

if TYPE_CHECKING:
    from ..annotate import Legend

REPORT_DIR = "report"  # thumbnails and plots, beside report.html


@dataclass
class RunView:
    """One run as a report sees it."""

    folder: RunFolder
    name: str  # "A", "B", ... in a comparison; the folder's name alone
    input_root: Path | None  # where the originals are (None: not found)
    thumbs: str  # its thumbnails' folder under report/thumbs/ ("overlays"; "run1", "run2", ... in a comparison)
    base: str = "."  # the run folder as a URL relative to the report folder
    originals: str | None = None  # the input folder as a URL relative to the report folder

    def locate(self, out: Path) -> RunView:
        """Fill in the URLs of the run folder and the originals, relative to the report in ``out``."""
        self.base = url(self.folder.path, out)
        if self.input_root is not None and self.input_root.is_dir():
            self.originals = url(self.input_root, out)
        return self

    @property
    def run(self) -> Mapping[str, Any]:
        return self.folder.run or {}


@dataclass(frozen=True)
class Column:
    run: int
    method: str
    nth: int  # 0 for the explained class, k for the k-th further target (top-k runs)


@dataclass
class Grid:
    """The rows and columns of a report and the pictures it needs."""

    columns: list[Column]
    rows: list[dict[str, Any]]
    pictures: list[Picture] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)  # per picture: (row, column; -1: the original)

    def add(self, pic: Picture, row: int, column: int) -> None:
        self.pictures.append(pic)
        self.slots.append((row, column))

    def drop_missing(self, done: Sequence[bool]) -> None:
        """Point the cells whose thumbnail could not be made at none."""
        for ok, (r, c) in zip(done, self.slots, strict=True):
            if ok:
                continue
            if c < 0:
                self.rows[r]["o"] = None
            elif self.rows[r]["c"][c]:
                self.rows[r]["c"][c].pop("t", None)


def url(target: Path, base: Path) -> str:
    """``target`` as a relative URL from the folder ``base``."""
    rel = os.path.relpath(target.resolve(), base.resolve())
    return quote(Path(rel).as_posix())


def join_url(prefix: str, rel: str) -> str:
    """A relative file path under the folder at URL ``prefix`` (from :func:`url`; "." for here)."""
    q = quote(rel)
    return q if prefix in ("", ".") else f"{prefix}/{q}"


def input_root(run: Mapping[str, Any], override: Path | None) -> Path | None:
    """The run's input (a folder, or the one image it explained), when it still exists."""
    if override is not None:
        return override
    recorded = run.get("input")
    if not recorded:
        return None
    p = Path(str(recorded))
    return p if p.exists() else None


def columns_of(views: Sequence[RunView]) -> list[Column]:
    """One column per run, method (in the run's order) and target rank."""
    cols: list[Column] = []
    for k, v in enumerate(views):
        order = [m["name"] for m in v.run.get("methods") or []]
        ranks: dict[str, int] = {}
        for r in v.folder.records:
            seen: dict[str, int] = {}
            for e in r.get("explanations") or []:
                seen[e["method"]] = seen.get(e["method"], 0) + 1
                if e["method"] not in order:
                    order.append(e["method"])
            for m, n in seen.items():
                ranks[m] = max(ranks.get(m, 0), n)
        cols += [Column(k, m, j) for m in order for j in range(max(1, ranks.get(m, 1)))]
    return cols


def numbers(entry: Mapping[str, Any]) -> dict[str, float]:
    """Every number of an explanation worth sorting by: the explained class's probability, the
    metric values, the method's own values (e.g. completeness_gap) and the map's statistics."""
    from ..records import ENTRY_FIELDS

    out: dict[str, float] = {"prob": float((entry.get("target") or {}).get("prob", math.nan))}
    for k, v in (entry.get("metrics") or {}).items():
        if _is_number(v):
            out[k] = float(v)
    for k, v in entry.items():
        if k not in ENTRY_FIELDS and _is_number(v):
            out[k] = float(v)
    for k in ("max", "mean"):
        stat = (entry.get("map") or {}).get(k)
        if isinstance(stat, (int, float)) and _is_number(stat):
            out[f"map_{k}"] = float(stat)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_grid(views: Sequence[RunView], out: Path) -> Grid:
    """Rows over the images every run has (all of one run's), with the thumbnails to write."""
    cols = columns_of(views)
    by_path = [{r["path"]: r for r in v.folder.records} for v in views]
    paths = sorted(set.intersection(*(set(b) for b in by_path)))
    grid = Grid(cols, [])
    for path in paths:
        recs = [b[path] for b in by_path]
        grid.rows.append(_row(path, recs, views, out, grid))
    return grid


def _row(path: str, recs: Sequence[Mapping[str, Any]], views: Sequence[RunView], out: Path, grid: Grid) -> dict[str, Any]:
    """One image: status, failure reasons, top-k per run, original thumbnail, one cell per column."""
    errors = [f"{v.name + ': ' if len(views) > 1 else ''}{(r.get('error') or {}).get('type', 'error')}: "
              f"{(r.get('error') or {}).get('message', '')}" for v, r in zip(views, recs, strict=True)
              if r.get("status") != "ok"]
    row: dict[str, Any] = {"p": path, "s": "error" if errors else "ok", "e": "; ".join(errors) or None,
                           "k": [[[t.get("label"), t.get("prob")] for t in r.get("topk") or []] for r in recs]}
    first = recs[0]
    size = (int(first["height"]), int(first["width"])) if first.get("height") else None
    if size:
        row["w"], row["h"] = size[1], size[0]
    n = len(grid.rows)
    first_view = views[0]
    src = original_path(first_view.input_root, path)
    thumb = f"{REPORT_DIR}/thumbs/images/{path}.jpg"
    grid.add(Picture(src, None, out / thumb), n, -1)
    row["o"] = quote(thumb) if src is not None else None
    if src is not None:
        row["of"] = join_url(first_view.originals, path) if first_view.originals else url(src, out)
    row["c"] = []
    for i, c in enumerate(grid.columns):
        cell, pic = _cell(recs[c.run], views[c.run], c, out)
        row["c"].append(cell)
        if pic is not None:
            grid.add(pic, n, i)
    return row


def _cell(rec: Mapping[str, Any], view: RunView, col: Column, out: Path) -> tuple[dict[str, Any] | None, Picture | None]:
    entries = [e for e in rec.get("explanations") or [] if e.get("method") == col.method]
    if col.nth >= len(entries):
        return None, None
    e = entries[col.nth]
    target = e.get("target") or {}
    cell: dict[str, Any] = {"l": target.get("label"), "q": target.get("prob"), "r": target.get("rank"),
                            "v": numbers(e)}
    boxes = (e.get("metrics") or {}).get("boxes")
    if boxes:
        cell["b"] = boxes
    overlay = (e.get("files") or {}).get("overlay")
    if not overlay:
        return cell, None
    thumb = f"{REPORT_DIR}/thumbs/{view.thumbs}/{overlay}.jpg"
    cell["t"], cell["f"] = quote(thumb), join_url(view.base, overlay)
    return cell, Picture(view.folder.path / overlay, (int(rec["height"]), int(rec["width"])), out / thumb)


def run_legend(run: Mapping[str, Any], method: str) -> Legend | None:
    """What a method's colours mean in a run, from its run.json (its render mode, its style and
    the run's colormaps); None for a method the run does not list."""
    from ..annotate import Legend, lut_array

    entry = next((m for m in run.get("methods") or [] if m.get("name") == method), None)
    if entry is None:
        return None
    o = (run.get("config") or {}).get("output") or {}
    mode = _signed_mode(method, entry.get("params") or {})
    style = entry.get("style") or {}
    try:
        lut = lut_array(str(o.get("diverging_colormap", "bwr") if mode == "diverging" else o.get("colormap", "jet")))
    except ValueError:
        return None
    return Legend.of(lut, mode, str(style.get("blend", "alpha")), float(o.get("alpha", 0.5)),
                     float(style.get("clip", 100.0)))


def _signed_mode(method: str, params: Mapping[str, Any]) -> str | None:
    from types import SimpleNamespace

    from ..errors import XaiError
    from ..methods import get_method

    try:
        spec = get_method(method)
    except XaiError:
        return None
    mode, _ = spec.display(SimpleNamespace(**params))  # the run.json params as the knobs object
    return mode
