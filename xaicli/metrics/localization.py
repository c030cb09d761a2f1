"""Localization: boxes from maps and agreement with ground truth.

* ``boxes`` (Zhou et al., CAM, CVPR 2016): keep the pixels whose value is above a fraction of the
  map's maximum (strictly, default 0.2), take the bounding box of the largest 8-connected component
  and map it to the original image's pixels. One box per threshold.
* ``pointing_game`` (Zhang et al., Excitation Backprop, ECCV 2016): a hit when a pixel holding the
  map's maximum lies within ``tolerance`` original pixels (default 15, as in the paper) of the object.
  Ties: any maximal pixel may hit (as Quantus); an all-zero map is a miss.
* ``energy`` (Wang et al., Score-CAM, CVPRW 2020; "relevance mass accuracy"): the share of the
  non-negative map's sum inside the object. An all-zero map scores 0.
* ``box_iou``: the best IoU between the map's box(es) and any ground-truth box, at ``threshold``,
  and at every threshold of a grid (``box_iou_curve``) from which the run gets MaxBoxAcc (Choe et
  al., CVPR 2020): the best over thresholds of the share of images whose IoU >= delta (V1: delta 0.5;
  V2: the mean over 0.3/0.5/0.7). With ``components: all`` every component's box competes (the
  paper's V2 protocol); by default only the largest does (the CAM rule, V1).

Boxes are ``[x0, y0, x1, y1]`` with **inclusive** 0-based pixel corners (the wsolevaluation
convention; IoU counts pixels, so it has +1 terms). Maps arrive at the model input's size; boxes are
found there and then mapped to each original image through the preprocessing window (resize and
centre crop), keeping every original pixel a box pixel touches.

Host step: connected components (OpenCV) run per image and threshold on the host, on the small
input-size map; everything else is vectorised over the batch. Images without ground truth get NaN
(null in scores.jsonl).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..config import non_negative
from ..methods.batch import Batch
from . import register
from .context import MetricContext, boxes_to_original


def _thresholds(v: tuple[float, ...]) -> str | None:
    if not v:
        return "needs at least one threshold"
    return None if all(0 <= t < 1 for t in v) else "thresholds must be fractions in [0, 1)"


def _below_one(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be a fraction in [0, 1)"


def _interval(v: float) -> str | None:
    return None if 0 < v <= 0.5 else "must be in (0, 0.5]"


def _deltas(v: tuple[float, ...]) -> str | None:
    return None if v and all(0 < d <= 1 for d in v) else "IoU bounds must be in (0, 1]"


def _delta(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class BoxesParams:
    thresholds: tuple[float, ...] = field(default=(0.2,), metadata={"check": _thresholds})
    draw: bool = False  # draw the boxes on the overlays


@dataclass(frozen=True)
class PointingParams:
    tolerance: float = field(default=15.0, metadata={"check": non_negative})  # original pixels


@dataclass(frozen=True)
class EnergyParams:
    """The energy-based pointing game has no knobs."""


@dataclass(frozen=True)
class BoxIouParams:
    threshold: float = field(default=0.2, metadata={"check": _below_one})
    components: Literal["largest", "all"] = "largest"
    curve_interval: float = field(default=0.01, metadata={"check": _interval})  # MaxBoxAcc threshold grid
    delta: float = field(default=0.5, metadata={"check": _delta})  # MaxBoxAcc (V1) IoU bound
    deltas: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={"check": _deltas})  # MaxBoxAccV2


# --------------------------------------------------------------------------------------------
# Boxes


def threshold_grid(interval: float) -> np.ndarray:
    """0, interval, 2*interval, ... below 1 (wsolevaluation's cam_curve_interval grid)."""
    n = max(1, math.ceil(1.0 / interval - 1e-9))
    return np.round(np.arange(n) * interval, 10)


def component_boxes(maps: Tensor, thresholds: Sequence[float], largest: bool = True) -> np.ndarray:
    """Inclusive boxes (B, T, K, 4) in the maps' own (H, W) frame, NaN-padded: for each image and
    threshold t, the bounding boxes of the 8-connected components of ``map > t * max(map)`` (the
    largest by pixel count when ``largest``; ties: the larger sum of map values, then the first in
    raster order). A map whose maximum is <= 0 has no box.

    Host step (documented exception to "no per-image loops"): OpenCV connected components per
    image and threshold, on the small map copied to the host once."""
    import cv2

    m = maps.detach().float().cpu().numpy()
    b = m.shape[0]
    peak = m.reshape(b, -1).max(1) if m.size else np.zeros(b)
    found: list[list[np.ndarray]] = []
    for i in range(b):
        row = []
        for t in thresholds:
            if not peak[i] > 0:
                row.append(np.zeros((0, 4)))
                continue
            binary = (m[i] > t * peak[i]).astype(np.uint8)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            s = stats[1:n].astype(np.float64)
            if largest and len(s) > 1:
                # Most pixels; ties: most map mass, then the first in raster order.
                mass = np.bincount(labels.ravel(), weights=m[i].ravel(), minlength=n)[1:n]
                s = s[[int(np.lexsort((-np.arange(len(s)), mass, s[:, 4]))[-1])]]
            row.append(np.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 2] - 1, s[:, 1] + s[:, 3] - 1], 1).reshape(-1, 4))
        found.append(row)
    k = max([len(bx) for row in found for bx in row] + [1])
    out = np.full((b, len(thresholds), k, 4), np.nan)
    for i, row in enumerate(found):
        for j, bx in enumerate(row):
            out[i, j, : len(bx)] = bx
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive-corner boxes [..., 4], broadcasting; NaN where either box is NaN.
    (wsolevaluation test vector: [1, 2, 5, 6] vs [3, 1, 4, 5] -> 8/27.)"""
    ix = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    iy = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def max_box_acc(curves: np.ndarray, thresholds: np.ndarray, delta: float) -> tuple[float, float]:
    """MaxBoxAcc(delta) over images' IoU-by-threshold curves (N, T): the best over thresholds of
    the share of images with IoU >= delta, and the threshold reaching it (the first on ties)."""
    acc = (np.asarray(curves) >= delta).mean(0)
    j = int(np.argmax(acc))
    return float(acc[j]), float(thresholds[j])


def _to(x: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=like.device, dtype=torch.float32)


@register("boxes", summary="CAM boxes: largest component above a fraction of the map max, in image pixels",
          params=BoxesParams, outputs=("boxes",), draws="boxes")
def boxes(batch: Batch, maps: Tensor, p: BoxesParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``boxes`` (B, T, 4): one inclusive [x0, y0, x1, y1] per threshold in original pixels, NaN when
    no pixel is above the threshold."""
    frame = (int(maps.shape[-2]), int(maps.shape[-1]))
    found = component_boxes(maps, p.thresholds, largest=True)[:, :, 0]
    return {"boxes": _to(boxes_to_original(found, ctx.windows, ctx.sizes, frame), maps)}


@register("pointing_game", summary="Pointing game: the map's maximum within 15 px of the object (needs ground truth)",
          params=PointingParams, outputs=("pointing_hit",), ground_truth=True)
def pointing_game(batch: Batch, maps: Tensor, p: PointingParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``pointing_hit`` (B,): 1 hit, 0 miss, NaN without ground truth."""
    gt = ctx.gt
    assert gt is not None
    m = _input_frame(maps, gt.masks)
    peak = m.flatten(1).amax(1)
    at_peak = m == peak[:, None, None]
    near = gt.distance <= p.tolerance
    hit = ((at_peak & near).flatten(1).any(1) & (peak > 0)).float()
    return {"pointing_hit": torch.where(gt.present, hit, torch.full_like(hit, math.nan))}


@register("energy", summary="Energy-based pointing game: share of the map's energy inside the object (needs ground truth)",
          params=EnergyParams, outputs=("energy",), ground_truth=True)
def energy(batch: Batch, maps: Tensor, p: EnergyParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``energy`` (B,) in [0, 1]: sum(map * object) / sum(map) on the non-negative map; NaN
    without ground truth, 0 for an all-zero map."""
    gt = ctx.gt
    assert gt is not None
    m = _input_frame(maps, gt.masks).clamp_min(0)
    total = m.flatten(1).sum(1)
    inside = (m * gt.masks).flatten(1).sum(1)
    e = torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))
    return {"energy": torch.where(gt.present, e, torch.full_like(e, math.nan))}


@register("box_iou", summary="Best IoU of the map's box with a ground-truth box, and MaxBoxAcc over the run",
          params=BoxIouParams, outputs=("box_iou", "box_iou_curve"), ground_truth=True,
          summarise=lambda per_image, params: box_acc_summary(per_image, params))
def box_iou_metric(batch: Batch, maps: Tensor, p: BoxIouParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``box_iou`` (B,) at ``threshold`` and ``box_iou_curve`` (B, T) on the threshold grid
    (0 when the map has no box there; NaN without ground truth)."""
    gt = ctx.gt
    assert gt is not None
    frame = (int(maps.shape[-2]), int(maps.shape[-1]))
    ts = [p.threshold, *threshold_grid(p.curve_interval).tolist()]
    found = component_boxes(maps, ts, largest=p.components == "largest")  # (B, T, K, 4)
    orig = boxes_to_original(found, ctx.windows, ctx.sizes, frame)
    iou = box_iou(orig[:, :, :, None, :], gt.boxes[:, None, None, :, :])  # (B, T, K, G)
    best = np.where(np.isnan(iou), -np.inf, iou).max(axis=(2, 3))
    best = np.where(np.isfinite(best), best, 0.0)
    best[~gt.present.cpu().numpy()] = np.nan
    return {"box_iou": _to(best[:, 0], maps), "box_iou_curve": _to(best[:, 1:], maps)}


def _input_frame(maps: Tensor, like: Tensor) -> Tensor:
    from ..render import to_input_size

    return to_input_size(maps.float(), (int(like.shape[-2]), int(like.shape[-1])))


# --------------------------------------------------------------------------------------------
# Run-level: MaxBoxAcc


def box_acc_summary(per_image: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """box_iou's run-level values from one method's per-image ``box_iou_curve`` lists (images
    without ground truth have null curves and are left out)."""
    curves = [[float(v) for v in c] for m in per_image
              if isinstance(c := m.get("box_iou_curve"), list) and c and all(isinstance(v, (int, float)) for v in c)]
    return max_box_acc_values(curves, params) if curves else {}


def max_box_acc_values(curves: list[list[float]], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """MaxBoxAcc (V1 at ``delta``) and MaxBoxAccV2 (mean over ``deltas``) from IoU-by-threshold curves
    on the ``curve_interval`` grid of the box_iou params."""
    defaults = BoxIouParams()
    delta = float(params.get("delta", defaults.delta))
    deltas = [float(d) for d in params.get("deltas", defaults.deltas)]
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:  # curves from different grids cannot be pooled
        return {}
    arr = np.asarray(curves, dtype=np.float64)
    grid = threshold_grid(float(params.get("curve_interval", defaults.curve_interval)))
    if len(grid) != arr.shape[1]:
        grid = np.arange(arr.shape[1]) / arr.shape[1]
    v1, t1 = max_box_acc(arr, grid, delta)
    v2 = [max_box_acc(arr, grid, d)[0] for d in deltas]
    return {
        "max_box_acc": {"value": v1, "n": len(curves), "delta": delta, "threshold": round(t1, 6)},
        "max_box_acc_v2": {"value": sum(v2) / len(v2), "n": len(curves), "deltas": deltas,
                           "per_delta": [round(v, 6) for v in v2]},
    }
