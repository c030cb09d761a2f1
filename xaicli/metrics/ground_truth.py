"""Ground truth for the localization metrics: object masks or boxes, found per image by its
path relative to the input root.

Two sources (config ``ground_truth:`` or ``xai explain --ground-truth PATH``):

* ``masks: DIR`` mirrors the input tree: the mask of ``cats/a.jpg`` is ``DIR/cats/a.<any image
  extension>``. Nonzero pixels are the object (any colour channel; palette images by index;
  alpha ignored). A mask of another size is resized to the image's (nearest neighbour). The
  ground-truth boxes of a mask are the bounding boxes of its 8-connected components.
* ``boxes: FILE``: CSV rows ``path,x0,y0,x1,y1[,label]`` (a header row is allowed; several rows per
  image) or JSON ``{"path": [[x0, y0, x1, y1], ...]}``. ``path`` is the image's relative path,
  with or without its extension. Corners are 0-based and **inclusive** pixel indices in the
  original image (the box covers columns x0..x1). The object region is the union of the boxes.
  Labels are read but not matched to the explained class (GT-known localization).

Images without ground truth (or with an empty mask) get null localization scores, not errors.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from ..preprocess import Preprocess
from .context import GroundTruthBatch, MetricContext, sample_window

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jpg", ".jpeg", ".pgm", ".ppm")


def _key(path: str) -> str:
    p = path.strip().replace("\\", "/")
    return p[2:] if p.startswith("./") else p


def _stem(rel: str) -> str:
    p = PurePosixPath(_key(rel))
    return str(p.with_suffix("")) if p.suffix else str(p)


@dataclass
class GroundTruth:
    """An index from image path to its mask file or boxes; files are read per batch."""

    source: str
    masks: dict[str, Path] = field(default_factory=dict)  # image stem -> mask file
    boxes: dict[str, np.ndarray] = field(default_factory=dict)  # image rel or stem -> (G, 4)

    @staticmethod
    def from_masks(folder: str | Path) -> GroundTruth:
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"ground_truth.masks: {folder} is not a folder",
                              "give a folder of masks that mirrors the input tree")
        index: dict[str, Path] = {}
        rank = {e: i for i, e in enumerate(MASK_EXTENSIONS)}
        for p in sorted(root.rglob("*")):
            ext = p.suffix.lower()
            if ext not in rank or not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            key = p.relative_to(root).with_suffix("").as_posix()
            # Two masks for one image (a.png, a.jpg): the lossless format wins.
            if key not in index or rank[ext] < rank[index[key].suffix.lower()]:
                index[key] = p
        if not index:
            raise ConfigError(f"ground_truth.masks: no mask images in {folder}",
                              "supported: " + ", ".join(e.lstrip(".") for e in MASK_EXTENSIONS))
        return GroundTruth(source=f"masks:{root}", masks=index)

    @staticmethod
    def from_boxes(file: str | Path) -> GroundTruth:
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"ground_truth.boxes: {file} is not a file", "give a CSV or JSON file of boxes")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"ground_truth.boxes: cannot read {file}: {e}") from None
        rows: dict[str, list[list[float]]] = {}
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"ground_truth.boxes: {file} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"ground_truth.boxes: {file} must map image paths to lists of boxes")
            for key, boxes in data.items():
                if (isinstance(boxes, list) and len(boxes) == 4
                        and all(isinstance(v, (int, float)) for v in boxes)):
                    boxes = [boxes]  # one box given without the outer list
                if not isinstance(boxes, list):
                    raise ConfigError(f"ground_truth.boxes: {key!r}: expected a list of [x0, y0, x1, y1]")
                for b in boxes:
                    rows.setdefault(str(key), []).append(_box(b, f"{file}: {key!r}"))
        else:
            for n, rec in enumerate(csv.reader(text.splitlines()), 1):
                if not rec or not "".join(rec).strip() or rec[0].lstrip().startswith("#"):
                    continue
                if n == 1 and not _is_number(rec[1] if len(rec) > 1 else ""):
                    continue  # header
                if len(rec) < 5:
                    raise ConfigError(f"ground_truth.boxes: {file} line {n}: expected path,x0,y0,x1,y1[,label]")
                rows.setdefault(rec[0].strip(), []).append(_box(rec[1:5], f"{file} line {n}"))
        if not rows:
            raise ConfigError(f"ground_truth.boxes: no boxes in {file}")
        index: dict[str, np.ndarray] = {}
        for key, bs in rows.items():
            arr = np.asarray(bs, dtype=np.float64).reshape(-1, 4)
            index[_key(key)] = arr
        for key in list(index):  # also findable by the stem (an image listed as a.png, stored as a.jpg)
            index.setdefault(_stem(key), index[key])
        return GroundTruth(source=f"boxes:{p}", boxes=index)

    def _lookup(self, rel: str) -> Path | np.ndarray | None:
        stem = _stem(rel)
        if self.masks:
            return self.masks.get(stem)
        hit = self.boxes.get(_key(rel))
        return hit if hit is not None else self.boxes.get(stem)

    def boxes_for(self, rel: str, height: int, width: int) -> np.ndarray | None:
        """The object boxes (G, 4) of one image in its pixels (a mask's: its components' boxes);
        None when it has no ground truth (for pictures; metrics read whole batches)."""
        hit = self._lookup(rel)
        if hit is None:
            return None
        if isinstance(hit, Path):
            return mask_boxes(read_mask(hit, height, width))
        return hit

    def batch(self, rels: list[str], sizes: np.ndarray, windows: np.ndarray, input_size: tuple[int, int],
              device: torch.device) -> GroundTruthBatch:
        """Read and map the ground truth of a batch (host step: file reads, per-image resize,
        distance transform), then move the input-frame tensors to the device."""
        import cv2

        hh, ww = input_size
        b = len(rels)
        present = np.zeros(b, dtype=bool)
        masks = np.zeros((b, hh, ww), dtype=bool)
        dist = np.full((b, hh, ww), np.inf, dtype=np.float32)
        box_lists: list[np.ndarray] = []
        for i, rel in enumerate(rels):
            h, w = int(sizes[i, 0]), int(sizes[i, 1])
            found = self._lookup(rel)
            if found is None:
                box_lists.append(np.zeros((0, 4)))
                continue
            if isinstance(found, Path):
                mask = read_mask(found, h, w)
                boxes = mask_boxes(mask)
            else:
                boxes = found
                mask = boxes_mask(boxes, h, w)
            if not mask.any():
                box_lists.append(np.zeros((0, 4)))
                continue
            present[i] = True
            masks[i] = sample_window(mask, windows[i], input_size)
            outside = (~mask).astype(np.uint8)
            d = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            dist[i] = sample_window(d, windows[i], input_size)
            box_lists.append(boxes)
        g = max([len(x) for x in box_lists] + [1])
        padded = np.full((b, g, 4), np.nan)
        for i, bx in enumerate(box_lists):
            padded[i, : len(bx)] = bx
        return GroundTruthBatch(
            present=torch.from_numpy(present).to(device),
            masks=torch.from_numpy(masks).to(device),
            distance=torch.from_numpy(dist).to(device),
            boxes=padded,
        )


def build_context(
    rels: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    preprocess: Preprocess,
    ground_truth: GroundTruth | None,
    device: torch.device,
) -> MetricContext:
    """The context of one batch; reads ground-truth files (host I/O, outside metric functions)."""
    sz = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    windows = np.asarray([preprocess.window(int(h), int(w)) for h, w in sz], dtype=np.float64).reshape(-1, 4)
    gt = None
    if ground_truth is not None:
        gt = ground_truth.batch(list(rels), sz, windows, preprocess.input_size, device)
    return MetricContext(list(rels), sz, windows, gt)


def load_ground_truth(masks: str | None, boxes: str | None) -> GroundTruth | None:
    if masks and boxes:
        raise ConfigError("ground_truth: give either masks or boxes, not both")
    if masks:
        return GroundTruth.from_masks(masks)
    if boxes:
        return GroundTruth.from_boxes(boxes)
    return None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _box(values: object, where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ConfigError(f"ground_truth.boxes: {where}: expected 4 numbers x0, y0, x1, y1, got {values!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"ground_truth.boxes: {where}: expected numbers, got {values!r}") from None
    if x1 < x0 or y1 < y0:
        raise ConfigError(f"ground_truth.boxes: {where}: need x0 <= x1 and y0 <= y1, got {values!r}",
                          "corners are inclusive pixel indices [x0, y0, x1, y1]")
    return [x0, y0, x1, y1]


def read_mask(path: Path, height: int, width: int) -> np.ndarray:
    """A mask file -> (height, width) bool, nonzero = object."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "1", "I", "I;16", "F"):
                arr = np.asarray(im) != 0
            else:
                a = np.asarray(im.convert("RGBA") if im.mode not in ("RGB", "RGBA") else im)
                arr = (a[..., :3] != 0).any(-1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"ground-truth mask {path} cannot be read: {e}") from None
    if arr.shape != (height, width):
        import cv2

        arr = cv2.resize(arr.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return arr


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Inclusive boxes (K, 4) of the 8-connected components of a bool mask."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    s = stats[1:n].astype(np.float64)
    return np.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 2] - 1, s[:, 1] + s[:, 3] - 1], 1).reshape(-1, 4)


def boxes_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The union of inclusive boxes as a (height, width) bool mask (clipped to the image)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        xa, ya = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        xb, yb = min(int(np.ceil(x1)), width - 1), min(int(np.ceil(y1)), height - 1)
        if xb >= xa and yb >= ya:
            mask[ya : yb + 1, xa : xb + 1] = True
    return mask
