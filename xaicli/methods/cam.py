"""The CAM family: each method is a channel weighting (or an element-wise weighting) of the
target layer's activations, combined by one shared function. Maps are (B, h, w) on the device.

Shapes: activations A and gradients G = d y_c / d A are (B, C, h, w), y_c the target logit.

Counterfactual explanations (Selvaraju et al. 2017, section 7): with ``counterfactual: true`` every
method of the family explains -y_c instead of y_c (the gradients, or CAM's class weights, negated),
so the map shows the regions whose removal would raise the class score. The share of the evidence
that speaks against the class goes to scores.jsonl as ``counterfactual_share``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MethodError
from . import register
from .batch import Batch, MethodOutput


@dataclass(frozen=True)
class CamParams:
    relu: bool = True  # clip negative evidence, as the papers do before normalising
    # Explain -y_c: the regions whose removal would raise the class score (Grad-CAM paper, section 7).
    counterfactual: bool = False


def combine(weights: Tensor, activations: Tensor, relu: bool) -> Tensor:
    """sum_k weights[b, k] * A[b, k] -> (B, h, w); weights may be (B, C) or (B, C, h, w)."""
    if weights.dim() == 2:
        cam = torch.einsum("bc,bchw->bhw", weights, activations)
    else:
        cam = (weights * activations).sum(1)
    return cam.clamp_min(0) if relu else cam


def finish(weights: Tensor, activations: Tensor, p: CamParams) -> Tensor | MethodOutput:
    """The map of a family member from its weights (computed from the signs ``p.counterfactual``
    asks for). A counterfactual map also reports, per image, the share of the layer's evidence
    (|map| before the ReLU) that speaks against the class: ``counterfactual_share`` in [0, 1]."""
    if not p.counterfactual:
        return combine(weights, activations, p.relu)
    raw = combine(weights, activations, relu=False)
    share = raw.clamp_min(0).sum((1, 2)) / raw.abs().sum((1, 2)).clamp_min(1e-30)
    return MethodOutput(raw.clamp_min(0) if p.relu else raw, {"counterfactual_share": share})


def signed_gradients(batch: Batch, p: CamParams) -> tuple[Tensor, Tensor]:
    """A and G = d y_c / d A, or -G for a counterfactual explanation."""
    a, g = batch.spatial()
    return a, (-g if p.counterfactual else g)


def _class_weights(model: nn.Module, n_channels: int, n_classes: int,
                   device: torch.device) -> list[tuple[Tensor, Tensor | None]]:
    """Candidates (W (N, C), b) for the head that may read the global average of a C-channel layer,
    the most likely first: the classifier the model names (``gap_classifier``: an ACoL model's
    branch A, its complementary view's branch B), else the linear layers C -> N (the last first),
    else the 1x1 convolutions C -> N (a Network-in-Network head, whose average over the locations
    is W mean(A) + b), else the identity when the layer already has one channel per class (the map
    is that class's channel). Empty when the model has none of them."""

    def linear(m: object) -> bool:
        return isinstance(m, nn.Linear) and m.in_features == n_channels and m.out_features == n_classes

    def conv1x1(m: object) -> bool:
        return (isinstance(m, nn.Conv2d) and m.in_channels == n_channels and m.out_channels == n_classes
                and tuple(m.kernel_size) == (1, 1) and m.groups == 1)

    def wb(m: nn.Module) -> tuple[Tensor, Tensor | None]:
        w = m.weight.detach().float()
        return (w[:, :, 0, 0] if w.dim() == 4 else w), (m.bias.detach().float() if m.bias is not None else None)

    named = getattr(model, "gap_classifier", None)
    if linear(named):
        return [wb(named)]
    found = [m for m in model.modules() if linear(m)] or [m for m in model.modules() if conv1x1(m)]
    if found:
        return [wb(m) for m in reversed(found)]
    return [(torch.eye(n_classes, device=device), None)] if n_channels == n_classes else []


def _head(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """The class weights of the head that reads the global average of the target layer (see
    ``_class_weights``), verified on the batch (when ``batch.checks``): logits must equal
    W · mean(A) + b for one of the candidates (the first that fits is taken; the first of all when
    the checks are off), else the model has no such head there."""
    a = batch.activations
    assert a is not None
    n_channels, n_classes = a.shape[1], batch.logits.shape[1]
    hint = "use gradcam: on a GAP + linear network it equals CAM up to scale, and it works on any network"
    layer = batch.layer.spec if batch.layer else "?"
    heads = _class_weights(batch.model, n_channels, n_classes, a.device)
    if not heads:
        raise MethodError(
            f"cam needs a linear classifier with {n_channels} inputs and {n_classes} outputs (or such a 1x1 "
            f"convolution) reading the global average of {layer!r}, or a layer with one channel per class; "
            f"{type(batch.model).__name__} has none",
            hint,
        )
    if not batch.checks:
        return heads[0]
    scale = batch.logits.abs().max().item() + 1.0
    tol = 1e-3 if batch.runner.precision == "fp32" else 5e-2
    errors = []
    for w, b in heads:
        predicted = a.mean((2, 3)) @ w.T + (b if b is not None else 0)
        err = (predicted - batch.logits).abs().max().item()
        if err <= tol * scale:
            return w, b
        errors.append(err)
    raise MethodError(
        f"cam: the logits of {type(batch.model).__name__} are not a linear function of the global average "
        f"of {layer!r} (max difference {errors[0]:.3g}): the model has no GAP + linear (or 1x1-convolution) "
        "head at this layer",
        hint + "; or set target_layer to the input of the global pooling (with a 1x1-convolution head "
        "followed by a ReLU, as in SqueezeNet: the pooling's input, whose channels are the classes)",
    )


@register(
    "cam",
    family="cam",
    summary="Class activation map: classifier weights of the class times the last feature maps",
    paper="Zhou et al. 2016, Learning Deep Features for Discriminative Localization",
    space="layer",
    params=CamParams,
)
def cam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """CAM_c = sum_k w_{c,k} A_k with w the class weights of the head (bias dropped, as in the
    paper). The head reads the global average of the target layer: a linear layer (GAP + FC), a
    1x1 convolution to one channel per class before the pooling (Network in Network, SqueezeNet:
    target its input), or nothing at all when the target layer already has one channel per class
    whose average is the logit (target the input of the pooling): then the map is that class's
    channel. ``counterfactual``: -w_c."""
    a, _ = batch.spatial(grads=False)
    w, _ = _head(batch)
    weights = w[batch.targets]
    return finish(-weights if p.counterfactual else weights, a, p)


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
def gradcam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """alpha_k = mean_ij G_kij; map = ReLU(sum_k alpha_k A_k)."""
    a, g = signed_gradients(batch, p)
    return finish(g.mean((2, 3)), a, p)


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
def gradcampp(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """Eq. 19 with the exponential score: alpha_kij = g^2 / (2 g^2 + sum_ab A_kab g^3), i.e.
    1 / (2 + sum_ab A_kab * g_kij) where g != 0, else 0; weight_k = sum_ij alpha_kij ReLU(g_kij).

    Departure: pytorch-grad-cam adds eps=1e-6 to the g^2-scaled denominator, which biases alpha when
    gradients are small (|g| < 1e-3 is common); the simplified form needs no eps.
    """
    a, g = signed_gradients(batch, p)
    return finish(gradcampp_weights(a, g), a, p)


def gradcampp_weights(a: Tensor, g: Tensor) -> Tensor:
    """sum_ij alpha_kij ReLU(g_kij) with the closed-form alpha (see ``gradcampp``), (B, C)."""
    denom = 2.0 + a.sum((2, 3), keepdim=True) * g
    alpha = torch.where((g != 0) & (denom != 0), 1.0 / torch.where(denom == 0, 1.0, denom), 0.0)
    return (alpha * g.clamp_min(0)).sum((2, 3))


@register(
    "hirescam",
    family="cam",
    summary="HiResCAM: element-wise gradient times activation, summed over channels",
    paper="Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def hirescam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """map = ReLU(sum_k G_k * A_k); equals Grad-CAM (= CAM / Z) on a GAP + linear network."""
    a, g = signed_gradients(batch, p)
    return finish(g, a, p)


@register(
    "xgradcam",
    family="cam",
    summary="XGrad-CAM: gradients weighted by the normalised activations",
    paper="Fu et al. 2020, Axiom-based Grad-CAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def xgradcam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """alpha_k = sum_ij (A_kij / sum_ab A_kab) G_kij (eps 1e-7 in the denominator, as the reference)."""
    a, g = signed_gradients(batch, p)
    weights = (g * a).sum((2, 3)) / (a.sum((2, 3)) + 1e-7)
    return finish(weights, a, p)


@register(
    "layercam",
    family="cam",
    summary="Layer-CAM: positive gradients as per-location weights",
    paper="Jiang et al. 2021, LayerCAM",
    space="layer",
    grad_of="layer",
    params=CamParams,
)
def layercam(batch: Batch, p: CamParams) -> Tensor | MethodOutput:
    """map = ReLU(sum_k ReLU(G_k) * A_k)."""
    a, g = signed_gradients(batch, p)
    return finish(g.clamp_min(0), a, p)
