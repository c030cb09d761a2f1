"""Score-CAM's smoothed and integrated variants (TorchCAM's SSCAM and ISCAM): each channel of the
target layer, min-max scaled and upsampled, masks the input several times (with noise, or at
growing strength); the class scores of all masked inputs go through the engine's runner, chunked by
its budget and halved on out-of-memory, built on the device a chunk at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import non_negative, positive
from . import register
from .batch import Batch
from .cam import combine
from .cam_ablation import channel_cost, top_channels


@dataclass(frozen=True)
class SmoothScoreParams:
    samples: int = field(default=35, metadata={"check": positive})  # noisy masks per channel (TorchCAM: 35)
    std: float = field(default=2.0, metadata={"check": non_negative})  # noise on the [0, 1] mask (TorchCAM: 2.0)
    max_channels: int = field(default=0, metadata={"check": non_negative})  # top-variance channels (0: all)
    relu: bool = True


@dataclass(frozen=True)
class IntegratedScoreParams:
    samples: int = field(default=10, metadata={"check": positive})  # integration steps (TorchCAM: 10)
    max_channels: int = field(default=0, metadata={"check": non_negative})
    relu: bool = True


def layer_masks(a: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, H, W): each channel min-max scaled at the layer's resolution (eps 1e-8,
    so a constant channel gives zero), then upsampled bilinearly, as TorchCAM."""
    flat = a.flatten(2)
    shifted = a - flat.amin(2)[..., None, None]
    scaled = shifted / (shifted.flatten(2).amax(2)[..., None, None] + 1e-8)
    return F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)


def _masked_scores(batch: Batch, a: Tensor, samples: int, alter) -> Tensor:
    """Mean over the samples of f_c(alter(mask_k, s, image) * x) - f_c(x), (B, K); rows ordered
    (image, sample, channel), built a chunk at a time."""
    b, k = a.shape[:2]
    x = batch.x
    masks = layer_masks(a, (int(x.shape[-2]), int(x.shape[-1]))).to(x.dtype)
    per_image = samples * k

    def build(idx: Tensor) -> Tensor:
        img, s, ch = idx // per_image, (idx // k) % samples, idx % k
        return alter(masks[img, ch][:, None], s, img) * x[img]

    targets = batch.targets.repeat_interleave(per_image)
    scores = batch.runner.scores_of(build, b * per_image, targets).view(b, samples, k)
    return scores.mean(1) - batch.target_scores()[:, None]


@register(
    "sscam",
    family="cam",
    summary="SS-CAM: Score-CAM with the channel scores averaged over noisy masks",
    paper="Wang et al. 2020, SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    space="layer",
    params=SmoothScoreParams,
    cost=lambda p, c: channel_cost(p, c, p.samples),
    aliases=("ss_cam", "smoothed_scorecam"),
)
def sscam(batch: Batch, p: SmoothScoreParams) -> Tensor:
    """w = softmax_k(mean_s f_c((M_k + delta_s) * x) - f_c(x)), M_k the channel min-max scaled at the
    layer size and upsampled, delta_s ~ N(0, std^2) per pixel; map = ReLU(sum_k w_k A_k), (B, h, w).
    ``samples * K`` forwards per image (K: channels, or max_channels of largest variance).

    Departure from TorchCAM: one noise image delta_s per image and sample, shared by the K channels
    (TorchCAM draws one per channel too). Each channel's average is the same Monte Carlo estimate,
    the channels are compared on common noise, and the noise takes samples * H * W values per image
    instead of samples * K * H * W. Noise comes from the image's seed (independent of batching)."""
    a, _ = top_channels(batch.spatial(grads=False)[0], p.max_channels)
    x = batch.x
    gens = batch.generators()
    noise = torch.stack([
        torch.randn((p.samples, *x.shape[-2:]), generator=g, device=x.device, dtype=x.dtype) for g in gens
    ]) * p.std  # (B, S, H, W)

    def alter(mask: Tensor, s: Tensor, img: Tensor) -> Tensor:
        return mask + noise[img, s][:, None]

    return combine(_masked_scores(batch, a, p.samples, alter).softmax(1), a, p.relu)


@register(
    "iscam",
    family="cam",
    summary="IS-CAM: Score-CAM with the channel scores integrated over growing mask strengths",
    paper="Naidu et al. 2020, IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    space="layer",
    params=IntegratedScoreParams,
    cost=lambda p, c: channel_cost(p, c, p.samples),
    aliases=("is_cam", "integrated_scorecam"),
)
def iscam(batch: Batch, p: IntegratedScoreParams) -> Tensor:
    """w = softmax_k(mean_i f_c(c_i M_k * x) - f_c(x)) with c_i = sum_{j<=i} j / N, i = 1..N (the
    cumulative coefficients of the paper's Eq. as TorchCAM computes them: 0.1, 0.3, ..., 5.5 for
    N = 10); map = ReLU(sum_k w_k A_k), (B, h, w). ``samples * K`` forwards per image."""
    a, _ = top_channels(batch.spatial(grads=False)[0], p.max_channels)
    steps = torch.arange(1, p.samples + 1, device=a.device, dtype=batch.x.dtype) / p.samples
    coeff = steps.cumsum(0)

    def alter(mask: Tensor, s: Tensor, img: Tensor) -> Tensor:
        return coeff[s][:, None, None, None] * mask

    return combine(_masked_scores(batch, a, p.samples, alter).softmax(1), a, p.relu)
