"""Small pictures for reports and contact sheets: each original and each overlay of a run, scaled
to fit a box, decoded in a thread pool (Pillow releases the GIL while it decodes and resizes).

An overlay written with ``output.annotate`` has a caption strip below the image (and a wider canvas
for narrow images); the picture is cropped back to the image's own size first, since reports and
grids say in words what the caption says. A thumbnail is written once and reused while it is newer
than its source.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

THUMB_SIZE = 256  # px, the longer side of a report thumbnail (sharp at about 128-256 CSS px)


@dataclass(frozen=True)
class Picture:
    """One picture to scale: ``source`` (None when unavailable), the image's own size (height,
    width) when the file may be taller or wider (an annotated overlay), and where it goes."""

    source: Path | None
    size: tuple[int, int] | None
    dest: Path | None = None


def load_picture(pic: Picture, box: int) -> np.ndarray | None:
    """The picture as uint8 (h, w, 3) fitting ``box`` x ``box``; None when it cannot be read."""
    from PIL import Image, ImageOps

    from ..data import to_rgb

    if pic.source is None:
        return None
    try:
        with Image.open(pic.source) as f:
            if f.format == "JPEG" and pic.size is None:
                f.draft("RGB", (box, box))  # decode at a fraction of the size
            im = to_rgb(ImageOps.exif_transpose(f) if pic.size is None else f)
            if pic.size is not None:
                h, w = pic.size
                im = im.crop((0, 0, min(w, im.width), min(h, im.height)))
            im.thumbnail((box, box), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(im)
    except Exception:  # a missing, truncated or odd file: no picture, never a failed report
        return None


def write_thumbnail(pic: Picture, box: int = THUMB_SIZE) -> bool:
    """Write ``pic`` as a JPEG thumbnail at ``pic.dest`` unless an up-to-date one is there.
    True when a thumbnail exists afterwards."""
    from PIL import Image

    from ..outputs import atomic_write

    assert pic.dest is not None
    if pic.source is None:
        return False
    try:
        if pic.dest.stat().st_mtime >= pic.source.stat().st_mtime:
            return True
    except OSError:
        pass
    arr = load_picture(pic, box)
    if arr is None:
        return False
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    atomic_write(pic.dest, buf.getvalue())
    return True


def write_thumbnails(pictures: Iterable[Picture], box: int = THUMB_SIZE, progress: Any = None) -> list[bool]:
    """Every thumbnail, in a thread pool; for each picture whether its thumbnail exists.
    ``progress``: a run.ProgressHook (start, advance, finish), or None."""
    pics = list(pictures)
    threads = max(1, min(8, os.cpu_count() or 1))
    done: list[bool] = []
    if progress is not None:
        progress.start(len(pics), f"report: {len(pics)} thumbnails")
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="xai-thumb") as pool:
            for ok in pool.map(lambda p: write_thumbnail(p, box), pics):
                done.append(ok)
                if progress is not None:
                    progress.advance(1)
    finally:
        if progress is not None:
            progress.finish()
    return done


def original_path(input_root: Path | None, rel: str) -> Path | None:
    """Where the original of ``rel`` is: the run's input folder joined with it, or the input
    itself when the run explained one file."""
    if input_root is None:
        return None
    if input_root.is_file():
        return input_root if input_root.name == rel else None
    p = input_root / rel
    return p if p.is_file() else None
