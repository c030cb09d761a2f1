"""The training data: an ImageFolder layout (one folder per class) split into training and
validation images, and the loaders of one epoch.

``DIR/train/<class>/...`` with ``DIR/val/<class>/...`` is used as it is (``xai synth`` writes it);
``DIR/<class>/...`` (or ``DIR/train/`` without ``val/``) is split per class with a seeded draw.

Every random choice depends only on (seed, epoch, image): the order of an epoch comes from a
generator seeded by (seed, epoch), each image's crop and flip from one seeded by (seed, epoch,
its path). So an epoch can be replayed exactly from any batch on (``--resume``), with any number
of loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data import DecodeError, ImageEntry, decode_image, list_images, worker_init
from ..errors import InputError
from ..methods.batch import stable_seed
from ..preprocess import Preprocess


@dataclass(frozen=True)
class Sample:
    entry: ImageEntry  # rel is relative to the data folder (train/cat/a.jpg)
    label: int


@dataclass(frozen=True)
class Split:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str  # "val/ folder" or "seeded split (fraction 0.2, seed 0)"


def _class_dirs(root: Path, exclude: Path | None) -> list[Path]:
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (exclude is None or p.resolve() != exclude))


def _samples(root: Path, data: Path, classes: list[str], exclude: Path | None) -> list[Sample]:
    out = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for e in list_images(folder, exclude=exclude).entries:
            out.append(Sample(ImageEntry(e.path, e.path.relative_to(data.resolve()).as_posix()), label))
    return out


def find_split(data: Path, val_fraction: float, seed: int, exclude: Path | None = None) -> Split:
    """The classes (sorted folder names) and the training and validation images of ``data``."""
    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder", "give a folder with one sub-folder of images per class")
    excl = exclude.resolve() if exclude is not None else None
    root = data / "train" if (data / "train").is_dir() else data
    classes = [p.name for p in _class_dirs(root, excl)]
    if len(classes) < 2:
        raise InputError(f"--data {data}: found {len(classes)} class folder(s) in {root}; need at least 2",
                         "lay the images out as DIR/<class>/*.jpg or DIR/train/<class>/*.jpg (+ DIR/val/<class>/)")
    train = _samples(root, data, classes, excl)
    empty = [c for i, c in enumerate(classes) if not any(s.label == i for s in train)]
    if empty:
        raise InputError(f"--data {data}: no images in class folder(s) {', '.join(empty)}",
                         "remove empty folders or add images")
    val_root = data / "val"
    if root != data and val_root.is_dir():
        extra = sorted(p.name for p in _class_dirs(val_root, excl) if p.name not in classes)
        if extra:
            raise InputError(f"--data {data}: val/ has classes that train/ lacks: {', '.join(extra)}",
                             "every validation class needs training images")
        val = _samples(val_root, data, classes, excl)
        if not val:
            raise InputError(f"--data {data}: val/ holds no images of the training classes")
        return Split(classes, train, val, "val/ folder")
    return _seeded_split(classes, train, val_fraction, seed)


def _seeded_split(classes: list[str], samples: list[Sample], fraction: float, seed: int) -> Split:
    """Per class, a seeded draw of ceil(fraction * n) validation images (at least one, and at
    least one left for training)."""
    g = torch.Generator().manual_seed(stable_seed(seed, "split"))
    train: list[Sample] = []
    val: list[Sample] = []
    for label, name in enumerate(classes):
        mine = [s for s in samples if s.label == label]
        if len(mine) < 2:
            raise InputError(f"class {name!r} has {len(mine)} image: too few to split into training and validation",
                             "add images, or give a val/ folder beside train/")
        k = min(len(mine) - 1, max(1, math.ceil(fraction * len(mine))))
        picked = set(torch.randperm(len(mine), generator=g)[:k].tolist())
        val += [s for i, s in enumerate(mine) if i in picked]
        train += [s for i, s in enumerate(mine) if i not in picked]
    return Split(classes, train, val, f"seeded split (fraction {fraction}, seed {seed})")


# --------------------------------------------------------------------------------------------
# Augmentation


@dataclass(frozen=True)
class Augment:
    """Random resized crop (area ``scale``, aspect ratio 3/4..4/3) to the model's input size and a
    random horizontal flip: the standard ImageNet training augmentation."""

    size: tuple[int, int]
    scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True

    def __call__(self, image: Tensor, g: torch.Generator) -> Tensor:
        """uint8 (3, H, W) -> uint8 (3, h, w)."""
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = self.window(image.shape[1], image.shape[2], g)
        out = F.resized_crop(image, top, left, h, w, list(self.size), antialias=True)
        if self.flip and torch.rand((), generator=g).item() < 0.5:
            out = out.flip(-1)
        return out

    def window(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop: ten tries at a random area and aspect ratio, then the
        whole image (torchvision's RandomResizedCrop rule, drawn from ``g``)."""
        area = height * width
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            u = torch.rand(4, generator=g).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        return 0, 0, height, width


class TrainImages(Dataset[dict[str, Any]]):
    """Items {index, label, ok, x, rel, error}: augmented for training (``augment``), else the
    run's preprocessing (validation). An unreadable image is an item with ok False."""

    def __init__(self, samples: list[Sample], preprocess: Preprocess, augment: Augment | None, seed: int) -> None:
        self.samples = samples
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        import torchvision.transforms.v2.functional  # noqa: F401  (imported before the workers fork)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        item: dict[str, Any] = {"index": i, "label": s.label, "rel": s.entry.rel, "ok": False, "error": None}
        try:
            image = decode_image(s.entry.path)
            if self.augment is not None:
                g = torch.Generator().manual_seed(stable_seed(self.seed, f"{self.epoch}:{s.entry.rel}"))
                x = self._normalise(self.augment(image, g))
            else:
                x = self.preprocess(image)
        except DecodeError as e:
            item["error"] = e.message
            return item
        except Exception as e:  # an odd image: skipped and reported, never the end of training
            item["error"] = f"{type(e).__name__}: {e}"
            return item
        item.update(ok=True, x=x)
        return item

    def _normalise(self, image: Tensor) -> Tensor:
        x = image.float().div_(255.0)
        mean = torch.tensor(self.preprocess.mean)[:, None, None]
        std = torch.tensor(self.preprocess.std)[:, None, None]
        return (x - mean) / std


@dataclass
class LoadedBatch:
    x: Tensor | None  # (B, 3, h, w); None when no image of the batch could be read
    labels: Tensor
    failed: dict[str, str]  # rel -> reason


def collate(items: list[dict[str, Any]]) -> LoadedBatch:
    ok = [it for it in items if it["ok"]]
    return LoadedBatch(
        x=torch.stack([it["x"] for it in ok]) if ok else None,
        labels=torch.tensor([it["label"] for it in ok], dtype=torch.long),
        failed={it["rel"]: it["error"] for it in items if not it["ok"]},
    )


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of indices of one training epoch: a permutation seeded by (seed, epoch), cut
    into batches; a last batch of one image is dropped (batch norm cannot train on it)."""
    g = torch.Generator().manual_seed(stable_seed(seed, f"order:{epoch}"))
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def loader(dataset: TrainImages, batches: list[list[int]], workers: int, pin: bool) -> DataLoader[LoadedBatch]:
    workers = workers if len(batches) > 1 else 0
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, pin_memory=pin,
                      worker_init_fn=worker_init if workers else None, persistent_workers=False)
