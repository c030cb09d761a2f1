"""Target layers: a dotted module path (``layer4.2.conv3``), optionally ``NAME:input`` to take the
module's input instead of its output; the module tree with output shapes for ``xai layers``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import LayerError, suggest


@dataclass(frozen=True)
class LayerRef:
    name: str  # dotted path as the user wrote it, without the ':input' suffix
    module: nn.Module
    use_input: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}:input" if self.use_input else self.name


def parse_layer_spec(spec: str) -> tuple[str, bool]:
    name, sep, port = spec.strip().partition(":")
    if sep and port not in ("input", "output"):
        raise LayerError(
            f"target_layer: {spec!r}: unknown port {port!r}",
            "write NAME for the module's output or NAME:input for its input",
        )
    return name, port == "input"


def resolve_layer(model: nn.Module, spec: str) -> LayerRef:
    """The module named by ``spec``; the error lists the closest valid names."""
    name, use_input = parse_layer_spec(spec)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise LayerError(
            f"target_layer: no module named {name!r} in {type(model).__name__}",
            suggest(name, names) + " (`xai layers --config ...` prints the tree with shapes)",
        )
    return LayerRef(name=name, module=modules[name], use_input=use_input)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    depth: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    calls: int
    params: int


def _shape(v: object) -> tuple[int, ...] | None:
    if isinstance(v, Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], Tensor):
        return tuple(v[0].shape)
    return None


@dataclass
class ModuleTrace:
    """What one dummy forward saw of a module: how often it ran, when it first and last finished
    (a counter over every module's completions, so children finish before their parents), and
    its input and output shapes on its last call."""

    calls: int = 0
    first: int = -1
    last: int = -1
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None


def trace_modules(model: nn.Module, input_size: tuple[int, int],
                  device: torch.device | str = "cpu") -> dict[str, ModuleTrace]:
    """One forward of a blank image (no gradients) with a hook on every named module; the
    modules that ran, by name. Hooks are removed on exit, also on error."""
    seen: dict[str, ModuleTrace] = {}
    counter = [0]
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, args: tuple[object, ...], out: object, _name: str = name) -> None:
            t = seen.setdefault(_name, ModuleTrace())
            t.calls += 1
            t.first = counter[0] if t.first < 0 else t.first
            t.last = counter[0]
            counter[0] += 1
            t.input_shape, t.output_shape = _shape(args), _shape(out)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return seen


def layer_table(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu",
                seen: dict[str, ModuleTrace] | None = None) -> list[LayerInfo]:
    """Every module with its output shape for one dummy image (one forward, no gradients;
    none when the trace ``seen`` is given)."""
    return _rows(model, seen if seen is not None else trace_modules(model, input_size, device))


def _rows(model: nn.Module, seen: dict[str, ModuleTrace]) -> list[LayerInfo]:
    rows = []
    for name, mod in model.named_modules():
        if not name:
            continue
        t = seen.get(name, ModuleTrace())
        rows.append(LayerInfo(name=name, type=type(mod).__name__, depth=name.count("."), input_shape=t.input_shape,
                              output_shape=t.output_shape, calls=t.calls,
                              params=sum(p.numel() for p in mod.parameters(recurse=False))))
    return rows


def auto_layer(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu",
               seen: dict[str, ModuleTrace] | None = None) -> LayerRef:
    """The layer CAM papers use: the input of the global pooling module when the model has one
    (the last feature map after its activation), else the last module, in execution order, that
    outputs a spatial map (B, C, h, w) with h, w > 1 and runs once per forward."""
    seen = seen if seen is not None else trace_modules(model, input_size, device)
    rows = {r.name: r for r in _rows(model, seen)}
    once = sorted((n for n, t in seen.items() if t.calls == 1), key=lambda n: -seen[n].last)  # last to finish first

    def spatial(s: tuple[int, ...] | None) -> bool:
        return s is not None and len(s) == 4 and s[2] > 1 and s[3] > 1

    for name in once:
        r = rows[name]
        pooled = r.output_shape is not None and len(r.output_shape) >= 2 and all(d == 1 for d in r.output_shape[2:])
        if "Pool" in r.type and pooled and spatial(r.input_shape):
            return resolve_layer(model, f"{name}:input")
    for name in once:
        if spatial(rows[name].output_shape):
            return resolve_layer(model, name)
    raise LayerError(
        f"no layer of {type(model).__name__} gives a spatial map (B, C, h, w)",
        "set target_layer in the config (`xai layers --config ...` prints the tree)",
    )
