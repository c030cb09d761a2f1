"""FullGrad: the input-gradient term plus the bias-gradient term of every convolution and batch
norm, each made non-negative, scaled and summed at the input's resolution. One extra forward and
backward per image through the engine's runner, with the gradients of all those layers at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import NoParams, register
from .batch import Batch, MethodOutput
from .passes import grad_pass

# Exact types, as pytorch-grad-cam: a subclass may compute more than the affine map (timm's
# BatchNormAct2d applies its activation inside), which would break the decomposition.
BIASED = (nn.Conv2d, nn.BatchNorm2d)


def bias_layers(model: nn.Module) -> list[tuple[nn.Module, Tensor]]:
    """(module, bias (C,)) of each Conv2d / BatchNorm2d with a bias; a batch norm's bias is the one
    of its eval-mode affine map, beta - mean * gamma / sqrt(var + eps)."""
    found = []
    for m in model.modules():
        if type(m) not in BIASED or getattr(m, "bias", None) is None:
            continue
        if isinstance(m, nn.BatchNorm2d):
            if m.running_mean is None or m.running_var is None:
                continue  # batch statistics in eval: no fixed bias
            gamma = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
            bias = m.bias - m.running_mean * gamma / torch.sqrt(m.running_var + m.eps)
        else:
            bias = m.bias
        found.append((m, bias.detach().float()))
    return found


def scale_maps(t: Tensor) -> Tensor:
    """Each (h, w) map of (n, C, h, w) shifted to min 0 and divided by (max + 1e-7), as
    pytorch-grad-cam's scale_cam_image."""
    flat = t.flatten(2)
    shifted = t - flat.amin(2)[..., None, None]
    return shifted / (shifted.flatten(2).amax(2)[..., None, None] + 1e-7)


@register(
    "fullgrad",
    family="cam",
    summary="FullGrad: |input x gradient| plus |bias x gradient| of every conv / batch norm, summed",
    paper="Srinivas & Fleuret 2019, Full-Gradient Representation for Neural Network Visualization",
    space="pixel",
    needs_layer=False,
    params=NoParams,
    cost=lambda p, c: (2, 1),
)
def fullgrad(batch: Batch, p: NoParams) -> MethodOutput:
    """map = sum_c s(|x * dy/dx|)_c + sum_layers sum_c Up(s(|b_c * dy/dz_c|)), (B, H, W) at the input
    resolution, with s the per-map min-max scaling and Up bilinear upsampling (as pytorch-grad-cam:
    it scales each channel before summing; the paper's post-processing is abs then upsample).
    The target layer is not used. Layers: every nn.Conv2d and nn.BatchNorm2d (exact types) with a
    bias; a model without them gets the input term alone.

    Extra ``completeness`` (per image): x . dy/dx + sum_layers b . dy/dz, the full-gradient
    decomposition: on a piecewise-linear network it equals the target logit minus the biases of
    the layers not covered (a linear head's bias)."""
    layers = bias_layers(batch.model)
    biases = [b for _, b in layers]
    size = tuple(batch.x.shape[-2:])
    x, targets = batch.x, batch.targets

    def reduce(idx: Tensor, xs: Tensor, logits: Tensor, zs: list[Tensor]) -> Tensor:
        score = logits.gather(1, targets[idx, None]).sum()
        grads = torch.autograd.grad(score, [xs, *zs], allow_unused=True)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(xs)
        total = (xs * gx).float().flatten(1).sum(1)
        heat = scale_maps((xs * gx).abs().float()).sum(1)
        for bias, g in zip(biases, grads[1:], strict=True):
            if g is None:
                continue
            bg = bias[None, :, None, None] * g.float()
            total = total + bg.flatten(1).sum(1)
            # Upsampling is linear: sum the channels first, then upsample one map (not C of them).
            summed = scale_maps(bg.abs()).sum(1, keepdim=True)
            heat = heat + F.interpolate(summed, size=size, mode="bilinear", align_corners=False)[:, 0]
        return torch.cat([heat.flatten(1), total[:, None]], 1)

    out = grad_pass(batch, [(m, False) for m, _ in layers], lambda idx: x[idx], batch.size, reduce)
    heat = out[:, :-1].view(batch.size, *size)
    return MethodOutput(heat, {"completeness": out[:, -1]})
