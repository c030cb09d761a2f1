"""The contact sheet: ``grid.png`` (or ``grid-001.png``, ``grid-002.png``, ... when a run has more
than :data:`ROWS_PER_PAGE` images): one row per image, the original then one overlay per method
(and target), each labelled; a header naming the columns with their colour bars. For a quick look
in a terminal image viewer or as a CI artefact, without a browser.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate import BACKGROUND, MUTED, TEXT, bar_colours, fit, font, text_width
from ..records import RunFolder
from .data import Column, RunView, columns_of, input_root, run_legend
from .thumbs import Picture, load_picture, original_path

ROWS_PER_PAGE = 40
CELL_W, CELL_H = 256, 192  # the picture's box in a cell
GAP = 8
FONT = 13


def grid_names(pages: int) -> list[str]:
    return ["grid.png"] if pages <= 1 else [f"grid-{i + 1:03d}.png" for i in range(pages)]


def write_grid_pages(folder: RunFolder, *, images: Path | None = None) -> list[Path]:
    """Every page of the contact sheet of ``folder``, written atomically; stale pages removed."""
    from ..outputs import atomic_write, encode_image

    view = RunView(folder, folder.path.name, input_root(folder.run or {}, images), "overlays")
    cols = columns_of([view])
    records = sorted(folder.records, key=lambda r: r["path"])
    pages = max(1, -(-len(records) // ROWS_PER_PAGE))
    names = grid_names(pages)
    for old in list(folder.path.glob("grid.png")) + list(folder.path.glob("grid-[0-9][0-9][0-9].png")):
        if old.name not in names:
            old.unlink(missing_ok=True)
    written = []
    for i, name in enumerate(names):
        page = records[i * ROWS_PER_PAGE : (i + 1) * ROWS_PER_PAGE]
        img = render_page(view, cols, page, (i + 1, pages))
        atomic_write(folder.path / name, encode_image(img, "png"))
        written.append(folder.path / name)
    return written


def render_page(view: RunView, cols: Sequence[Column], records: Sequence[dict[str, Any]],
                page: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) of one page."""
    from PIL import Image, ImageDraw

    n_cols = 1 + len(cols)
    line = round(FONT * 1.35)
    cell_h = CELL_H + GAP + 2 * line
    head_h = GAP + round(FONT * 1.5) + line + GAP
    width = GAP + n_cols * (CELL_W + GAP)
    height = head_h + max(1, len(records)) * (cell_h + GAP) + line
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(canvas)
    _header(canvas, d, view, cols, page)
    pictures = _pictures(view, cols, records)
    for r, rec in enumerate(records):
        y = head_h + r * (cell_h + GAP)
        for c in range(n_cols):
            x = GAP + c * (CELL_W + GAP)
            pic = pictures[r][c]
            if pic is not None:
                canvas.paste(Image.fromarray(pic), (x + (CELL_W - pic.shape[1]) // 2, y + (CELL_H - pic.shape[0]) // 2))
            elif c == 0 and rec.get("status") != "ok":
                _failure(d, rec, (x, y))
            lines = _caption(rec, None if c == 0 else cols[c - 1], pic is not None)
            for k, (text, colour) in enumerate(lines):
                d.text((x, y + CELL_H + GAP // 2 + k * line), fit(text, font(FONT), CELL_W), font=font(FONT), fill=colour)
    return np.asarray(canvas)


def _header(canvas: Any, d: Any, view: RunView, cols: Sequence[Column], page: tuple[int, int]) -> None:
    """Column titles, each overlay column's colour bar with its end labels, the run's name."""
    from PIL import Image

    bold, small = font(round(FONT * 1.15), bold=True), font(FONT - 2)
    titles = ["original"] + [c.method + (f" · target {c.nth + 1}" if c.nth else "") for c in cols]
    sub = f"{view.folder.path.name}: page {page[0]} of {page[1]}" if page[1] > 1 else view.folder.path.name
    for i, title in enumerate(titles):
        x = GAP + i * (CELL_W + GAP)
        d.text((x, GAP), fit(title, bold, CELL_W), font=bold, fill=TEXT)
        y = GAP + round(FONT * 1.5)
        legend = run_legend(view.run, cols[i - 1].method) if i else None
        if legend is None:
            d.text((x, y), fit(sub if i == 0 else "", small, CELL_W), font=small, fill=MUTED)
            continue
        lw, hw = text_width(legend.low, small), text_width(legend.high, small)
        bar_w = max(10, round(CELL_W - lw - hw - 12))
        d.text((x, y), legend.low, font=small, fill=MUTED)
        canvas.paste(Image.fromarray(np.repeat(bar_colours(legend, bar_w)[None], 8, 0)), (round(x + lw + 6), y + 4))
        d.text((x + lw + 12 + bar_w, y), legend.high, font=small, fill=MUTED)


def _failure(d: Any, rec: dict[str, Any], at: tuple[int, int]) -> None:
    """A failed image's reason, wrapped in the picture's box."""
    import textwrap

    err = rec.get("error") or {}
    f = font(FONT)
    chars = max(10, int(CELL_W / (f.size * 0.55)))
    lines = ["failed", *textwrap.wrap(f"{err.get('type', 'error')}: {err.get('message', '')}", chars)][:8]
    for k, text in enumerate(lines):
        d.text((at[0] + 6, at[1] + 6 + k * round(FONT * 1.35)), fit(text, f, CELL_W - 12), font=f,
               fill=(235, 110, 100) if k == 0 else TEXT)


def _pictures(view: RunView, cols: Sequence[Column], records: Sequence[dict[str, Any]]) -> list[list[np.ndarray | None]]:
    """The thumbnails of a page (original, then each column), read in a thread pool."""
    jobs: list[Picture] = []
    for rec in records:
        jobs.append(Picture(original_path(view.input_root, rec["path"]), None))
        for c in cols:
            entries = [e for e in rec.get("explanations") or [] if e.get("method") == c.method]
            overlay = (entries[c.nth].get("files") or {}).get("overlay") if c.nth < len(entries) else None
            jobs.append(Picture(view.folder.path / overlay if overlay else None,
                                (int(rec["height"]), int(rec["width"])) if overlay else None))
    with ThreadPoolExecutor(8, thread_name_prefix="xai-grid") as pool:
        pics = list(pool.map(lambda p: load_picture(p, CELL_W) if p.source else None, jobs))
    fitted = [_fit(p) for p in pics]
    k = 1 + len(cols)
    return [fitted[i * k : (i + 1) * k] for i in range(len(records))]


def _fit(pic: np.ndarray | None) -> np.ndarray | None:
    """Scale down to the cell's box (thumbnails fit a square)."""
    if pic is None or (pic.shape[0] <= CELL_H and pic.shape[1] <= CELL_W):
        return pic
    from PIL import Image

    im = Image.fromarray(pic)
    im.thumbnail((CELL_W, CELL_H), Image.Resampling.BILINEAR)
    return np.asarray(im)


def _caption(rec: dict[str, Any], col: Column | None, has_picture: bool) -> list[tuple[str, tuple[int, int, int]]]:
    """Two lines under a cell: the path and prediction (original), or the explained class."""
    if rec.get("status") != "ok":
        err = rec.get("error") or {}
        if col is not None:
            return []
        return [(rec["path"], TEXT), (f"failed ({err.get('type', 'error')})", (235, 110, 100))]
    if col is None:
        top = (rec.get("topk") or [{}])[0]
        text = f"predicted {top.get('label', '?')} {top.get('prob', 0):.1%}"
        return [(rec["path"], TEXT), (text if has_picture else text + " (original not found)", MUTED)]
    entries = [e for e in rec.get("explanations") or [] if e.get("method") == col.method]
    if col.nth >= len(entries):
        return [("not explained", MUTED)]
    t = entries[col.nth].get("target") or {}
    return [(f"{t.get('label', '?')} {t.get('prob', 0):.1%}" + (f" (rank {t.get('rank')})" if t.get("rank", 1) != 1 else ""),
             TEXT)]
