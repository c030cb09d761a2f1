"""Hooks in a ``with`` block: the target layer's tensor is recorded during a forward, hooks are
removed on exit (also on error), and gradients come from ``torch.autograd.grad`` on the recorded
tensor, never from backward hooks, so in-place ReLUs work and no parameter ``.grad`` piles up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .errors import LayerError
from .layers import LayerRef


@dataclass
class Recorder:
    """The tensor seen at the layer on its last call during the forward, and the call count."""

    layer: LayerRef | None
    value: Tensor | None = None
    calls: int = 0

    def tensor(self) -> Tensor:
        if self.value is None:
            assert self.layer is not None
            raise LayerError(
                f"target_layer {self.layer.spec!r} did not run during the forward pass",
                "pick a module that the model's forward uses (`xai layers` shows which ran)",
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
