"""The CAM family: each method is a channel weighting (or an element-wise weighting) of the
target layer's activations, combined by one shared function. Maps are (B, h, w) on the device.

Shapes: activations A and gradients G = d y_c / d A are (B, C, h, w), y_c the target logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MethodError
from . import register
from .batch import Batch


@dataclass(frozen=True)
class CamParams:
    relu: bool = True  # clip negative evidence, as the papers do before normalising


def combine(weights: Tensor, activations: Tensor, relu: bool) -> Tensor:
    """sum_k weights[b, k] * A[b, k] -> (B, h, w); weights may be (B, C) or (B, C, h, w)."""
    if weights.dim() == 2:
        cam = torch.einsum("bc,bchw->bhw", weights, activations)
    else:
        cam = (weights * activations).sum(1)
    return cam.clamp_min(0) if relu else cam


def _head(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """The linear classifier that reads the global average of the target layer, verified on the
    batch (when ``batch.checks``): logits must equal W · mean(A) + b, else the model has no GAP +
    linear head there."""
    a = batch.activations
    assert a is not None
    n_channels, n_classes = a.shape[1], batch.logits.shape[1]
    linears = [
        m for m in batch.model.modules()
        if isinstance(m, nn.Linear) and m.in_features == n_channels and m.out_features == n_classes
    ]
    hint = "use gradcam: on a GAP + linear network it equals CAM up to scale, and it works on any network"
    layer = batch.layer.spec if batch.layer else "?"
    if not linears:
        raise MethodError(
            f"cam needs a linear classifier with {n_channels} inputs and {n_classes} outputs reading the "
            f"global average of {layer!r}; {type(batch.model).__name__} has none",
            hint,
        )
    fc = linears[-1]
    w = fc.weight.detach().float()
    b = fc.bias.detach().float() if fc.bias is not None else None
    if not batch.checks:
        return w, b
    predicted = a.mean((2, 3)) @ w.T + (b if b is not None else 0)
    err = (predicted - batch.logits).abs().max().item()
    scale = batch.logits.abs().max().item() + 1.0
    tol = 1e-3 if batch.runner.precision == "fp32" else 5e-2
    if err > tol * scale:
        raise MethodError(
            f"cam: the logits of {type(batch.model).__name__} are not a linear function of the global average "
            f"of {layer!r} (max difference {err:.3g}): the model has no GAP + linear head at this layer",
            hint + "; or set target_layer to the input of the global pooling",
        )
    return w, b


@register(
    "cam",
    family="cam",
    summary="Class activation map: classifier weights of the class times the last feature maps",
    paper="Zhou et al. 2016, Learning Deep Features for Discriminative Localization",
    space="layer",
    params=CamParams,
)
def cam(batch: Batch, p: CamParams) -> Tensor:
    """CAM_c = sum_k w_{c,k} A_k with w the linear head's weights (bias dropped, as in the paper).
    Needs global average pooling + a linear layer right after the target layer."""
    a, _ = batch.spatial(grads=False)
    w, _ = _head(batch)
    return combine(w[batch.targets], a, p.relu)


@register(
    "gradcam",
    family="cam",
    summary="Grad-CAM: activations weighted by the spatial mean of the class gradient",
    paper="Selvaraju et al. 2017, Grad-CAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
    aliases=("grad_cam",),
)
def gradcam(batch: Batch, p: CamParams) -> Tensor:
    """alpha_k = mean_ij G_kij; map = ReLU(sum_k alpha_k A_k)."""
    a, g = batch.spatial()
    return combine(g.mean((2, 3)), a, p.relu)


@register(
    "gradcampp",
    family="cam",
    summary="Grad-CAM++: positive gradients weighted per location by the closed-form alpha",
    paper="Chattopadhay et al. 2018, Grad-CAM++",
    space="layer",
    grad_of="layer",
    params=CamParams,
    aliases=("gradcam++", "gradcam_plusplus", "grad_cam_pp"),
)
def gradcampp(batch: Batch, p: CamParams) -> Tensor:
    """Eq. 19 with the exponential score: alpha_kij = g^2 / (2 g^2 + sum_ab A_kab g^3), i.e.
    1 / (2 + sum_ab A_kab * g_kij) where g != 0, else 0; weight_k = sum_ij alpha_kij ReLU(g_kij).

    Departure: pytorch-grad-cam adds eps=1e-6 to the g^2-scaled denominator, which biases alpha when
    gradients are small (|g| < 1e-3 is common); the simplified form needs no eps.
    """
    a, g = batch.spatial()
    denom = 2.0 + a.sum((2, 3), keepdim=True) * g
    alpha = torch.where((g != 0) & (denom != 0), 1.0 / torch.where(denom == 0, 1.0, denom), 0.0)
    return combine((alpha * g.clamp_min(0)).sum((2, 3)), a, p.relu)


@register(
    "hirescam",
    family="cam",
    summary="HiResCAM: element-wise gradient times activation, summed over channels",
    paper="Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def hirescam(batch: Batch, p: CamParams) -> Tensor:
    """map = ReLU(sum_k G_k * A_k); equals Grad-CAM (= CAM / Z) on a GAP + linear network."""
    a, g = batch.spatial()
    return combine(g, a, p.relu)


@register(
    "xgradcam",
    family="cam",
    summary="XGrad-CAM: gradients weighted by the normalised activations",
    paper="Fu et al. 2020, Axiom-based Grad-CAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def xgradcam(batch: Batch, p: CamParams) -> Tensor:
    """alpha_k = sum_ij (A_kij / sum_ab A_kab) G_kij (eps 1e-7 in the denominator, as the reference)."""
    a, g = batch.spatial()
    weights = (g * a).sum((2, 3)) / (a.sum((2, 3)) + 1e-7)
    return combine(weights, a, p.relu)


@register(
    "layercam",
    family="cam",
    summary="Layer-CAM: positive gradients as per-location weights",
    paper="Jiang et al. 2021, LayerCAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def layercam(batch: Batch, p: CamParams) -> Tensor:
    """map = ReLU(sum_k ReLU(G_k) * A_k)."""
    a, g = batch.spatial()
    return combine(g.clamp_min(0), a, p.relu)
