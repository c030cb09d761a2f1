"""Overlays that describe themselves: a caption strip under the overlay (the method, the explained
class with its probability and rank, and a colour bar saying what its ends mean) and the threshold
beside each drawn box. Drawn on the host, by the writer threads, while the next batch computes.

Text uses DejaVu Sans, the font matplotlib ships (a dependency), found on disk without importing
matplotlib; Pillow's own scalable font stands in when it is missing. Sizes follow the image's width
(about 1/48 of it, never under 11 px) so a caption reads the same at 224 px and at 4,000 px wide;
an image narrower than :data:`MIN_WIDTH` gets a canvas that wide (the image at its left).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .render import blend_weights, heat_peak, index_weights

MIN_WIDTH = 200  # px: narrower images get a wider canvas so the caption stays legible
BACKGROUND = (24, 24, 24)
TEXT = (242, 242, 242)
MUTED = (170, 170, 170)


@dataclass(frozen=True)
class Legend:
    """What a method's colours mean: the colour table (256, 3) uint8, how it is blended, the
    labels of the bar's ends (and centre, for diverging maps) and a note (the clipping)."""

    lut: np.ndarray
    blend_weights: str | None  # render.blend_weights: None (constant alpha), ramp, vee
    alpha: float
    low: str
    high: str
    mid: str | None = None
    note: str | None = None

    @staticmethod
    def of(lut: np.ndarray, mode: str | None, blend: str, alpha: float, clip: float) -> Legend:
        """``mode``: None for unsigned maps, else the method's render mode (diverging, magnitude,
        positive); ``clip``: the style's percentile (100: none)."""
        signed = mode == "diverging"
        note = None if clip >= 100 else f"|map| above its {clip:g}th percentile saturates"
        weights = blend_weights("heat" if blend == "heat" else "alpha", signed)
        if signed:
            return Legend(lut, weights, alpha, "negative", "positive", "0", note)
        if mode in ("magnitude", "positive"):
            return Legend(lut, weights, alpha, "0", "high |map|" if mode == "magnitude" else "high", None, note)
        return Legend(lut, weights, alpha, "low", "high", None, note)


@dataclass(frozen=True)
class Caption:
    """The words under one overlay."""

    method: str
    label: str
    prob: float
    rank: int

    def headline(self) -> tuple[str, str]:
        return self.method, f"{self.label} {self.prob:.1%}, rank {self.rank}"


# --------------------------------------------------------------------------------------------
# Fonts


def _font_file(bold: bool) -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf" / name
    return path if path.is_file() else None


_fonts = threading.local()  # FreeType faces are not shared between the writer threads


def font(size: int, bold: bool = False) -> Any:
    """A PIL font of ``size`` px (cached per thread)."""
    cache = getattr(_fonts, "cache", None)
    if cache is None:
        cache = _fonts.cache = {}
    key = (size, bold)
    if key not in cache:
        from PIL import ImageFont

        path = _font_file(bold)
        cache[key] = ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)
    return cache[key]


def font_size(width: int) -> int:
    """Caption text size for an image ``width`` px wide."""
    return max(11, round(width / 48))


def text_width(text: str, f: Any) -> float:
    return float(f.getlength(text))


def fit(text: str, f: Any, width: float) -> str:
    """``text``, cut with an ellipsis to fit ``width`` px."""
    if text_width(text, f) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + "…", f) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


# --------------------------------------------------------------------------------------------
# The caption strip


def bar_colours(legend: Legend, n: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """(n, 3) uint8: the colour bar as the overlay draws it over a ``background`` pixel: each
    colour index blended with its weight (heat blends fade to the background where the map is 0;
    constant blends show the colours themselves)."""
    k = np.clip(np.round(np.linspace(0, 255, max(1, n))), 0, 255).astype(np.int64)
    colours = legend.lut[k].astype(np.float64)
    if legend.blend_weights is None:
        return colours.astype(np.uint8)
    w = np.clip(index_weights(legend.blend_weights)[k] * heat_peak(legend.alpha), 0, 1)[:, None]
    out = np.asarray(background, np.float64) * (1 - w) + colours * w
    return np.round(out).astype(np.uint8)


def caption_strip(width: int, caption: Caption, legend: Legend) -> np.ndarray:
    """uint8 (h, width, 3): the headline (one line, or two when it does not fit) and the colour
    bar with its end labels (and the note, when there is room)."""
    from PIL import Image, ImageDraw

    size = font_size(width)
    f, fb = font(size), font(size, bold=True)
    pad = max(3, round(size * 0.45))
    line = round(size * 1.3)
    avail = width - 2 * pad
    method, rest = caption.headline()
    sep = "  ·  "
    one_line = text_width(method, fb) + text_width(sep + rest, f) <= avail
    n_text = 1 if one_line else 2
    head = Image.new("RGB", (width, pad + n_text * line + round(size * 0.25)), BACKGROUND)
    d = ImageDraw.Draw(head)
    if one_line:
        d.text((pad, pad), method, font=fb, fill=TEXT)
        d.text((pad + text_width(method, fb), pad), sep + rest, font=f, fill=TEXT)
    else:
        d.text((pad, pad), fit(method, fb, avail), font=fb, fill=TEXT)
        d.text((pad, pad + line), fit(rest, f, avail), font=f, fill=TEXT)
    return np.concatenate([np.asarray(head), bar_row(width, legend)])


_BAR_ROWS: dict[tuple[int, int], tuple[Legend, np.ndarray]] = {}


def bar_row(width: int, legend: Legend) -> np.ndarray:
    """uint8 (h, width, 3): the colour bar row of a caption (the same for every image of a width
    and method, so drawn once; the legend is kept with it, so its id is not reused)."""
    key = (id(legend), width)
    hit = _BAR_ROWS.get(key)
    if hit is not None and hit[0] is legend:
        return hit[1]
    from PIL import Image, ImageDraw

    size = font_size(width)
    fs = font(max(11, round(size * 0.85)))
    pad = max(3, round(size * 0.45))
    bar_h, row = max(6, round(size * 0.75)), round(size * 1.3)
    img = Image.new("RGB", (width, max(bar_h, row) + pad), BACKGROUND)
    _colour_bar(ImageDraw.Draw(img), img, legend, (pad, 0, width - pad, max(bar_h, row)), fs, bar_h)
    arr = np.asarray(img)
    arr.flags.writeable = False
    if len(_BAR_ROWS) > 256:
        _BAR_ROWS.clear()
    _BAR_ROWS[key] = (legend, arr)
    return arr


def _colour_bar(d: Any, img: Any, legend: Legend, box: tuple[int, int, int, int], f: Any, bar_h: int) -> None:
    """The bar between its end labels in ``box`` (x0, y, x1, row height); the note after the high
    label when the row has room for a bar at least as wide as the labels."""
    from PIL import Image

    x0, y, x1, row = box
    gap = max(4, round(f.size * 0.5))
    lw, hw = text_width(legend.low, f), text_width(legend.high, f)
    note = legend.note
    bar_w = x1 - x0 - lw - hw - 2 * gap
    if note and bar_w - text_width(note, f) - 2 * gap < max(lw + hw, 3 * f.size):
        note = None
    if note:
        bar_w -= text_width(note, f) + 2 * gap
    bar_w = max(8, round(bar_w))
    ty = y + (row - f.size * 1.15) / 2
    d.text((x0, ty), legend.low, font=f, fill=MUTED)
    bx = round(x0 + lw + gap)
    by = round(y + (row - bar_h) / 2)
    colours = bar_colours(legend, bar_w)
    img.paste(Image.fromarray(np.repeat(colours[None], bar_h, 0)), (bx, by))
    if legend.mid is not None:
        c = colours[bar_w // 2].astype(float)
        ink = (20, 20, 20) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 else TEXT
        mw = text_width(legend.mid, f)
        d.text((bx + (bar_w - mw) / 2, by + (bar_h - f.size * 1.15) / 2), legend.mid, font=f, fill=ink)
    d.text((bx + bar_w + gap, ty), legend.high, font=f, fill=MUTED)
    if note:
        d.text((bx + bar_w + gap + hw + 2 * gap, ty), note, font=f, fill=MUTED)


# --------------------------------------------------------------------------------------------
# An annotated overlay


def annotate(rgb: np.ndarray, caption: Caption, legend: Legend,
             boxes: Sequence[tuple[Sequence[float], float]] = ()) -> np.ndarray:
    """The overlay (H, W, 3) uint8 with the caption strip below it (on a canvas at least
    :data:`MIN_WIDTH` wide) and each (box, threshold) of ``boxes`` tagged with its threshold."""
    h, w = rgb.shape[:2]
    width = max(w, MIN_WIDTH)
    strip = caption_strip(width, caption, legend)
    canvas = np.empty((h + strip.shape[0], width, 3), np.uint8)
    canvas[:h, :w] = rgb
    if width > w:
        canvas[:h, w:] = BACKGROUND
    canvas[h:] = strip
    if boxes:
        _tag_boxes(canvas, boxes, font_size(w))
    return canvas


def _tag_boxes(canvas: np.ndarray, boxes: Sequence[tuple[Sequence[float], float]], size: int) -> None:
    """Write "map > T·max" at the top-left corner of each box, inside the image, on a dark tag."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(canvas)
    d = ImageDraw.Draw(img)
    f = font(max(11, round(size * 0.85)))
    pad = max(2, size // 6)
    for box, threshold in boxes:
        if any(v != v for v in box):
            continue
        text = f"map > {threshold:g}·max"
        x, y = int(box[0]) + pad + 1, int(box[1]) + pad + 1
        tw, th = text_width(text, f), f.size * 1.2
        d.rectangle((x, y, x + tw + 2 * pad, y + th + pad), fill=BACKGROUND)
        d.text((x + pad, y + pad / 2), text, font=f, fill=TEXT)
    canvas[:] = np.asarray(img)


@lru_cache(maxsize=64)
def lut_array(name: str) -> np.ndarray:
    """The colour table of a colormap on the host."""
    from .render import _lut_numpy

    return _lut_numpy(name)
