"""Gradient methods: vanilla gradient (saliency), DeconvNet, guided backpropagation, guided
Grad-CAM, SmoothGrad (with SmoothGrad-squared and VarGrad) and Integrated Gradients.

Every map is computed in pixel space: (B, C, H, W) attributions, which the engine reduces over
the colour channels (``reduce`` knob), scales and renders as the ``render`` knob says
(``diverging`` keeps the sign, ``magnitude`` shows |v|, ``positive`` clips at 0).

The ReLU backward rules of DeconvNet and guided backprop are applied by
:func:`xaicli.methods.relu_rules.relu_rule`, which restores the user's model exactly afterwards.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import IMAGE_FILE, non_negative, positive
from ..errors import ConfigError, MethodError
from ..ops import gaussian_blur
from ..render import ChannelReduce, Render
from . import register
from .batch import Batch, MethodOutput
from .cam import CamParams, gradcam
from .relu_rules import Rule, relu_rule

# Noise samples are drawn in groups of this many per image; a fixed size (not one derived from the
# batch or the runner's budget) keeps each image's noise stream the same whatever the batching.
_NOISE_GROUP = 16


def input_gradients(batch: Batch, x: Tensor, targets: Tensor, rule: Rule | None = None, method: str | None = None) -> Tensor:
    """d logit[target] / d x (B', C, H, W) for any number of inputs through the runner, with the
    ReLU ``rule`` applied when given."""
    if rule is None:
        return batch.runner.input_gradients(x, targets)[0]
    with relu_rule(batch.model, rule, method):
        return batch.runner.input_gradients(x, targets)[0]


# --------------------------------------------------------------------------------------------
# Vanilla gradient, DeconvNet, guided backprop, guided Grad-CAM


@dataclass(frozen=True)
class PixelParams:
    render: Render = "magnitude"  # magnitude: |map|; diverging: the signed map; positive: clipped at 0
    reduce: ChannelReduce | None = None  # over colour channels; None: max_abs for magnitude, else sum


@register(
    "saliency",
    family="gradient",
    summary="Vanilla gradient: |d score / d input|, the largest over colour channels (signed with render: diverging)",
    paper="Simonyan et al. 2014, Deep Inside Convolutional Networks",
    space="pixel",
    grad_of="input",
    needs_layer=False,
    signed=True,
    params=PixelParams,
    cost=lambda p, c: (1, 1),
    aliases=("vanilla_gradient", "vanilla_grad"),
)
def saliency(batch: Batch, p: PixelParams) -> Tensor:
    """M_ij = max_c |d y_t / d x_cij| (render magnitude, the paper's map); with ``render:
    diverging`` the signed gradient summed over channels. Free: the engine's shared backward."""
    if batch.input_grad is None:
        raise MethodError("saliency needs the input gradient of the shared pass")
    return batch.input_grad


@register(
    "guided_backprop",
    family="gradient",
    summary="Guided backpropagation: only positive gradients pass ReLUs, where the input was positive",
    paper="Springenberg et al. 2015, Striving for Simplicity: The All Convolutional Net",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=PixelParams,
    cost=lambda p, c: (2, 1),
    aliases=("guided_backpropagation", "gbp"),
)
def guided_backprop(batch: Batch, p: PixelParams) -> Tensor:
    """The input gradient with every ReLU's backward replaced by relu(g) * 1[x > 0]."""
    return input_gradients(batch, batch.x, batch.targets, "guided", "guided_backprop")


@register(
    "deconvnet",
    family="gradient",
    summary="DeconvNet: gradients with ReLUs applied to the backward signal, ignoring the forward mask",
    paper="Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=PixelParams,
    cost=lambda p, c: (2, 1),
    aliases=("deconvolution", "deconv"),
)
def deconvnet(batch: Batch, p: PixelParams) -> Tensor:
    """The input gradient with every ReLU's backward replaced by relu(g)."""
    return input_gradients(batch, batch.x, batch.targets, "deconvnet", "deconvnet")


@register(
    "guided_gradcam",
    family="gradient",
    summary="Guided Grad-CAM: guided backprop times the Grad-CAM map upsampled (bilinear) to the input",
    paper="Selvaraju et al. 2017, Grad-CAM",
    space="pixel",
    grad_of="layer",
    needs_layer=True,
    signed=True,
    params=PixelParams,
    cost=lambda p, c: (2, 2),
    aliases=("guided_grad_cam",),
)
def guided_gradcam(batch: Batch, p: PixelParams) -> Tensor:
    """GBP (B, C, H, W) * bilinear(ReLU Grad-CAM at the target layer) (B, 1, H, W). Captum's
    GuidedGradCam upsamples with ``nearest`` by default; the paper says bilinear."""
    cam = gradcam(batch, CamParams(relu=True))
    up = F.interpolate(cam[:, None], size=tuple(batch.x.shape[-2:]), mode="bilinear", align_corners=False)
    gbp = input_gradients(batch, batch.x, batch.targets, "guided", "guided_gradcam")
    return gbp * up


# --------------------------------------------------------------------------------------------
# SmoothGrad

_BASE_RULES: dict[str, Rule | None] = {"saliency": None, "guided_backprop": "guided", "deconvnet": "deconvnet"}


@dataclass(frozen=True)
class SmoothGradParams:
    base: Literal["saliency", "guided_backprop", "deconvnet"] = "saliency"  # the gradient that is smoothed
    samples: int = field(default=50, metadata={"check": positive})  # noisy copies per image
    sigma: float = field(default=0.15, metadata={"check": non_negative})  # noise std / (max - min) of the input
    variant: Literal["mean", "squared", "vargrad"] = "mean"  # E[g]; E[g^2] (Hooker 2019); Var[g] (Adebayo 2018)
    render: Render = "magnitude"
    reduce: ChannelReduce | None = None  # None: max_abs for magnitude, else sum


@register(
    "smoothgrad",
    family="gradient",
    summary="SmoothGrad: a gradient method averaged over noisy copies (also SmoothGrad-squared, VarGrad)",
    paper="Smilkov et al. 2017, SmoothGrad: removing noise by adding noise",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=SmoothGradParams,
    cost=lambda p, c: (p.samples + 1, p.samples),
    aliases=("smooth_grad",),
)
def smoothgrad(batch: Batch, p: SmoothGradParams) -> Tensor:
    """x_s = x + N(0, (sigma * (max x - min x))^2) per image; the base gradient g_s at every x_s;
    map = mean_s g_s (``mean``), mean_s g_s^2 (``squared``) or the population variance of g_s
    (``vargrad``), per channel, then reduced over channels. Noise comes from each image's own
    generator in groups of a fixed size, so maps do not depend on the batching."""
    x, t = batch.x, batch.targets
    b = batch.size
    rule = _BASE_RULES[p.base]
    flat = x.flatten(1)
    scale = (p.sigma * (flat.amax(1) - flat.amin(1))).view(b, 1, 1, 1, 1)
    gens = batch.generators()
    n_done = 0
    total = mean = m2 = None
    with relu_rule(batch.model, rule, f"smoothgrad ({p.base})") if rule else nullcontext():
        while n_done < p.samples:
            k = min(_NOISE_GROUP, p.samples - n_done)
            noise = torch.stack(
                [torch.randn((k, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) for g in gens]
            )
            xs = (x[:, None] + noise * scale).flatten(0, 1)
            g = batch.runner.input_gradients(xs, t.repeat_interleave(k))[0].view(b, k, *x.shape[1:])
            if p.variant == "mean":
                s = g.sum(1)
                total = s if total is None else total + s
            elif p.variant == "squared":
                s = g.square().sum(1)
                total = s if total is None else total + s
            else:  # Chan et al.'s pairwise update of mean and sum of squared deviations
                mean_b = g.mean(1)
                m2_b = (g - mean_b[:, None]).square().sum(1)
                if mean is None or m2 is None:
                    mean, m2 = mean_b, m2_b
                else:
                    delta = mean_b - mean
                    n_new = n_done + k
                    mean = mean + delta * (k / n_new)
                    m2 = m2 + m2_b + delta.square() * (n_done * k / n_new)
            n_done += k
    if p.variant == "vargrad":
        assert m2 is not None
        attr = m2 / p.samples
    else:
        assert total is not None
        attr = total / p.samples
    return attr


# --------------------------------------------------------------------------------------------
# Integrated Gradients

QuadRule = Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]


@lru_cache(maxsize=64)
def quadrature(rule: str, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(alphas, weights) on [0, 1] for ``steps`` points: Gauss-Legendre nodes, or Riemann sums with
    left / right / middle points or the trapezoid rule. The same points as Captum's methods of the
    same names, so the two give equal maps for equal steps. Departure: Captum's trapezoid weights its
    n points by 1/n (halved at both ends), which sums to (n - 1)/n; here the points are 1/(n - 1)
    apart and weighted accordingly, so a constant gradient integrates exactly."""
    n = steps
    if rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        return tuple(float(a) for a in 0.5 * (nodes + 1)), tuple(float(v) for v in 0.5 * w)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ConfigError("methods.integrated_gradients.steps: the trapezoid rule needs at least 2 steps")
        alphas = np.linspace(0.0, 1.0, n)
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return tuple(float(a) for a in alphas), tuple(float(v) for v in w)
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    return tuple((i + offset) / n for i in range(n)), (1.0 / n,) * n


@dataclass(frozen=True)
class IGParams:
    baseline: Literal["black", "blurred", "uniform", "image"] = "black"
    # baseline: image: a path, decoded and preprocessed once at setup into image_tensor (plan.prepare)
    image: str | None = field(default=None, metadata={IMAGE_FILE: "image_tensor"})
    steps: int = field(default=50, metadata={"check": positive})
    rule: QuadRule = "gausslegendre"  # the quadrature along the path (Captum's default too)
    blur_sigma: float = field(default=10.0, metadata={"check": positive})  # baseline blurred: std in input pixels
    render: Render = "diverging"
    reduce: ChannelReduce = "sum"  # sum over channels keeps completeness for the map
    # The baseline image as a model input (C, H, W): filled at setup from ``image``, or given
    # directly from Python (explain_tensor params={"baseline": "image", "image_tensor": t}).
    image_tensor: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = "methods.integrated_gradients"
        if self.baseline == "image" and self.image is None and self.image_tensor is None:
            raise ConfigError(f"{key}.image: baseline 'image' needs an image path", "add image: path/to/baseline.png")
        if self.baseline != "image" and (self.image is not None or self.image_tensor is not None):
            raise ConfigError(
                f"{key}.image: a baseline image is given but baseline is {self.baseline!r}", "set baseline: image"
            )
        if self.rule == "riemann_trapezoid" and self.steps < 2:
            raise ConfigError(f"{key}.steps: the trapezoid rule needs at least 2 steps, got {self.steps}")


def ig_baseline(batch: Batch, p: IGParams) -> Tensor:
    """The baseline x' (B, C, H, W) in model-input space."""
    x = batch.x
    if p.baseline == "black":
        return batch.pixels.to_model(torch.zeros_like(x[:1])).expand_as(x)
    if p.baseline == "uniform":
        noise = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                             for g in batch.generators()])
        return batch.pixels.to_model(noise)
    if p.baseline == "blurred":
        return gaussian_blur(x, p.blur_sigma)
    if p.image_tensor is None:
        raise MethodError(
            f"integrated_gradients: the baseline image {p.image!r} was not loaded",
            "the engine loads it at setup; from Python pass params={'baseline': 'image', 'image_tensor': tensor}",
        )
    img = p.image_tensor.to(device=x.device, dtype=x.dtype)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if tuple(img.shape) != tuple(x.shape[1:]):
        raise MethodError(
            f"integrated_gradients: the baseline image has shape {tuple(img.shape)}, the inputs {tuple(x.shape[1:])}",
            "the baseline goes through the same preprocessing as the inputs; check preprocess.resize / crop",
        )
    return img.expand_as(x)


def integrated_attributions(batch: Batch, baseline: Tensor, p: IGParams) -> Tensor:
    """(x - x') * sum_s w_s * d y_t / d x at x' + a_s (x - x'), (B, C, H, W). Steps are grouped so
    that each runner call holds about one budget of inputs."""
    x, t = batch.x, batch.targets
    b = batch.size
    alphas, weights = quadrature(p.rule, p.steps)
    delta = x - baseline
    per_call = max(1, batch.runner.budget // b)
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for s0 in range(0, p.steps, per_call):
        a = torch.tensor(alphas[s0 : s0 + per_call], dtype=x.dtype, device=x.device)
        w = torch.tensor(weights[s0 : s0 + per_call], dtype=torch.float32, device=x.device)
        k = a.numel()
        xs = (baseline[:, None] + a.view(1, k, 1, 1, 1) * delta[:, None]).flatten(0, 1)
        g = batch.runner.input_gradients(xs, t.repeat_interleave(k))[0].view(b, k, *x.shape[1:])
        acc += (g * w.view(1, k, 1, 1, 1)).sum(1)
    return delta.float() * acc


@register(
    "integrated_gradients",
    family="gradient",
    summary="Integrated Gradients: gradients along the path from a baseline (black, blurred, noise, image)",
    paper="Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=IGParams,
    cost=lambda p, c: (p.steps + 2, p.steps),
    aliases=("ig", "integrated_gradient"),
)
def integrated_gradients(batch: Batch, p: IGParams) -> MethodOutput:
    """IG_i = (x_i - x'_i) * int_0^1 d y_t(x' + a (x - x')) / d x_i da by the ``rule`` quadrature.
    Completeness: sum_i IG_i = y_t(x) - y_t(x'); the gap (sum IG - (y(x) - y(x'))) and the gap
    relative to |y(x) - y(x')| go to scores.jsonl as ``completeness_gap`` / ``completeness_rel``."""
    baseline = ig_baseline(batch, p)
    attr = integrated_attributions(batch, baseline, p)
    diff = batch.target_scores() - batch.runner.scores(baseline, batch.targets)
    gap = attr.sum((1, 2, 3)) - diff
    extras = {"completeness_gap": gap, "completeness_rel": gap / diff.abs().clamp_min(1e-12)}
    return MethodOutput(attr, extras)


__all__: list[str] = [
    "IGParams",
    "PixelParams",
    "SmoothGradParams",
    "ig_baseline",
    "input_gradients",
    "integrated_attributions",
    "quadrature",
    "relu_rule",
]
