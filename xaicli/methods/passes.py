"""Extra passes over the model for the methods that need more than the shared forward: the
target layer's output rewritten (Ablation-CAM), or the gradients of several layers, of a custom
objective or of second order (FullGrad, Finer-CAM, Shapley-CAM, SmoothGrad-CAM++). Every pass
goes through the engine's runner: chunked by its budget, halved on out-of-memory, counted for the
progress display, at the run's precision. Hooks live in ``with`` blocks and are removed on exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import as_logits
from ..errors import LayerError
from ..layers import LayerRef
from .batch import Batch, run_chunked


def _tensor_of(v: Any, where: str) -> Tensor:
    t = v[0] if isinstance(v, (tuple, list)) and v else v
    if not isinstance(t, Tensor):
        raise LayerError(f"{where} gives {type(v).__name__}, not a tensor", "pick a module whose output is a tensor")
    return t


def _swap(v: Any, new: Tensor) -> Any:
    return (new, *v[1:]) if isinstance(v, (tuple, list)) else new


@contextmanager
def rewrite(module: nn.Module, use_input: bool, fn: Callable[[Tensor], Tensor], where: str) -> Iterator[None]:
    """For the block, the module's output (its input with ``use_input``) is replaced by ``fn(t)``."""
    if use_input:
        handle = module.register_forward_pre_hook(lambda m, args: _swap(args, fn(_tensor_of(args, where))))
    else:
        handle = module.register_forward_hook(lambda m, args, out: _swap(out, fn(_tensor_of(out, where))))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def rewrite_layer(layer: LayerRef, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    with rewrite(layer.module, layer.use_input, fn, f"target_layer {layer.spec!r}"):
        yield


@contextmanager
def tap(points: Sequence[tuple[nn.Module, bool]]) -> Iterator[list[Tensor]]:
    """Record the tensor at each (module, use_input) point during the block, in order. The module
    passes on a copy, so an in-place operation after it (``ReLU(inplace=True)``) cannot change the
    recorded tensor or its place in the autograd graph: gradients with respect to a recorded tensor
    are those of the module's own output."""
    seen: list[Tensor | None] = [None] * len(points)

    def keeper(i: int) -> Callable[[Tensor], Tensor]:
        def keep(t: Tensor) -> Tensor:
            seen[i] = t
            return t.clone()

        return keep

    with ExitStack() as stack:
        for i, (module, use_input) in enumerate(points):
            stack.enter_context(rewrite(module, use_input, keeper(i), type(module).__name__))
        out: list[Tensor] = []
        yield out
        out.extend(t for t in seen if t is not None)


def grad_pass(
    batch: Batch,
    points: Sequence[tuple[nn.Module, bool]],
    build: Callable[[Tensor], Tensor],
    n: int,
    reduce: Callable[[Tensor, Tensor, Tensor, list[Tensor]], Tensor],
) -> Tensor:
    """For ``n`` inputs made on demand (``build(idx)``, idx int64 on the device), a forward inside
    the autograd graph with the tensors at ``points`` recorded, then ``reduce(idx, xs, logits,
    tensors)`` -> (len(idx), ...) (it takes the gradients it needs with ``torch.autograd.grad``
    and returns detached values). Chunked by the runner's budget, halved on out-of-memory; the
    results are concatenated. ``xs`` requires grad, so ``reduce`` may differentiate the input."""
    runner, device = batch.runner, batch.x.device

    def one(sl: slice) -> Tensor:
        idx = torch.arange(sl.start, sl.stop, device=device)
        with torch.enable_grad():
            xs = build(idx).detach().requires_grad_(True)
            with tap(points) as tensors, runner.autocast():
                logits = as_logits(runner.model(runner.prepare(xs))).float()
            if len(tensors) != len(points):
                raise LayerError("a recorded layer did not run during the forward pass",
                                 "pick a module that the model's forward uses (`xai layers`)")
            out = reduce(idx, xs, logits, tensors).detach()
        runner.count_pass(sl.stop - sl.start)
        return out

    return run_chunked(one, n, runner.budget)
