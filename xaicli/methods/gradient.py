"""Gradient methods: vanilla gradient (saliency), DeconvNet, guided backpropagation, guided
Grad-CAM, SmoothGrad (with SmoothGrad-squared and VarGrad) and Integrated Gradients.

Every map is computed in pixel space: (B, C, H, W) attributions reduced over the colour channels
to (B, H, W) here (``reduce`` knob), then scaled and rendered by the engine as the ``render`` knob
says (``diverging`` keeps the sign, ``magnitude`` shows |v|, ``positive`` clips at 0).

The ReLU backward rules (DeconvNet, guided backprop) are applied by :func:`relu_rule`, which
replaces the ``forward`` of every ``nn.ReLU`` / ``nn.ReLU6`` module instance with an autograd
function for the duration of one call and restores the modules exactly afterwards. ReLUs called
as functions (``torch.relu``, ``F.relu``, ``Tensor.relu`` in a model's ``forward``) cannot be
rewritten that way; they are detected while the model runs and the method stops with an error
instead of returning a map that silently mixes the rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import IMAGE_FILE, non_negative, positive
from ..errors import ConfigError, MethodError
from ..ops import gaussian_blur
from ..render import reduce_channels
from . import register
from .batch import Batch, MethodOutput
from .cam import CamParams, gradcam

Render = Literal["diverging", "magnitude", "positive"]
ChannelReduce = Literal["max_abs", "sum", "mean", "l2"]
Rule = Literal["guided", "deconvnet"]

# Noise samples are drawn in groups of this many per image; a fixed size (not one derived from the
# batch or the runner's budget) keeps each image's noise stream the same whatever the batching.
_NOISE_GROUP = 16


def _finish(attr: Tensor, render: str, reduce: str | None) -> Tensor:
    """(B, C, H, W) attributions -> (B, H, W). ``reduce`` None: the largest |value| over channels
    for ``magnitude`` (Simonyan et al.'s saliency), the signed sum otherwise."""
    how = reduce or ("max_abs" if render == "magnitude" else "sum")
    return reduce_channels(attr.float(), how)


# --------------------------------------------------------------------------------------------
# ReLU backward rules


class _ReluRule(torch.autograd.Function):
    """y = clamp(x, 0, upper) forward; the backward replaces the ReLU's gradient by a rule:
    guided: relu(g) * 1[0 < x < upper] (Springenberg et al. 2015);
    deconvnet: relu(g), the forward mask ignored (Zeiler & Fergus 2014)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None, deconv: bool) -> Tensor:
        y = x.clamp_min(0) if upper is None else x.clamp(0, upper)
        ctx.deconv = deconv
        if not deconv:
            # A bool mask, not the output: later in-place ops on the output cannot invalidate it.
            mask = x > 0 if upper is None else (x > 0) & (x < upper)
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        out = g.clamp_min(0)
        if not ctx.deconv:
            (mask,) = ctx.saved_tensors
            out = out * mask
        return out, None, None


def _rule_forward(x: Tensor, *, upper: float | None, deconv: bool) -> Tensor:
    return _ReluRule.apply(x, upper, deconv)


_FUNCTIONAL_RELUS = {
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    F.relu: "F.relu",
    F.relu_: "F.relu_",
    F.relu6: "F.relu6",
    F.hardtanh: "F.hardtanh",
    F.hardtanh_: "F.hardtanh_",
    Tensor.relu: "Tensor.relu",
    Tensor.relu_: "Tensor.relu_",
}

_NOT_ACTIVATIONS = {"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "Identity"}
_ACTIVATION_NAMES = ("swish", "silu", "gelu", "mish", "hardswish", "sigmoid", "tanh", "elu")


class _FunctionalReluCheck(TorchFunctionMode):
    """Stops the forward at a ReLU called as a function: the rule cannot be applied to it."""

    def __init__(self, method: str, model: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.model_name = type(model).__name__

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _FUNCTIONAL_RELUS.get(func)
        if name is not None:
            raise MethodError(
                f"{self.method}: {self.model_name} calls {name} inside its forward; the {self.method} rule "
                "rewrites only nn.ReLU / nn.ReLU6 modules, so this ReLU would keep its plain gradient and "
                "the map would mix two rules. Models that apply ReLU as a function (torch.relu, F.relu, "
                "Tensor.relu; e.g. torchvision's Inception v3 and GoogLeNet) cannot be handled",
                "use saliency, smoothgrad or integrated_gradients on this model, or replace the functional "
                "calls by nn.ReLU modules",
            )
        return func(*args, **(kwargs or {}))


def _other_activations(model: nn.Module) -> list[str]:
    names = []
    for m in model.modules():
        cls = type(m)
        n = cls.__name__
        if n in _NOT_ACTIVATIONS or isinstance(m, (nn.ReLU, nn.ReLU6)):
            continue  # ReLU subclasses with their own forward are reported by the functional check
        if cls.__module__ == "torch.nn.modules.activation" or any(a in n.lower() for a in _ACTIVATION_NAMES):
            names.append(n)
    return names


@contextmanager
def relu_rule(model: nn.Module, rule: Rule, method: str | None = None) -> Iterator[int]:
    """Apply ``rule`` to the backward of every ``nn.ReLU`` / ``nn.ReLU6`` of ``model`` inside the
    block; yields how many modules were rewritten.

    Each ReLU module keeps its identity, ``inplace`` flag, hooks and training flag: only an
    instance attribute ``forward`` is set for the block and removed on exit (also on error), so a
    module used several times (torchvision's ResNet blocks) gets the rule at every call. The
    replacement computes out of place (an in-place ReLU's result is the same tensor value).
    ReLU6 keeps its upper clip: guided passes relu(g) where 0 < x < 6.
    Raises MethodError for TorchScript modules, for functional ReLU calls met during the forward,
    and for a model whose only activations are not ReLUs (the map would be the plain gradient).
    """
    method = method or ("deconvnet" if rule == "deconvnet" else "guided_backprop")
    if isinstance(model, torch.jit.ScriptModule):
        raise MethodError(
            f"{method}: {type(model).__name__} is a TorchScript module; its ReLUs cannot be rewritten",
            "load the eager (Python) model instead",
        )
    # Subclasses that override forward are left alone: their own forward calls F.relu, which the
    # check below reports, rather than having their extra behaviour silently dropped.
    relus = [
        m for m in model.modules()
        if (isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward)
        or (isinstance(m, nn.ReLU6) and type(m).forward is nn.ReLU6.forward)
    ]
    if not relus:
        others = _other_activations(model)
        if others:
            kinds = sorted(set(others))
            raise MethodError(
                f"{method}: {type(model).__name__} has no nn.ReLU / nn.ReLU6 modules (its activations: "
                f"{', '.join(kinds)}); the {method} rule is defined for ReLUs only, so the map would be "
                "the plain gradient",
                "use saliency (or smoothgrad / integrated_gradients) on this model",
            )
    deconv = rule == "deconvnet"
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        for m in relus:
            had = "forward" in m.__dict__
            saved.append((m, had, m.__dict__.get("forward")))
            upper = float(m.max_val) if isinstance(m, nn.ReLU6) else None
            m.__dict__["forward"] = partial(_rule_forward, upper=upper, deconv=deconv)
        with _FunctionalReluCheck(method, model):
            yield len(relus)
    finally:
        for m, had, old in reversed(saved):
            if had:
                m.__dict__["forward"] = old
            else:
                m.__dict__.pop("forward", None)


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
    return _finish(batch.input_grad, p.render, p.reduce)


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
    return _finish(input_gradients(batch, batch.x, batch.targets, "guided", "guided_backprop"), p.render, p.reduce)


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
    return _finish(input_gradients(batch, batch.x, batch.targets, "deconvnet", "deconvnet"), p.render, p.reduce)


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
    return _finish(gbp * up, p.render, p.reduce)


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
    return _finish(attr, p.render, p.reduce)


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
    return MethodOutput(_finish(attr, p.render, p.reduce), extras)


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
