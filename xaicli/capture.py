"""The capture step, between the model's forward and the methods: one shared forward with the
target layer's tensor recorded (hooks in a ``with`` block, removed on exit, also on error), then
the gradients of the explained class scores with respect to that tensor and the input. Gradients
come from ``torch.autograd.grad`` on the recorded tensor, never from backward hooks, so in-place
ReLUs work and no parameter ``.grad`` piles up. The layer's output is brought to the (B, C, h, w)
layout the methods read here, in one place, for activations and gradients alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import LayerError, MethodError
from .layers import LayerRef, TensorLayout, detect_layout


@dataclass
class Recorder:
    """The tensor seen at the layer on its last call during the forward, and the call count."""

    layer: LayerRef | None
    value: Tensor | None = None
    calls: int = 0

    def tensor(self) -> Tensor:
        assert self.layer is not None
        if self.value is None:
            raise LayerError(
                f"target_layer {self.layer.spec!r} did not run during the forward pass",
                "pick a module that the model's forward uses (`xai layers` shows which ran)",
            )
        if self.calls > 1:
            raise LayerError(
                f"target_layer {self.layer.spec!r} ran {self.calls} times in one forward pass (a module the "
                "model reuses); its maps would silently show only the last call",
                "pick a module that runs once per forward (`xai layers` shows the calls of each)",
            )
        return self.value


def _first_tensor(v: Any) -> Tensor | None:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], Tensor):
        return v[0]
    return None


@contextmanager
def record(layer: LayerRef | None) -> Iterator[Recorder]:
    """Record the layer's output (or input for ``NAME:input``) while the block runs."""
    rec = Recorder(layer)
    if layer is None:
        yield rec
        return

    def keep(v: Any) -> None:
        t = _first_tensor(v)
        if t is None:
            raise LayerError(
                f"target_layer {layer.spec!r} gives {type(v).__name__}, not a tensor",
                "pick a module whose output is a tensor (B, C, h, w)",
            )
        rec.value = t
        rec.calls += 1

    handle: Any
    if layer.use_input:
        handle = layer.module.register_forward_pre_hook(lambda m, args: keep(args))
    else:
        handle = layer.module.register_forward_hook(lambda m, args, out: keep(out))
    try:
        yield rec
    finally:
        handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block and restore each module's own flag after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


# --------------------------------------------------------------------------------------------
# The model's output


class LogitsOnly(nn.Module):
    """Wraps a model whose forward returns a tuple, dict or object with ``.logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: Tensor) -> Tensor:
        return as_logits(self.inner(x))


def as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise MethodError(f"the model returned {type(out).__name__}; expected a logits tensor (B, classes)", _task_hint(out))


def _task_hint(out: Any) -> str | None:
    """What the output looks like when it is not a classifier's: detection (boxes per image) or
    segmentation (a map per class, torchvision's {'out': ...})."""
    first = out[0] if isinstance(out, (tuple, list)) and out else None
    if isinstance(first, dict) and "boxes" in first:
        return ("this looks like a detection model (boxes per image); xaicli explains image classifiers, "
                "so explain its backbone with a classification head, or use a classifier")
    if isinstance(out, dict) and isinstance(out.get("out"), Tensor) and out["out"].dim() == 4:
        return ("this looks like a segmentation model (a map per class); xaicli explains image classifiers, "
                "so explain a classifier, or wrap the model to return (B, classes) scores (model.factory)")
    return None


# --------------------------------------------------------------------------------------------
# The shared forward and its gradients


@dataclass
class Capture:
    """What one shared forward gives the methods of a batch. ``logits`` (B, N) and
    ``activations`` (B, C, h, w) are float32 and detached; :meth:`gradients` differentiates the
    class scores of given targets, once per target rank."""

    layer: LayerRef | None
    layout: TensorLayout | None  # how the layer's output holds its map (converted to (B, C, h, w) here)
    grad_of: frozenset[str]  # "layer" and/or "input": which gradients the methods read
    x: Tensor  # the input the model saw (requires grad when gradients are taken)
    logits: Tensor
    activations: Tensor | None
    _live: Tensor | None  # the logits inside the autograd graph
    _acts_live: Tensor | None  # the layer's tensor inside the graph, in its own layout

    def gradients(self, targets: Tensor, retain: bool) -> tuple[Tensor | None, Tensor | None]:
        """d logit[target] / d activations (B, C, h, w) and / d input (B, C, H, W), float32 and
        detached, each None unless ``grad_of`` asks for it. ``targets`` (B,). ``retain``: keep the
        graph for another target rank."""
        if not self.grad_of:
            return None, None
        assert self._live is not None
        wrt: list[Tensor] = []
        if "layer" in self.grad_of:
            assert self._acts_live is not None
            if not self._acts_live.requires_grad:
                raise MethodError(
                    f"target_layer {self.layer.spec if self.layer else '?'} is not connected to the logits "
                    "by differentiable operations",
                    "pick a layer before the classifier whose output feeds it",
                )
            wrt.append(self._acts_live)
        if "input" in self.grad_of:
            wrt.append(self.x)
        score = self._live.float().gather(1, targets[:, None]).sum()
        found = iter(torch.autograd.grad(score, wrt, retain_graph=retain, allow_unused=True))
        grads = input_grad = None
        if "layer" in self.grad_of:
            g = next(found)
            assert self.activations is not None
            grads = torch.zeros_like(self.activations) if g is None else _spatial(self.layout, g.detach().float())
        if "input" in self.grad_of:
            g = next(found)
            input_grad = torch.zeros_like(self.x, dtype=torch.float32) if g is None else g.detach().float()
        return grads, input_grad

    def release(self) -> None:
        """Drop the autograd graph (the last target rank is done)."""
        self._live = self._acts_live = None


def forward(model: nn.Module, x: Tensor, layer: LayerRef | None, grad_of: frozenset[str],
            autocast: Callable[[], AbstractContextManager[object]] = nullcontext) -> Capture:
    """The shared forward of a batch ``x`` (already in the model's memory format), recording
    ``layer``; inside the autograd graph when ``grad_of`` names gradients (they flow from the
    input even when the user's parameters are frozen), else under ``inference_mode``."""
    xin = x.detach()
    if grad_of:
        xin = xin.clone().requires_grad_(True)
    grad_ctx = torch.enable_grad() if grad_of else torch.inference_mode()
    with record(layer) as rec, grad_ctx, autocast():
        live = as_logits(model(xin))
    layout = raw = acts = None
    if layer is not None:
        raw = rec.tensor()  # in the graph: gradients are taken with respect to it, then converted alike
        # engine.setup found the layout once from its dummy forward; a bare call finds it here
        layout = layer.layout or detect_layout(tuple(raw.shape), (int(x.shape[-2]), int(x.shape[-1])))
        acts = _spatial(layout, raw.detach().float())
    return Capture(layer, layout, grad_of, xin, live.detach().float(), acts, live if grad_of else None,
                   raw if grad_of else None)


def layout_of(layer: LayerRef, t: Tensor, x: Tensor) -> TensorLayout | None:
    """The layout of ``t``, a tensor at ``layer`` for the input ``x``: the one setup found, else
    detected from the shapes (a bare call)."""
    return layer.layout or detect_layout(tuple(t.shape), (int(x.shape[-2]), int(x.shape[-1])))


def channel_dim(layer: LayerRef, t: Tensor, x: Tensor) -> int:
    """The dimension of ``t`` (the layer's own tensor) that holds its channels: 1 for (B, C, h, w),
    the last for channels-last grids and tokens (for methods that rewrite the layer's tensor)."""
    layout = layout_of(layer, t, x)
    return 1 if layout is None or layout.kind == "nchw" else -1


def layer_map(layer: LayerRef, t: Tensor, x: Tensor) -> Tensor:
    """A tensor taken at ``layer`` in its own layout (a gradient, a recorded activation) for the
    input ``x``, in the (B, C, h, w) layout the methods read."""
    return _spatial(layout_of(layer, t, x), t)


def _spatial(layout: TensorLayout | None, t: Tensor) -> Tensor:
    """The layer's tensor in the (B, C, h, w) layout the methods read: the one place where a
    layer's own layout is converted, for activations and gradients alike. ``nhwc`` (B, h, w, C)
    is permuted; ``tokens`` (B, prefix + h*w, C) loses its prefix (class, register) tokens and
    the patch tokens are laid out row by row on the grid; ``nchw`` (and None: no spatial map,
    Batch.spatial says so) is taken as it comes."""
    if layout is None or layout.kind == "nchw":
        return t
    if layout.kind == "nhwc":
        return t.permute(0, 3, 1, 2).contiguous()
    assert layout.grid is not None
    b, _, c = t.shape
    grid = t[:, layout.prefix_tokens:, :].reshape(b, *layout.grid, c)
    return grid.permute(0, 3, 1, 2).contiguous()
