"""Faithfulness: does the model's confidence follow the map?

* ``deletion`` / ``insertion`` (Petsiuk et al., RISE, BMVC 2018): pixels are removed from the image
  (replaced by a substrate) or inserted into the substrate in the order of the map, most salient
  first; the curve is the target class's softmax probability after each step, summarised by its
  normalised area (trapezoid rule over x in [0, 1]). Deletion: lower is better; insertion: higher.
* ``drop_increase`` (Chattopadhyay et al., Grad-CAM++, WACV 2018): the probability on the image
  multiplied by the map vs on the image; Average Drop ``max(0, p - o) / p`` (lower is better) and
  Increase in Confidence ``1[o > p]`` (higher is better), per image (run means are the paper's
  numbers divided by 100).

Conventions (see docs/metrics.md): all perturbations happen in the model's **normalised** input
space, as in RISE, pytorch-grad-cam and TorchCAM; ``zero`` there is the dataset mean colour. The
score is the softmax probability of the explained class (``batch.targets``, the prediction by
default), recomputed for the unperturbed image in the same pass so curves start/end exactly at p(x).
Pixel order is a stable descending sort of the map: ties (flat regions, constant maps) go in
row-major index order. All perturbed inputs are built lazily per chunk on the device and run through
the batch's runner (the engine's budget, halved on out-of-memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import positive
from ..methods.batch import Batch
from ..ops import gaussian_blur
from ..render import to_input_size
from . import register
from .context import MetricContext


def _odd_positive(v: int) -> str | None:
    return None if v > 0 and v % 2 == 1 else "must be a positive odd number"


@dataclass(frozen=True)
class DeletionParams:
    """Knobs of a deletion curve. ``steps`` perturbation steps give ``steps + 1`` points;
    ``pixels_per_step`` (RISE used 224 on 224x224 inputs) replaces ``steps`` by ceil(H*W / it)."""

    steps: int = field(default=50, metadata={"check": positive})
    pixels_per_step: int | None = field(default=None, metadata={"check": positive})
    substrate: Literal["zero", "blur"] = "zero"
    blur_kernel: int = field(default=11, metadata={"check": _odd_positive})
    blur_sigma: float = field(default=5.0, metadata={"check": positive})
    save_curve: bool = False


@dataclass(frozen=True)
class InsertionParams(DeletionParams):
    substrate: Literal["zero", "blur"] = "blur"


@dataclass(frozen=True)
class DropIncreaseParams:
    """Average Drop / Increase in Confidence have no knobs: the map multiplies the normalised input."""


def auc(curves: Tensor) -> Tensor:
    """Normalised trapezoid area of (B, n+1) curves over x in [0, 1]: (sum - first/2 - last/2) / n.
    A constant curve c has area c."""
    n = curves.shape[-1] - 1
    if n < 1:
        return curves[..., 0]
    return (curves.sum(-1) - 0.5 * (curves[..., 0] + curves[..., -1])) / n


def step_counts(n_pixels: int, steps: int, pixels_per_step: int | None, device: torch.device) -> Tensor:
    """Pixels changed after each step, from 0 to all: (n+1,) int64."""
    if pixels_per_step is not None:
        n = math.ceil(n_pixels / pixels_per_step)
        return (torch.arange(n + 1, device=device) * pixels_per_step).clamp_max(n_pixels)
    return torch.arange(steps + 1, device=device) * n_pixels // steps


def perturbation_curves(batch: Batch, maps: Tensor, p: DeletionParams, insert: bool) -> Tensor:
    """(B, n+1) probabilities along the deletion (``insert`` False) or insertion curve."""
    x = batch.x
    b, _, h, w = x.shape
    maps = to_input_size(maps.float(), (h, w))
    hw = h * w
    order = torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(hw, device=x.device).expand(b, hw))
    counts = step_counts(hw, p.steps, p.pixels_per_step, x.device)
    points = counts.numel()
    if p.substrate == "blur":
        base = gaussian_blur(x, p.blur_sigma, radius=p.blur_kernel // 2, pad="zero")
    else:
        base = torch.zeros_like(x)
    # A changed pixel becomes `new`, an unchanged one stays `old`.
    old, new = (base, x) if insert else (x, base)

    def build(idx: Tensor) -> Tensor:
        img, step = idx // points, idx % points
        changed = (rank[img] < counts[step][:, None]).view(-1, 1, h, w)
        return torch.where(changed, new[img], old[img])

    targets = batch.targets.repeat_interleave(points)
    return batch.runner.scores_of(build, b * points, targets, prob=True).view(b, points)


def _curve_metric(batch: Batch, maps: Tensor, p: DeletionParams, name: str, insert: bool) -> dict[str, Tensor]:
    curves = perturbation_curves(batch, maps, p, insert)
    out = {f"{name}_auc": auc(curves)}
    if p.save_curve:
        out[f"{name}_curve"] = curves
    return out


@register("deletion", summary="RISE deletion AUC: probability as the most salient pixels are removed (lower is better)",
          params=DeletionParams, outputs=("deletion_auc", "deletion_curve"), cost=lambda p: p.steps + 1)
def deletion(batch: Batch, maps: Tensor, p: DeletionParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``deletion_auc`` (B,) and, with ``save_curve``, ``deletion_curve`` (B, n+1), which starts at p(x)."""
    return _curve_metric(batch, maps, p, "deletion", insert=False)


@register("insertion", summary="RISE insertion AUC: probability as the most salient pixels are restored (higher is better)",
          params=InsertionParams, outputs=("insertion_auc", "insertion_curve"), cost=lambda p: p.steps + 1)
def insertion(batch: Batch, maps: Tensor, p: InsertionParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``insertion_auc`` (B,) and, with ``save_curve``, ``insertion_curve`` (B, n+1), which ends at p(x)."""
    return _curve_metric(batch, maps, p, "insertion", insert=True)


@register("drop_increase", summary="Grad-CAM++ Average Drop (lower is better) and Increase in Confidence",
          params=DropIncreaseParams, outputs=("avg_drop", "increase"), cost=lambda p: 2)
def drop_increase(batch: Batch, maps: Tensor, p: DropIncreaseParams, ctx: MetricContext) -> dict[str, Tensor]:
    """``avg_drop`` = max(0, p - o) / p and ``increase`` = 1[o > p] (B,), with p the probability of
    the target on x and o on x * map (map in [0, 1], broadcast over channels, normalised space);
    both from the same runner pass so an all-ones map gives exactly 0 and 0."""
    x = batch.x
    b, _, h, w = x.shape
    m = to_input_size(maps.float(), (h, w))[:, None].to(x.dtype)

    def build(idx: Tensor) -> Tensor:
        img, masked = idx % b, idx >= b
        return torch.where(masked.view(-1, 1, 1, 1), x[img] * m[img], x[img])

    probs = batch.runner.scores_of(build, 2 * b, batch.targets.repeat(2), prob=True)
    clean, masked = probs[:b], probs[b:]
    drop = (clean - masked).clamp_min(0) / clean.clamp_min(1e-12)
    return {"avg_drop": drop, "increase": (masked > clean).float()}
