"""Feature Ablation over superpixels (Captum's FeatureAblation with a feature mask): each segment of
the image is replaced by the fill in turn; its attribution is the drop of the class score, painted
on its pixels. The segments are the superpixel method's (grid on the device, or SLIC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import positive
from ..render import Render
from . import register
from .batch import Batch
from .perturbation import _fill_check, fill_image, grid_segments, slic_segments


@dataclass(frozen=True)
class FeatureAblationParams:
    # grid: a g x g grid (g = round(sqrt(segments))) on the device; slic: scikit-image's SLIC.
    segmentation: Literal["grid", "slic"] = "grid"
    segments: int = field(default=49, metadata={"check": positive})
    compactness: float = field(default=10.0, metadata={"check": positive})  # SLIC only
    # What an ablated segment becomes, in model space: zero (Captum's default baseline 0), mean, blur, a number.
    fill: str | float = field(default="zero", metadata={"check": _fill_check})
    blur_sigma: float = field(default=0.05, metadata={"check": positive})
    render: Render = "diverging"

    def grid_side(self) -> int:
        return max(1, round(self.segments**0.5))


def _cost(p: FeatureAblationParams, channels: int | None) -> tuple[int | str, int]:
    if p.segmentation == "grid":
        return 1 + p.grid_side() ** 2, 0
    return f"1 + M (about {p.segments} SLIC segments)", 0


@register(
    "feature_ablation",
    family="perturbation",
    summary="Feature Ablation: class-score drop when each superpixel (grid or SLIC) is replaced by the fill",
    paper="Captum's FeatureAblation (ablation studies, e.g. Zeiler & Fergus 2014) over a feature mask",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=FeatureAblationParams,
    cost=_cost,
)
def feature_ablation(batch: Batch, p: FeatureAblationParams) -> Tensor:
    """map[b, i, j] = y_t(x_b) - y_t(x_b with segment s(i, j) replaced by the fill), (B, H, W),
    signed: positive where hiding the segment lowers the class score. One forward per segment and
    image, the ablated copies made chunk by chunk on the device through the runner. With a zero fill
    and the same mask this is Captum's FeatureAblation (its attribution spread over all channels)."""
    x = batch.x
    b, _, h, w = x.shape
    if p.segmentation == "grid":
        side = p.grid_side()
        labels, counts = grid_segments(b, h, w, side, x.device), [side * side] * b
    else:
        labels, counts = slic_segments(x, p.segments, p.compactness)
    m = max(counts)
    fill = fill_image(x, p.fill, p.blur_sigma).expand_as(x)

    def build(idx: Tensor) -> Tensor:
        img, seg = idx // m, idx % m
        hide = (labels[img] == seg[:, None, None])[:, None]  # (n, 1, H, W)
        return torch.where(hide, fill[img], x[img])

    scores = batch.runner.scores_of(build, b * m, batch.targets.repeat_interleave(m)).view(b, m)
    drop = batch.target_scores()[:, None] - scores  # an absent segment (M_b < M) hides nothing: drop 0
    return drop.gather(1, labels.reshape(b, h * w)).view(b, h, w)
