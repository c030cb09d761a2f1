"""Captum's attribution methods: Input x Gradient and GradientSHAP (expected gradients), pixel maps
(B, C, H, W) in the model's input space, signed, reduced over colour channels by the engine.

Baselines are in model-input space, built from pixel values through the run's normalisation
(``batch.pixels``): ``black`` is the black image (Captum's zero baseline only when the inputs are
raw pixels), ``white`` the white one, ``uniform`` uniform noise in pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import non_negative, positive
from ..errors import MethodError
from ..render import ChannelReduce, Render
from . import register
from .batch import Batch, MethodOutput

# Samples are drawn in groups of this many per image: a fixed size keeps each image's random stream
# the same whatever the batching (as SmoothGrad's noise).
_SAMPLE_GROUP = 64


@dataclass(frozen=True)
class InputXGradientParams:
    render: Render = "diverging"
    reduce: ChannelReduce = "sum"  # sum over channels: the map sums to sum_i x_i dy/dx_i


@register(
    "input_x_gradient",
    family="gradient",
    summary="Input x Gradient: the input times the gradient of the class score (Captum's InputXGradient)",
    paper="Shrikumar et al. 2016, Not Just a Black Box (gradient * input)",
    space="pixel",
    grad_of="input",
    needs_layer=False,
    signed=True,
    params=InputXGradientParams,
    cost=lambda p, c: (1, 1),
    aliases=("inputxgradient", "gradient_x_input", "grad_x_input"),
)
def input_x_gradient(batch: Batch, p: InputXGradientParams) -> Tensor:
    """x * d y_t / d x (B, C, H, W) in model-input space, from the engine's shared backward. For a
    bias-free piecewise-linear network (ReLU, max/avg pooling, no biases) it sums to the logit
    (Euler's theorem for positively homogeneous functions)."""
    if batch.input_grad is None:
        raise MethodError("input_x_gradient needs the input gradient of the shared pass")
    return batch.x.float() * batch.input_grad


# --------------------------------------------------------------------------------------------
# GradientSHAP


@dataclass(frozen=True)
class GradientShapParams:
    # Where each sample's baseline comes from: black (one image), black_white (black or white at
    # random per sample), uniform (fresh uniform noise in pixel space per sample).
    baseline: Literal["black", "black_white", "uniform"] = "black"
    samples: int = field(default=20, metadata={"check": positive})  # Captum's n_samples (its default 5)
    stdev: float = field(default=0.0, metadata={"check": non_negative})  # input noise, model-input units
    render: Render = "diverging"
    reduce: ChannelReduce = "sum"


def _draws(batch: Batch, gens: list[torch.Generator], p: GradientShapParams, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """k baselines (B, k, C, H, W) in model space, alphas (B, k) and input noise (B, k, C, H, W),
    each image from its own generator (alphas, then baseline choices or noise, then input noise)."""
    x = batch.x
    shape = (k, *x.shape[1:])
    alphas, bases, noises = [], [], []
    for g in gens:
        alphas.append(torch.rand(k, generator=g, device=x.device, dtype=x.dtype))
        if p.baseline == "black":
            pix = x.new_zeros((1, *x.shape[1:])).expand(shape)
        elif p.baseline == "black_white":
            white = torch.rand(k, generator=g, device=x.device) < 0.5
            pix = white.to(x.dtype).view(k, 1, 1, 1).expand(shape)
        else:
            pix = torch.rand(shape, generator=g, device=x.device, dtype=x.dtype)
        bases.append(batch.pixels.to_model(pix))
        noise = torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) * p.stdev if p.stdev else None
        noises.append(noise if noise is not None else x.new_zeros(()).expand(shape))
    return torch.stack(bases), torch.stack(alphas), torch.stack(noises)


@register(
    "gradientshap",
    family="gradient",
    summary="GradientSHAP: expected (input - baseline) x gradient at random points between them (Captum's GradientShap)",
    paper="Lundberg & Lee 2017, A Unified Approach to Interpreting Model Predictions (expected gradients)",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=GradientShapParams,
    cost=lambda p, c: (p.samples + 2 if p.baseline == "black" else 2 * p.samples + 1, p.samples),
    aliases=("gradient_shap", "expected_gradients"),
)
def gradientshap(batch: Batch, p: GradientShapParams) -> MethodOutput:
    """phi = mean_s (x~_s - b_s) * d y_t / d x at b_s + a_s (x~_s - b_s), with x~_s = x + N(0, stdev^2),
    b_s drawn from the baseline distribution and a_s ~ U(0, 1): Captum's GradientShap (a NoiseTunnel
    over InputBaselineXGradient). In expectation sum phi = E[y_t(x~) - y_t(b)] (completeness of the
    path integral), so ``completeness_gap`` = sum phi - (y_t(x) - mean_s y_t(b_s)) goes to
    scores.jsonl (it shrinks as 1/sqrt(samples) for stdev 0). Departure from Captum: the random
    draws come from each image's own seeded generator, so maps do not depend on the batching; Captum
    draws from the global NumPy / torch generators, so the two agree in expectation, not sample by
    sample."""
    x, t = batch.x, batch.targets
    b = batch.size
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    base_scores = torch.zeros(b, dtype=torch.float32, device=x.device)
    done = 0
    gens = batch.generators()
    while done < p.samples:
        k = min(_SAMPLE_GROUP, p.samples - done)
        bases, alphas, noise = _draws(batch, gens, p, k)
        delta = x[:, None] + noise - bases
        xs = (bases + alphas.view(b, k, 1, 1, 1) * delta).flatten(0, 1)
        g = batch.runner.input_gradients(xs, t.repeat_interleave(k))[0].view(b, k, *x.shape[1:])
        total += (delta.float() * g).sum(1)
        if p.baseline != "black":
            base_scores += batch.runner.scores(bases.flatten(0, 1), t.repeat_interleave(k)).view(b, k).sum(1)
        done += k
    if p.baseline == "black":
        base_scores = batch.runner.scores(bases[:, 0].contiguous(), t) * p.samples
    attr = total / p.samples
    gap = attr.sum((1, 2, 3)) - (batch.target_scores() - base_scores / p.samples)
    return MethodOutput(attr, {"completeness_gap": gap})
