"""The method registry: name -> MethodSpec, filled by a decorator in each method module.

`xai methods`, config validation and the engine (grad or no-grad, which tensors to capture,
how to render) all read this one table. A method is a function ``fn(batch, params) -> map``:

* ``batch`` is a :class:`xaicli.methods.batch.Batch`: the input on the device, the targets, the
  shared forward's logits, activations and gradients, and a chunked ``forward`` for methods
  that need more passes;
* ``params`` is the method's frozen parameter dataclass, validated from ``methods.<name>``;
* the result is a float map on the batch's device, (B, h, w) for layer maps or (B, C, H, W) /
  (B, H, W) for pixel maps, or a :class:`MethodOutput` with per-image extras for scores.jsonl.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..registry import Registry
from ..render import ChannelReduce, Render

Family = Literal["cam", "gradient", "perturbation", "attention"]
Space = Literal["layer", "pixel"]
GradOf = Literal["none", "layer", "input"]


@dataclass(frozen=True)
class NoParams:
    """A method without knobs."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    family: Family
    summary: str
    paper: str
    space: Space  # "layer": map at the target layer's resolution; "pixel": at the input's
    grad_of: GradOf  # which gradient of the class score the shared pass must provide
    needs_layer: bool  # reads the target layer's activations
    signed: bool  # the raw map has a meaningful sign (rendered diverging or as magnitude)
    params: type
    # (params, n_channels at the target layer) -> (forwards, backwards) per image and target.
    # A count that depends on what the knobs do not fix (the layer's channels when `channels` is
    # None, the input size) is given as a short formula string instead of an int.
    cost: Callable[[Any, int | None], tuple[int | str, int]]
    aliases: tuple[str, ...] = ()

    @property
    def needs_grad(self) -> bool:
        return self.grad_of != "none" or self.family == "gradient"

    def display(self, params: Any) -> tuple[Render | None, ChannelReduce]:
        """How the engine shows this method's raw maps, from the two display knobs a method may
        declare: ``render`` (signed maps: diverging, magnitude or positive; None for unsigned
        maps) and ``reduce`` (how a pixel map (B, C, H, W) becomes (B, H, W); unset: the largest
        magnitude over channels for magnitude maps, the signed sum otherwise)."""
        mode: Render | None = getattr(params, "render", "diverging") if self.signed else None
        reduce: ChannelReduce | None = getattr(params, "reduce", None)
        return mode, reduce or ("max_abs" if mode in (None, "magnitude") else "sum")

    def cost_text(self, params: Any = None, channels: int | None = None) -> str:
        f, b = self.cost(params if params is not None else self.params(), channels)
        if b:
            return f"{f} fwd + {b} bwd"
        return f"{f} fwd"


_methods: Registry[MethodSpec] = Registry("method", __name__, listed_by="xai methods")


def register(
    name: str,
    *,
    family: Family,
    summary: str,
    paper: str,
    space: Space,
    grad_of: GradOf = "none",
    needs_layer: bool = True,
    signed: bool = False,
    params: type = NoParams,
    cost: Callable[[Any, int | None], tuple[int | str, int]] | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` under ``name``; a duplicate name fails at import."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"{name}: params must be a dataclass")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        default_cost = (1, 1 if grad_of != "none" else 0)
        spec = MethodSpec(
            name=name,
            fn=fn,
            family=family,
            summary=summary,
            paper=paper,
            space=space,
            grad_of=grad_of,
            needs_layer=needs_layer,
            signed=signed,
            params=params,
            cost=cost or (lambda p, c: default_cost),
            aliases=aliases,
        )
        _methods.register(name, spec, aliases, fn.__module__)
        return fn

    return deco


def all_methods() -> list[MethodSpec]:
    return _methods.all()


def get_method(name: str, path: str = "method") -> MethodSpec:
    """The spec of a method by name or alias; the error lists the close matches."""
    return _methods.get(name, path)
