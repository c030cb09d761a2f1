"""The input side: a deterministic walk of the folder, safe decoding to RGB, and a Dataset whose
workers decode and preprocess. A file that cannot be read becomes an error item, never an
exception that stops the run."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .errors import InputError
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


def list_images(root: Path, exclude: Path | None = None) -> ListedImages:
    """Image files under ``root`` (or ``root`` itself if it is a file), recursively, sorted by
    relative POSIX path; hidden files and folders and the ``exclude`` folder (the output) skipped."""
    if not root.exists():
        raise InputError(f"input not found: {root}", "pass an existing folder or image file")
    if root.is_file():
        return ListedImages([ImageEntry(root.resolve(), root.name)], 0)
    root = root.resolve()
    excl = exclude.resolve() if exclude is not None else None
    found: list[ImageEntry] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (excl is None or (d / n) != excl))
        for name in filenames:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTS or ext in UNSUPPORTED_EXTS:
                p = d / name
                found.append(ImageEntry(p, p.relative_to(root).as_posix()))
            else:
                ignored += 1
    found.sort(key=lambda e: e.rel)
    return ListedImages(found, ignored)


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


def decode_image(path: Path) -> Tensor:
    """uint8 (3, H, W) RGB with EXIF orientation applied; DecodeError with a reason otherwise."""
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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a broken EXIF block must not lose the image
                    pass
                rgb = to_rgb(im)
                arr = np.array(rgb, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("too_large", f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("decode", "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError("decode", f"corrupt or truncated image: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DecodeError("decode", f"unexpected decoded shape {arr.shape}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset[dict[str, Any]]):
    """Items: {index, rel, ok, error, image (uint8 3xHxW), x (float 3xhxw)}."""

    def __init__(self, entries: list[ImageEntry], preprocess: Preprocess) -> None:
        self.entries = entries
        self.preprocess = preprocess
        # Imported here, in the parent, so forked loader workers inherit it: otherwise each worker
        # imports torchvision (with torch._dynamo, ~2 s) before its first image.
        import torchvision.transforms.v2.functional  # noqa: F401

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        item: dict[str, Any] = {"index": i, "rel": e.rel, "ok": False, "error": None}
        try:
            image = decode_image(e.path)
            x = self.preprocess(image)
        except DecodeError as err:
            item["error"] = {"type": err.kind, "message": err.message}
            return item
        except Exception as err:  # preprocessing of an odd image: report, never crash the run
            item["error"] = {"type": "preprocess", "message": f"{type(err).__name__}: {err}"}
            return item
        item.update(ok=True, image=image, x=x)
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

    @property
    def size(self) -> int:
        return len(self.rels)

    def select(self, sl: slice) -> LoadedBatch:
        """The loaded images ``sl`` (a sub-batch), without the failures."""
        assert self.x is not None
        return LoadedBatch(self.x[sl], self.images[sl], self.rels[sl], self.indices[sl], [])

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locked copies for async transfers."""
        x = self.x.pin_memory() if self.x is not None else None
        return LoadedBatch(x, [im.pin_memory() for im in self.images], self.rels, self.indices, self.errors)


def collate(items: list[dict[str, Any]]) -> LoadedBatch:
    ok = [it for it in items if it["ok"]]
    return LoadedBatch(
        x=torch.stack([it["x"] for it in ok]) if ok else None,
        images=[it["image"] for it in ok],
        rels=[it["rel"] for it in ok],
        indices=[it["index"] for it in ok],
        errors=[LoadFailure(it["rel"], it["index"], it["error"]["type"], it["error"]["message"])
                for it in items if not it["ok"]],
    )


def worker_init(_: int) -> None:
    # One thread per worker: the workers are the parallelism; oversubscription slows everything.
    torch.set_num_threads(1)
