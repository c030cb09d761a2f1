"""The input side: a deterministic walk of the folder, safe decoding to RGB, and a Dataset whose
workers decode and preprocess. A file that cannot be read becomes an error item, never an
exception that stops the run."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .errors import InputError
from .outputs import is_output_folder
from .preprocess import Preprocess

IMAGE_EXTS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)
# Image formats we recognise but cannot decode: reported per file instead of silently skipped.
UNSUPPORTED_EXTS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".exr"}
)


@dataclass(frozen=True)
class ImageEntry:
    path: Path  # absolute
    rel: str  # POSIX path relative to the input root (the key in scores.jsonl)


@dataclass
class ListedImages:
    entries: list[ImageEntry]
    ignored: int  # files that are not images (by extension)
    skipped_outputs: int = 0  # image files under xaicli output folders (never read back as input)
    output_folders: list[str] = field(default_factory=list)  # those folders, relative to the input


def _is_image_name(name: str) -> bool:
    ext = os.path.splitext(name)[1].lower()
    return ext in IMAGE_EXTS or ext in UNSUPPORTED_EXTS


def _count_images(folder: Path) -> int:
    return sum(1 for _, _, files in os.walk(folder) for n in files if _is_image_name(n))


def list_images(root: Path, exclude: Path | None = None) -> ListedImages:
    """Image files under ``root`` (or ``root`` itself if it is a file), recursively, sorted by
    relative POSIX path; hidden files and folders skipped, and so are the ``exclude`` folder (the
    output) and every folder an xaicli run wrote (outputs.is_output_folder), counted apart."""
    if not root.exists():
        raise InputError(f"input not found: {root}", "pass an existing folder or image file")
    if root.is_file():
        return ListedImages([ImageEntry(root.resolve(), root.name)], 0)
    root = root.resolve()
    excl = exclude.resolve() if exclude is not None else None
    listed = ListedImages([], 0)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        keep = []
        for n in sorted(dirnames):
            if n.startswith("."):
                continue
            if (d / n) == excl or is_output_folder(d / n):
                listed.output_folders.append((d / n).relative_to(root).as_posix())
                listed.skipped_outputs += _count_images(d / n)
            else:
                keep.append(n)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            if _is_image_name(name):
                p = d / name
                listed.entries.append(ImageEntry(p, p.relative_to(root).as_posix()))
            else:
                listed.ignored += 1
    listed.entries.sort(key=lambda e: e.rel)
    return listed


class DecodeError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def to_rgb(im: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB: alpha composited on white, 16-bit and float scaled, CMYK etc.
    converted by PIL."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        hi = float(np.nanmax(a)) if a.size else 0.0
        if mode == "F" and hi <= 1.0:
            a = a * 255.0
        elif mode.startswith("I;16") or 255.0 < hi <= 65535.0:
            a = a / 257.0
        elif hi > 65535.0:
            lo = float(np.nanmin(a))
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


@dataclass(frozen=True)
class DecodeLimits:
    """config.InputConfig as the decoder needs it (see there)."""

    max_pixels: int = 178_956_970
    decode_pixels: int = 0  # 0: full resolution


def decode_image(path: Path, limits: DecodeLimits | None = None) -> Tensor:
    """uint8 (3, H, W) RGB with EXIF orientation applied; DecodeError with a reason otherwise."""
    return load_image(path, limits)[0]


def load_image(path: Path, limits: DecodeLimits | None = None) -> tuple[Tensor, tuple[int, int]]:
    """(uint8 (3, h, w) RGB with EXIF orientation applied, the image's own (H, W) so oriented).
    Images above ``limits.max_pixels`` are refused (``too_large``); images above
    ``limits.decode_pixels`` come reduced to about that many pixels, so (h, w) may be smaller
    than (H, W). DecodeError with a reason for anything that cannot be read."""
    limits = limits or DecodeLimits()
    ext = path.suffix.lower()
    if ext in UNSUPPORTED_EXTS:
        raise DecodeError("unsupported", f"unsupported image format {ext!r}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DecodeError("unreadable", f"cannot read file: {e.strerror or e}") from None
    if size == 0:
        raise DecodeError("empty", "empty file (0 bytes)")
    try:
        with _pillow_limit(limits.max_pixels), Image.open(path) as im:
            h, w = _check_size(im, limits.max_pixels)
            _draft(im, limits.decode_pixels)
            im.load()
            loaded = im.size
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block must not lose the image
                pass
            original = (w, h) if im.size != loaded else (h, w)  # turned by a quarter: as oriented
            rgb = _reduce(to_rgb(im), limits.decode_pixels)
            arr = np.array(rgb, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("too_large", f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("decode", "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError("decode", f"corrupt or truncated image: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DecodeError("decode", f"unexpected decoded shape {arr.shape}")
    if not (limits.decode_pixels and original[0] * original[1] > limits.decode_pixels):
        original = (arr.shape[0], arr.shape[1])  # not reduced: the image as decoded is the image
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), original


@contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that, a
    global that cannot be set per image) off for the duration: ``_check_size`` refuses above
    ``max_pixels`` from the header, before anything is decoded, with our message."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_size(im: Image.Image, max_pixels: int) -> tuple[int, int]:
    """The image's (H, W) before orientation, refused above ``max_pixels``."""
    w, h = im.size
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h / 1e6:.1f} MP is above input.max_pixels "
                                       f"({max_pixels / 1e6:.1f} MP): raise it in the config to read this image")
    return (h, w)


def _fit(w: int, h: int, pixels: int) -> tuple[int, int]:
    """(w, h) scaled to at most ``pixels`` pixels, aspect kept."""
    s = math.sqrt(pixels / (w * h))
    return max(1, int(w * s)), max(1, int(h * s))


def _draft(im: Image.Image, decode_pixels: int) -> None:
    """A JPEG above ``decode_pixels`` is decoded at 1/2, 1/4 or 1/8 scale (the DCT's own
    reduction: a fraction of the memory and time), at least the size ``_reduce`` then makes."""
    w, h = im.size
    if decode_pixels and w * h > decode_pixels and im.format == "JPEG":
        im.draft("RGB", _fit(w, h, decode_pixels))


def _reduce(im: Image.Image, decode_pixels: int) -> Image.Image:
    """An image still above ``decode_pixels`` resized (area average) to fit it."""
    w, h = im.size
    if not decode_pixels or w * h <= decode_pixels:
        return im
    return im.resize(_fit(w, h, decode_pixels), Image.Resampling.BOX)


class ImageFolder(Dataset[dict[str, Any]]):
    """Items: {index, rel, ok, error, image (uint8 3xHxW), x (float 3xhxw)}."""

    def __init__(self, entries: list[ImageEntry], preprocess: Preprocess, limits: DecodeLimits | None = None) -> None:
        self.entries = entries
        self.preprocess = preprocess
        self.limits = limits or DecodeLimits()
        # Imported here, in the parent, so forked loader workers inherit it: otherwise each worker
        # imports torchvision (with torch._dynamo, ~2 s) before its first image.
        import torchvision.transforms.v2.functional  # noqa: F401

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        item: dict[str, Any] = {"index": i, "rel": e.rel, "ok": False, "error": None}
        try:
            image, original = load_image(e.path, self.limits)
            x = self.preprocess(image)
        except DecodeError as err:
            item["error"] = {"type": err.kind, "message": err.message}
            return item
        except Exception as err:  # preprocessing of an odd image: report, never crash the run
            item["error"] = {"type": "preprocess", "message": f"{type(err).__name__}: {err}"}
            return item
        item.update(ok=True, image=image, x=x, size=original)
        return item


@dataclass
class LoadFailure:
    """An image of the batch that could not be read or preprocessed."""

    rel: str
    index: int
    kind: str  # decode, unsupported, empty, unreadable, too_large, preprocess
    message: str


@dataclass
class LoadedBatch:
    """What the loader hands the run: the images that loaded (model inputs and originals) and
    the ones that did not."""

    x: Tensor | None  # (B, 3, h, w) model inputs; None when no image of the batch loaded
    images: list[Tensor]  # uint8 (3, H, W) originals
    rels: list[str]
    indices: list[int]
    errors: list[LoadFailure]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) of each image as stored (may be > images')

    @property
    def size(self) -> int:
        return len(self.rels)

    def select(self, sl: slice) -> LoadedBatch:
        """The loaded images ``sl`` (a sub-batch), without the failures."""
        assert self.x is not None
        return LoadedBatch(self.x[sl], self.images[sl], self.rels[sl], self.indices[sl], [], self.sizes[sl])

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locked copies for async transfers."""
        x = self.x.pin_memory() if self.x is not None else None
        return LoadedBatch(x, [im.pin_memory() for im in self.images], self.rels, self.indices, self.errors,
                           self.sizes)


def collate(items: list[dict[str, Any]]) -> LoadedBatch:
    ok = [it for it in items if it["ok"]]
    return LoadedBatch(
        x=torch.stack([it["x"] for it in ok]) if ok else None,
        images=[it["image"] for it in ok],
        rels=[it["rel"] for it in ok],
        indices=[it["index"] for it in ok],
        errors=[LoadFailure(it["rel"], it["index"], it["error"]["type"], it["error"]["message"])
                for it in items if not it["ok"]],
        sizes=[it["size"] for it in ok],
    )


def worker_init(_: int) -> None:
    # One thread per worker: the workers are the parallelism; oversubscription slows everything.
    torch.set_num_threads(1)
