"""What a metric may need beyond the batch: where each model input came from in its original
image, and the image's ground truth mapped into the model input's frame.

The run builds one :class:`MetricContext` per batch (host metadata plus small device tensors;
``ground_truth.build_context``) and passes it to the metrics. Metrics never read files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass
class GroundTruthBatch:
    """Ground truth of a batch. Images without ground truth have ``present`` False; their rows hold
    zeros (masks), +inf (distance) and NaN (boxes)."""

    present: Tensor  # (B,) bool on the device
    masks: Tensor  # (B, H, W) bool: the object region, sampled into the model input's frame
    distance: Tensor  # (B, H, W) float32: distance in ORIGINAL pixels to the nearest object pixel
    boxes: np.ndarray  # (B, G, 4) float64 [x0, y0, x1, y1] inclusive, original pixels, NaN-padded


@dataclass
class MetricContext:
    rels: list[str]  # each image's path relative to the input root
    sizes: np.ndarray  # (B, 2) original (height, width)
    windows: np.ndarray  # (B, 4) (top, left, height, width) of the original that the input shows
    gt: GroundTruthBatch | None = None


def sample_window(arr: np.ndarray, window: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour sampling of an original-frame array (h, w) into a (H, W) frame that shows
    ``window`` (top, left, height, width): input pixel (i, j) takes the original pixel under its
    centre. This is the geometry of :meth:`Preprocess.window` (resize, then centre crop)."""
    top, left, wh, ww = (float(v) for v in window)
    hh, ww_in = size
    h, w = arr.shape[:2]
    ys = np.floor(top + (np.arange(hh) + 0.5) * wh / hh).astype(np.int64).clip(0, h - 1)
    xs = np.floor(left + (np.arange(ww_in) + 0.5) * ww / ww_in).astype(np.int64).clip(0, w - 1)
    return arr[ys[:, None], xs[None, :]]


def boxes_to_original(boxes: np.ndarray, windows: np.ndarray, sizes: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Inclusive pixel boxes (B, ..., 4) in a (H, W) frame showing ``windows`` -> inclusive boxes in
    each original image, clipped to it. Frame column c covers original x in
    [left + c*sx, left + (c+1)*sx), sx = window width / W; a box keeps every original pixel its
    frame pixels touch. NaN boxes stay NaN."""
    hh, ww = frame
    b = boxes.shape[0]
    shape = (b,) + (1,) * (boxes.ndim - 2)
    top = windows[:, 0].reshape(shape)
    left = windows[:, 1].reshape(shape)
    sy = (windows[:, 2] / hh).reshape(shape)
    sx = (windows[:, 3] / ww).reshape(shape)
    eps = 1e-6
    x0 = np.floor(left + boxes[..., 0] * sx + eps)
    y0 = np.floor(top + boxes[..., 1] * sy + eps)
    x1 = np.ceil(left + (boxes[..., 2] + 1) * sx - eps) - 1
    y1 = np.ceil(top + (boxes[..., 3] + 1) * sy - eps) - 1
    hmax = (sizes[:, 0] - 1).reshape(shape).astype(np.float64)
    wmax = (sizes[:, 1] - 1).reshape(shape).astype(np.float64)
    out = np.stack([np.clip(x0, 0, wmax), np.clip(y0, 0, hmax), np.clip(x1, 0, wmax), np.clip(y1, 0, hmax)], -1)
    return np.where(np.isnan(boxes), np.nan, out)
