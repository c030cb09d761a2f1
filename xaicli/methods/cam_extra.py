"""More CAM weightings from the peers: SmoothGrad-CAM++ (TorchCAM), FEM, Shapley-CAM and Finer-CAM
(pytorch-grad-cam). Those that need gradients other than the shared pass's (of noisy inputs, of a
contrastive objective, of second order) take them in their own passes through the engine's runner
(``passes.grad_pass``: chunked by the budget, halved on out-of-memory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..capture import layer_map
from ..config import non_negative, positive
from . import register
from .batch import Batch, MethodOutput
from .cam import CamParams, combine, finish
from .passes import grad_pass


def layer_gradients(
    batch: Batch, build: Callable[[Tensor], Tensor], n: int,
    objective: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """d objective / d A at the target layer for ``n`` inputs made by ``build(idx)``, (n, C, h, w);
    ``objective(idx, logits)`` gives one scalar per input (n,)."""
    layer = batch.layer
    assert layer is not None
    point = [(layer.module, layer.use_input)]

    def reduce(idx: Tensor, xs: Tensor, logits: Tensor, zs: list[Tensor]) -> Tensor:
        (g,) = torch.autograd.grad(objective(idx, logits).sum(), zs, allow_unused=True)
        return layer_map(layer, torch.zeros_like(zs[0]) if g is None else g.float(), xs)  # (n, C, h, w)

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


# --------------------------------------------------------------------------------------------
# FEM


@dataclass(frozen=True)
class FemParams:
    k: float = 2.0  # the k-sigma rule's k (pytorch-grad-cam's default)
    relu: bool = True


@register(
    "fem",
    family="cam",
    summary="FEM: each channel weighted by the share of its locations above mean + k std (class-agnostic)",
    paper="Fuad et al. 2020, Features Understanding in 3D CNNs for Actions Recognition in Video",
    space="layer",
    params=FemParams,
)
def fem(batch: Batch, p: FemParams) -> Tensor:
    """w_k = mean_ij 1[A_kij > mean(A_k) + k std(A_k)] (population std, as pytorch-grad-cam's NumPy);
    map = ReLU(sum_k w_k A_k), (B, h, w). The same map for every class."""
    a, _ = batch.spatial(grads=False)
    flat = a.flatten(2)
    threshold = flat.mean(2) + p.k * flat.std(2, correction=0)
    weights = (flat > threshold[..., None]).float().mean(2)
    return combine(weights, a, p.relu)


# --------------------------------------------------------------------------------------------
# Shapley-CAM


@register(
    "shapleycam",
    family="cam",
    summary="Shapley-CAM: Grad-CAM weights corrected by the Hessian-vector product (second order)",
    paper="Cai 2025, CAMs as Shapley Value-based Explainers",
    space="layer",
    params=CamParams,
    cost=lambda p, c: (2, 2),
    aliases=("shapley_cam",),
)
def shapleycam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """w_k = mean_ij (G - H A / 2)_kij with G = dy_c/dA and H A the Hessian of y_c with respect to A
    applied to A itself (pytorch-grad-cam's ShapleyCAM on the logit); map = ReLU(sum_k w_k A_k),
    (B, h, w). One more forward, a backward with its graph kept and a double backward per image.
    On a network piecewise linear after the layer (ReLU heads) H A = 0 and it is Grad-CAM.
    ``counterfactual``: the weights of -y_c, which are -w (G and H both change sign)."""
    a, _ = batch.spatial(grads=False)
    layer = batch.layer
    assert layer is not None
    x, targets = batch.x, batch.targets

    def reduce(idx: Tensor, xs: Tensor, logits: Tensor, zs: list[Tensor]) -> Tensor:
        (z,) = zs
        score = logits.gather(1, targets[idx, None]).sum()
        (g,) = torch.autograd.grad(score, z, create_graph=True, allow_unused=True)
        if g is None:
            return torch.zeros(a.shape[:2], device=z.device)
        hvp = torch.autograd.grad(g, z, grad_outputs=z.detach(), allow_unused=True)[0] if g.requires_grad else None
        second = torch.zeros_like(g) if hvp is None else hvp
        return layer_map(layer, (g - 0.5 * second).float(), xs).mean((2, 3))  # in the layer's own layout until here

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The fused attention kernels have no second derivative: a transformer's attention runs as
    # plain maths for this pass (the same values).
    with sdpa_kernel(SDPBackend.MATH):
        weights = grad_pass(batch, [(layer.module, layer.use_input)], lambda idx: x[idx], batch.size, reduce)
    return finish(-weights if p.counterfactual else weights, a, p)


# --------------------------------------------------------------------------------------------
# Finer-CAM


@dataclass(frozen=True)
class FinerParams:
    comparisons: int = field(default=3, metadata={"check": positive})  # most similar classes compared
    alpha: float = 1.0  # strength of the comparison (0: Grad-CAM)
    relu: bool = True


def similar_classes(logits: Tensor, targets: Tensor, n: int) -> Tensor:
    """(B, n) the classes whose logits are closest to the target's, the target itself excluded."""
    dist = (logits - logits.gather(1, targets[:, None])).abs()
    dist = dist.scatter(1, targets[:, None], float("inf"))
    return dist.topk(min(n, logits.shape[1] - 1), dim=1, largest=False).indices


@register(
    "finercam",
    family="cam",
    summary="Finer-CAM: Grad-CAM of the target logit minus its most similar classes' logits",
    paper="Zhang et al. 2025, Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation",
    space="layer",
    params=FinerParams,
    cost=lambda p, c: (2, 1),
    aliases=("finer_cam",),
)
def finercam(batch: Batch, p: FinerParams) -> Tensor:
    """Grad-CAM (channel weights = spatial mean of the gradient, ReLU) of the objective
    sum_j p_j (y_c - alpha y_j) / (sum_j p_j + 1e-9) over the ``comparisons`` classes j with logits
    closest to y_c, p = softmax(y) (differentiated too, as pytorch-grad-cam's FinerWeightedTarget).
    (B, h, w); one more forward and backward per image. alpha = 0 gives Grad-CAM."""
    a, _ = batch.spatial(grads=False)
    if batch.logits.shape[1] < 2:
        return combine(torch.zeros(a.shape[:2], device=a.device), a, p.relu)
    others = similar_classes(batch.logits, batch.targets, p.comparisons)
    targets, x = batch.targets, batch.x

    def objective(idx: Tensor, logits: Tensor) -> Tensor:
        prob = logits.softmax(1).gather(1, others[idx])
        diff = logits.gather(1, targets[idx, None]) - p.alpha * logits.gather(1, others[idx])
        return (prob * diff).sum(1) / (prob.sum(1) + 1e-9)

    g = layer_gradients(batch, lambda idx: x[idx], batch.size, objective)
    return combine(g.mean((2, 3)), a, p.relu)
