"""More CAM weightings from the peers: SmoothGrad-CAM++ (TorchCAM), FEM, Shapley-CAM and Finer-CAM
(pytorch-grad-cam). Those that need gradients other than the shared pass's (of noisy inputs, of a
contrastive objective, of second order) take them in their own passes through the engine's runner
(``passes.grad_pass``: chunked by the budget, halved on out-of-memory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import non_negative, positive
from . import register
from .batch import Batch
from .cam import combine
from .passes import grad_pass


def layer_gradients(
    batch: Batch, build: Callable[[Tensor], Tensor], n: int,
    objective: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """d objective / d A at the target layer for ``n`` inputs made by ``build(idx)``, (n, C, h, w);
    ``objective(idx, logits)`` gives one scalar per input (n,)."""
    assert batch.layer is not None
    point = [(batch.layer.module, batch.layer.use_input)]

    def reduce(idx: Tensor, xs: Tensor, logits: Tensor, zs: list[Tensor]) -> Tensor:
        (g,) = torch.autograd.grad(objective(idx, logits).sum(), zs, allow_unused=True)
        return torch.zeros_like(zs[0]) if g is None else g.float()

    return grad_pass(batch, point, build, n, reduce)


# --------------------------------------------------------------------------------------------
# SmoothGrad-CAM++


@dataclass(frozen=True)
class SmoothGradCamppParams:
    samples: int = field(default=4, metadata={"check": positive})  # noisy copies per image (TorchCAM: 4)
    std: float = field(default=0.3, metadata={"check": non_negative})  # noise std in model-input units (TorchCAM: 0.3)
    relu: bool = True


@register(
    "smoothgradcampp",
    family="cam",
    summary="SmoothGrad-CAM++: Grad-CAM++ with the gradient moments averaged over noisy inputs",
    paper="Omeiza et al. 2019, Smooth Grad-CAM++",
    space="layer",
    params=SmoothGradCamppParams,
    cost=lambda p, c: (1 + p.samples, p.samples),
    aliases=("smoothgradcam++", "smooth_gradcampp"),
)
def smoothgradcampp(batch: Batch, p: SmoothGradCamppParams) -> Tensor:
    """G_s = d y_c / d A at x + N(0, std^2) (s = 1..S); with the means m1, m2, m3 of G_s, G_s^2, G_s^3,
    alpha = m2 / (2 m2 + sum_ij A * m3) (0 where m2 = 0), weights w_k = sum_ij alpha * ReLU(m1), map =
    ReLU(sum_k w_k A_k), (B, h, w); A the clean input's activations. S forwards and backwards per
    image. With std 0 it is Grad-CAM++ (alpha = 1 / (2 + g sum A)).

    Departures from TorchCAM: ReLU(m1), the mean gradient, where TorchCAM takes the last noisy
    sample's gradient; the weights multiply the clean input's activations (TorchCAM's hook holds
    the last noisy forward's when it combines them); no eps 1e-8 in the denominator (it biases alpha when gradients are small).
    Noise comes from each image's seed, so it does not depend on the batching."""
    a, _ = batch.spatial(grads=False)
    x, s = batch.x, p.samples
    noise = torch.stack([
        torch.randn((s, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) for g in batch.generators()
    ]) * p.std  # (B, S, 3, H, W)
    targets = batch.targets

    def build(idx: Tensor) -> Tensor:
        return x[idx // s] + noise[idx // s, idx % s]

    g = layer_gradients(batch, build, batch.size * s, lambda idx, lg: lg.gather(1, targets[idx // s, None])[:, 0])
    g = g.view(batch.size, s, *a.shape[1:])
    m1, m2, m3 = g.mean(1), g.pow(2).mean(1), g.pow(3).mean(1)
    denom = 2 * m2 + (a * m3).sum((2, 3), keepdim=True)
    alpha = torch.where((m2 != 0) & (denom != 0), m2 / torch.where(denom == 0, 1.0, denom), 0.0)
    return combine((alpha * m1.clamp_min(0)).sum((2, 3)), a, p.relu)
