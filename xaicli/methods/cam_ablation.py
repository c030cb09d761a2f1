"""Ablation-CAM: the drop of the class score when one channel of the target layer is set to zero,
one forward per channel through the engine's runner (chunked, halved on out-of-memory)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..capture import channel_dim
from ..config import non_negative
from . import register
from .batch import Batch
from .cam import combine
from .passes import rewrite_layer


@dataclass(frozen=True)
class AblationParams:
    # Only the channels of largest spatial variance are ablated (0: all), the others weigh 0 (as
    # Faster-Score-CAM's cap; pytorch-grad-cam's ratio_channels_to_ablate also gives skipped
    # channels weight 0, with another choice of channels).
    max_channels: int = field(default=0, metadata={"check": non_negative})
    relu: bool = True


def top_channels(a: Tensor, max_channels: int) -> tuple[Tensor, Tensor]:
    """The ``max_channels`` channels of largest spatial variance of each image (all when 0 or more
    than C): (B, K, h, w) activations and their channel indices (B, K)."""
    b, c, h, w = a.shape
    if not max_channels or max_channels >= c:
        return a, torch.arange(c, device=a.device).expand(b, c)
    keep = a.flatten(2).var(2).topk(max_channels, dim=1).indices
    return a.gather(1, keep[:, :, None, None].expand(-1, -1, h, w)), keep


def channel_cost(p: object, channels: int | None, per_channel: int = 1) -> tuple[int | str, int]:
    """1 + per_channel * K forwards: the shared pass and K = min(C, max_channels) channels."""
    cap = getattr(p, "max_channels", 0)
    times = f"{per_channel} × " if per_channel != 1 else ""
    if channels is None:
        return (f"1 + {times}min(C, {cap})" if cap else f"1 + {times}C (channels)"), 0
    return 1 + per_channel * (min(channels, cap) if cap else channels), 0


@register(
    "ablationcam",
    family="cam",
    summary="Ablation-CAM: relative drop of the class score when each channel is zeroed",
    paper="Desai & Ramaswamy 2020, Ablation-CAM: Visual Explanations via Gradient-free Localization",
    space="layer",
    params=AblationParams,
    cost=channel_cost,
    aliases=("ablation_cam",),
)
def ablationcam(batch: Batch, p: AblationParams) -> Tensor:
    """w_k = (y_c - y_c^k) / y_c with y_c^k the target logit when channel k of the target layer is
    zeroed (Eq. 3 of the paper), over the ``max_channels`` channels of largest variance if set; map = ReLU(sum_k w_k A_k), (B, h, w). C forwards per image: the
    input goes through the model with the layer's output rewritten (the layers before it run
    again; pytorch-grad-cam reuses the cached activations, with the same result).

    Departure from pytorch-grad-cam: on a layer with negative values it writes min(A) - 1e7 into
    the ablated channel; this sets zero, as the paper (identical on post-ReLU layers). A target
    logit near zero makes the weights large (the division by y_c is the paper's); the map's shape
    is unaffected as it is min-max scaled for display."""
    a, chans = top_channels(batch.spatial(grads=False)[0], p.max_channels)
    b, k = chans.shape
    x = batch.x
    state: dict[str, Tensor] = {}

    def build(idx: Tensor) -> Tensor:
        state["ablated"] = chans[idx // k, idx % k]
        return x[idx // k]

    assert batch.layer is not None

    def ablate(out: Tensor) -> Tensor:
        ch = state["ablated"]
        cdim = channel_dim(batch.layer, out, x)  # a transformer's tokens and Swin's grids hold channels last
        keep = (torch.arange(out.shape[cdim], device=out.device)[None] != ch[:, None]).to(out.dtype)  # (n, C)
        shape = [1] * out.dim()
        shape[0], shape[cdim] = keep.shape
        return out * keep.view(shape)

    with rewrite_layer(batch.layer, ablate):
        ablated = batch.runner.scores_of(build, b * k, batch.targets.repeat_interleave(k)).view(b, k)
    y = batch.target_scores()[:, None]
    return combine((y - ablated) / y, a, p.relu)
