"""`xai synth`: a labelled image set whose object positions are known, for training and checking
localization (``xai train --data DIR``, ``xai explain DIR/val --ground-truth ...``).

Each image is one object of its class pasted at a random place, scale and rotation on a random
crop of one of the photos that ship with scikit-image (cluttered, natural-looking, the same pool
for every class, so the background says nothing about the class). Classes are shapes filled with
one colour (disc, triangle, star, cross, square) or ellipses filled with a texture (stripes,
checker, dots); colours are random, so only shape and texture tell the classes apart.

Layout::

    DIR/train/<class>/<class>_0000.jpg          DIR/val/<class>/...
    DIR/ground_truth/train/masks/<class>/<class>_0000.png    (255 = object; mirrors train/)
    DIR/ground_truth/train/boxes.csv            path,x0,y0,x1,y1,label (inclusive corners)
    DIR/ground_truth/val/masks/...              DIR/ground_truth/val/boxes.csv
    DIR/synth.json                              the parameters and counts

Every image comes from its own generator seeded by (seed, split, class, index): the same files
for the same arguments, whatever else is generated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ConfigError, ModelError, OutputError, suggest
from .methods.batch import stable_seed
from .outputs import atomic_write

# Shapes filled with one colour, then ellipses filled with a texture; `--classes N` takes the first
# N (interleaved, so that small sets mix both kinds).
CATALOGUE = ("disc", "stripes", "checker", "triangle", "dots", "star", "square", "cross")
TEXTURES = frozenset({"stripes", "checker", "dots"})
# scikit-image's bundled photos (no download needed): the background pool.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "rocket", "text", "brick", "grass", "gravel", "retina", "clock", "cell")
SUPERSAMPLE = 4  # sub-pixels per side for the object's anti-aliased edge
SPLITS = ("train", "val")
FORMAT = "xaicli-synth"


@dataclass(frozen=True)
class SynthSpec:
    classes: int | tuple[str, ...] = 4  # the first N of CATALOGUE, or names from it
    per_class: int = 50  # training images per class
    val_per_class: int = 20
    size: int = 96  # square images, pixels
    seed: int = 0
    min_scale: float = 0.3  # object diameter as a fraction of the image side
    max_scale: float = 0.6

    def validate(self) -> None:
        if isinstance(self.classes, int):
            if not 2 <= self.classes <= len(CATALOGUE):
                raise ConfigError(f"--classes: between 2 and {len(CATALOGUE)}, got {self.classes}",
                                  "classes: " + ", ".join(CATALOGUE))
        else:
            for name in self.classes:
                if name not in CATALOGUE:
                    raise ConfigError(f"--classes: unknown class {name!r}", suggest(name, CATALOGUE))
            if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
                raise ConfigError(f"--classes: need at least two different classes, got {', '.join(self.classes)}")
        if self.per_class < 1 or self.val_per_class < 0:
            raise ConfigError("--per-class must be >= 1 and --val-per-class >= 0")
        if self.size < 16:
            raise ConfigError(f"--size: at least 16 pixels, got {self.size}")

    @property
    def names(self) -> tuple[str, ...]:
        return CATALOGUE[: self.classes] if isinstance(self.classes, int) else tuple(self.classes)


def parse_classes(text: str) -> int | tuple[str, ...]:
    """``--classes``: a number (the first N of the catalogue) or comma-separated names."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    return tuple(n.strip().lower() for n in text.split(",") if n.strip())


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


@dataclass
class SynthResult:
    out: Path
    counts: dict[str, int]  # split -> images


@lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The background photos as float32 RGB (H, W, 3) in [0, 1] (read once per process)."""
    try:
        import skimage.data
    except ImportError:
        raise ModelError("xai synth needs scikit-image for its background photos",
                         "pip install 'xaicli[synth]' (or scikit-image)") from None
    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        photo = a[..., :3] / 255.0
        photo.setflags(write=False)  # shared by every call of this process
        out.append(photo)
    return tuple(out)


def background(rng: np.random.Generator, photos: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    """A random square crop (a third of the photo's shorter side or more) resized to ``size``."""
    import cv2

    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.33, 1.0) * min(h, w))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = np.ascontiguousarray(photo[top : top + side, left : left + side])
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(img * rng.uniform(0.7, 1.2), 0, 1)


def inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether object coordinates (u, v) (unit radius, rotated with the object) are in the shape."""
    if name == "disc":
        return u**2 + v**2 <= 1
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "triangle":  # equilateral, inscribed in the unit circle
        edges = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return np.logical_and.reduce([u * cx + v * cy <= 0.5 for cx, cy in edges])
    if name == "star":  # five points: radius from 1 at a point to 0.45 between two
        phi = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * math.pi / 5) / (2 * math.pi / 5)
        return np.hypot(u, v) <= 0.45 + 0.55 * np.abs(1 - 2 * phi)
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    return u**2 + (v / 0.7) ** 2 <= 1  # the textured classes: an ellipse


def texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which of the two colours (bool) each point takes: the pattern of a textured class."""
    if name == "stripes":
        return np.sin(2 * math.pi * rng.uniform(2.0, 3.0) * u) > 0
    if name == "checker":
        k = rng.uniform(2.0, 3.0)
        return (np.floor(u * k) + np.floor(v * k)) % 2 == 0
    if name == "dots":
        s = 0.45
        du, dv = (u / s) - np.round(u / s), (v / s) - np.round(v / s)
        return np.hypot(du, dv) < 0.32
    return np.ones_like(u, dtype=bool)


def _colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)), np.float32)


def render(name: str, rng: np.random.Generator, photos: tuple[np.ndarray, ...], spec: SynthSpec) -> tuple[np.ndarray, np.ndarray]:
    """One image: (uint8 RGB (S, S, 3), bool object mask (S, S))."""
    size = spec.size
    img = background(rng, photos, size)
    radius = rng.uniform(spec.min_scale, spec.max_scale) * size / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)

    def coords(n: int) -> tuple[np.ndarray, np.ndarray]:  # object frame at n samples per pixel
        t = (np.arange(size * n) + 0.5) / n - 0.5
        y, x = np.meshgrid(t, t, indexing="ij")
        return ((x - cx) * c + (y - cy) * s) / radius, (-(x - cx) * s + (y - cy) * c) / radius

    alpha = inside(name, *coords(SUPERSAMPLE)).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
    u, v = coords(1)
    first, second = _colour(rng), _colour(rng) * 0.3
    pick = texture(name, u, v, rng) if name in TEXTURES else np.ones_like(u, dtype=bool)
    fill = np.where(pick[..., None], first, second) * (0.85 + 0.15 * np.clip(u, -1, 1))[..., None]
    out = img * (1 - alpha[..., None]) + fill * alpha[..., None]
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), alpha >= 0.5


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buf, format="JPEG", quality=92)
    else:
        Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _prepare(out: Path, overwrite: bool) -> None:
    ours = [out / n for n in (*SPLITS, "ground_truth", "synth.json")]
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if any(p.exists() for p in ours):
        if not overwrite:
            raise OutputError(f"{out} already holds a data set (train/, val/, ground_truth/ or synth.json)",
                              "add --overwrite to replace it, or choose another folder")
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(out: Path, spec: SynthSpec, *, overwrite: bool = False, progress: Progress | None = None) -> SynthResult:
    """Write the data set (see the module docstring) into ``out``."""
    spec.validate()
    photos = load_photos()
    _prepare(out, overwrite)
    counts = {"train": spec.per_class, "val": spec.val_per_class}
    total = len(spec.names) * sum(counts.values())
    if progress is not None:
        progress.start(total, f"synth: {total} images")
    try:
        for split, n in counts.items():
            rows = [_write_one(out, split, name, i, spec, photos, progress)
                    for name in spec.names for i in range(n)]
            if rows:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows([["path", "x0", "y0", "x1", "y1", "label"], *rows])
                atomic_write(out / "ground_truth" / split / "boxes.csv", buf.getvalue().encode())
    finally:
        if progress is not None:
            progress.finish()
    manifest: dict[str, Any] = {"format": FORMAT, "version": 1, **asdict(spec), "classes": list(spec.names),
                                "images": {k: v * len(spec.names) for k, v in counts.items()}}
    atomic_write(out / "synth.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return SynthResult(out, manifest["images"])


def _write_one(out: Path, split: str, name: str, i: int, spec: SynthSpec, photos: tuple[np.ndarray, ...],
               progress: Progress | None) -> list[Any]:
    """One image, its mask and its boxes row."""
    rng = np.random.default_rng(stable_seed(spec.seed, f"{split}/{name}/{i}"))
    rgb, mask = render(name, rng, photos, spec)
    rel = f"{name}/{name}_{i:04d}"
    atomic_write(out / split / f"{rel}.jpg", _encode(rgb, "jpg"))
    atomic_write(out / "ground_truth" / split / "masks" / f"{rel}.png", _encode(mask.astype(np.uint8) * 255, "png"))
    ys, xs = np.nonzero(mask)
    if progress is not None:
        progress.advance(1)
    return [f"{rel}.jpg", int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), name]
