"""DeepLIFT with the rescale rule (Shrikumar et al. 2017), as Captum's DeepLift.

Each input is forwarded together with its baseline in one batch [x; b]. For the duration of the call
every element-wise activation module (ReLU, ReLU6, LeakyReLU, ELU, Sigmoid, Tanh, Softplus, SiLU,
GELU, Hardswish, Hardsigmoid) gets the rescale rule as its backward, multiplier
(f(x) - f(b)) / (x - b) (the plain derivative where |x - b| < eps), and every nn.MaxPool2d Captum's
max-pooling rule; linear layers (convolutions, batch norm in eval mode, average pooling, sums of
residual branches) keep their gradient. The attribution is (x - b) times the resulting multipliers,
which sums to y_t(x) - y_t(b) when every non-linearity of the model is such a module
("summation-to-delta"); the gap goes to scores.jsonl as ``completeness_gap``.

Unlike Captum, a module called several times in a forward (torchvision ResNet's shared ReLU, the
default model's shared ReLU6) is handled: the rule is applied per call, with no state kept on the
module. The model's modules are restored exactly on exit, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import positive
from ..errors import MethodError
from ..ops import gaussian_blur
from ..render import ChannelReduce, Render
from . import register
from .batch import Batch, MethodOutput, split_on_oom
from .relu_rules import _FunctionalReluCheck

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.SiLU, nn.GELU,
               nn.Hardswish, nn.Hardsigmoid)
EPS = 1e-10  # Captum's default: below this |x - b| the plain derivative is used


class _Rescale(torch.autograd.Function):
    """y = f(v) on the paired batch [x; b]; backward: g * (f(x) - f(b)) / (x - b) for both halves."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        y = fn(v.clone())
        ctx.fn = fn
        ctx.save_for_backward(v, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        v, y = ctx.saved_tensors
        with torch.enable_grad():
            leaf = v.detach().requires_grad_(True)
            (plain,) = torch.autograd.grad(ctx.fn(leaf.clone()), leaf, g)
        vx, vb = v.chunk(2)
        yx, yb = y.chunk(2)
        d_in, d_out = (vx - vb).repeat(2, *[1] * (v.dim() - 1)), (yx - yb).repeat(2, *[1] * (v.dim() - 1))
        safe = torch.where(d_in.abs() < EPS, torch.ones_like(d_in), d_in)
        return torch.where(d_in.abs() < EPS, plain, g * d_out / safe), None


class _MaxPoolRule(torch.autograd.Function):
    """Captum's DeepLIFT rule for max pooling: the output difference of each window, split between
    the positions of the maximum of x and of b, divided by x - b there (summed where windows overlap)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, pool: nn.MaxPool2d) -> Tensor:
        y, idx = F.max_pool2d(v, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True)
        ctx.save_for_backward(v, y, idx)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        v, y, idx = ctx.saved_tensors
        vx, vb = v.chunk(2)
        yx, yb = y.chunk(2)
        top = torch.max(yx, yb)
        spread = g * torch.cat([top - yb, yx - top])
        ux, ub = _unpool(spread, idx, v).chunk(2)
        num = (ux + ub).repeat(2, 1, 1, 1)
        d_in = (vx - vb).repeat(2, 1, 1, 1)
        safe = torch.where(d_in.abs() < EPS, torch.ones_like(d_in), d_in)
        return torch.where(d_in.abs() < EPS, _unpool(g, idx, v), num / safe), None


def _unpool(values: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """Scatter-add pooled values (N, C, h, w) back to the positions ``idx`` of the maxima in ``like``
    (N, C, H, W). Adds where windows overlap (Captum's max_unpool2d keeps one of them, which breaks
    summation-to-delta for overlapping windows such as ResNet's 3x3 / 2 max pooling)."""
    out = torch.zeros(like.shape[0], like.shape[1], like.shape[2] * like.shape[3], dtype=values.dtype,
                      device=values.device)
    out.scatter_add_(2, idx.flatten(2), values.flatten(2))
    return out.view_as(like)


class _Check(_FunctionalReluCheck):
    """The functional-ReLU check, quiet while a rewritten module runs its own forward (nn.ReLU's
    forward calls F.relu itself)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__("deeplift", model)
        self.inside = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.inside:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


@dataclass(frozen=True)
class _ModuleForward:
    """A module's own forward, run with the functional check quiet."""

    forward: Callable[[Tensor], Tensor]
    check: _Check

    def __call__(self, v: Tensor) -> Tensor:
        self.check.inside += 1
        try:
            return self.forward(v)
        finally:
            self.check.inside -= 1


def _call_rescale(v: Tensor, *, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return _Rescale.apply(v, fn)


def _call_maxpool(v: Tensor, *, pool: nn.MaxPool2d) -> Tensor:
    return _MaxPoolRule.apply(v, pool)


@contextmanager
def deeplift_rules(model: nn.Module) -> Iterator[int]:
    """Inside the block, the model's activation and max-pooling modules apply the DeepLIFT rules to
    paired batches [x; b]; yields how many modules were rewritten. Only an instance ``forward`` is
    set and removed on exit (also on error): identity, flags and hooks stay as they were."""
    if isinstance(model, torch.jit.ScriptModule):
        raise MethodError("deeplift: TorchScript modules cannot be rewritten", "load the eager (Python) model")
    saved: list[tuple[nn.Module, bool, Any]] = []
    check = _Check(model)
    try:
        for m in model.modules():
            if type(m) in ELEMENTWISE:
                new = partial(_call_rescale, fn=_ModuleForward(type(m).forward.__get__(m), check))
            elif type(m) is nn.MaxPool2d and not m.return_indices:
                new = partial(_call_maxpool, pool=m)
            else:
                continue
            saved.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
            m.__dict__["forward"] = new
        with check:
            yield len(saved)
    finally:
        for m, had, old in reversed(saved):
            if had:
                m.__dict__["forward"] = old
            else:
                m.__dict__.pop("forward", None)


@dataclass(frozen=True)
class DeepLiftParams:
    # black: the black image (pixels 0); zero: the model-space zero (Captum's default baseline: the
    # normalisation's mean colour); blurred: a Gaussian blur of the image, std blur_sigma pixels.
    baseline: Literal["black", "zero", "blurred"] = "black"
    blur_sigma: float = field(default=10.0, metadata={"check": positive})
    render: Render = "diverging"
    reduce: ChannelReduce = "sum"  # the sum over channels keeps summation-to-delta for the map


def deeplift_baseline(batch: Batch, p: DeepLiftParams) -> Tensor:
    x = batch.x
    if p.baseline == "black":
        return batch.pixels.to_model(torch.zeros_like(x[:1])).expand_as(x)
    if p.baseline == "zero":
        return torch.zeros_like(x)
    return gaussian_blur(x, p.blur_sigma)


def paired_multipliers(batch: Batch, baseline: Tensor) -> tuple[Tensor, Tensor]:
    """DeepLIFT multipliers d y_t / d x under the rules (B, C, H, W) and y_t(x) - y_t(b) (B,),
    forwarding [x; b] pairs in chunks of half the runner's budget (halved on out-of-memory)."""
    x, t, runner = batch.x, batch.targets, batch.runner
    grads, deltas = [], []

    def one(sl: slice) -> None:
        n = sl.stop - sl.start
        v = torch.cat([x[sl], baseline[sl]]).detach().clone().requires_grad_(True)
        with torch.enable_grad(), runner.autocast():
            out = runner.model(runner.prepare(v)).float()
        score = out.gather(1, t[sl].repeat(2)[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(score.sum(), v)
        grads.append(g[:n].float())
        deltas.append((score[:n] - score[n:]).detach())
        if runner.on_pass is not None:
            runner.on_pass(2 * n)

    def guarded(sl: slice) -> None:
        n_before = len(grads)
        try:
            one(sl)
        except Exception:
            del grads[n_before:], deltas[n_before:]
            raise

    with deeplift_rules(batch.model):
        split_on_oom(guarded, batch.size, max(1, runner.budget // 2))
    return torch.cat(grads), torch.cat(deltas)


@register(
    "deeplift",
    family="gradient",
    summary="DeepLIFT (rescale rule): (input - baseline) x multipliers, sums to the score difference (Captum's DeepLift)",
    paper="Shrikumar et al. 2017, Learning Important Features Through Propagating Activation Differences",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=DeepLiftParams,
    cost=lambda p, c: (3, 1),
    aliases=("deep_lift",),
)
def deeplift(batch: Batch, p: DeepLiftParams) -> MethodOutput:
    """phi = (x - b) * m with m the multipliers of the rescale rule (see the module doc), (B, C, H, W).
    ``completeness_gap`` = sum phi - (y_t(x) - y_t(b)): about 0 (float rounding) when all the
    model's non-linearities are supported modules; functional ReLUs are refused with the reason.
    Departures from Captum: modules used several times work; max pooling keeps summation-to-delta
    (Captum's max-pool rule does not: captum#1276, and its unpooling drops overlapping windows); more
    element-wise activations get the rescale rule (Captum: ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus; ReLU6, SiLU, GELU and the
    hard variants get the plain gradient there)."""
    baseline = deeplift_baseline(batch, p)
    mult, delta = paired_multipliers(batch, baseline)
    attr = (batch.x - baseline).float() * mult
    return MethodOutput(attr, {"completeness_gap": attr.sum((1, 2, 3)) - delta})
