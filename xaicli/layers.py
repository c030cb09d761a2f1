"""Target layers: a dotted module path (``layer4.2.conv3``), optionally ``NAME:input`` to take the
module's input instead of its output; the module tree with output shapes for ``xai layers``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import LayerError, suggest

LayoutKind = Literal["nchw", "nhwc", "tokens"]
LAYOUTS: tuple[str, ...] = ("tokens", "nhwc", "nchw")
MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens searched for before the patch grid


@dataclass(frozen=True)
class TensorLayout:
    """How a layer's output holds its spatial map: ``nchw`` (B, C, h, w) as CNNs, ``nhwc``
    (B, h, w, C) as Swin and ConvNeXt blocks, ``tokens`` (B, prefix + h*w, C) as ViTs (class,
    distillation or register tokens first, then the patch tokens row by row). The capture step
    (capture._spatial) converts to (B, C, h, w) by it."""

    kind: LayoutKind
    prefix_tokens: int = 0  # tokens: how many tokens come before the patch grid
    grid: tuple[int, int] | None = None  # tokens: the patch grid (h, w)
    source: str = "detected"  # "detected" from the shape, or "config" (layer_layout / prefix_tokens)
    raw_shape: tuple[int, ...] | None = field(default=None, compare=False)  # the layer's own shape, batch dropped

    def spatial_shape(self, raw: tuple[int, ...]) -> tuple[int, ...]:
        """(C, h, w) the methods see for a raw shape without its batch dimension."""
        if self.kind == "nhwc":
            return (raw[2], raw[0], raw[1])
        if self.kind == "tokens":
            assert self.grid is not None
            return (raw[1], *self.grid)
        return tuple(raw)

    def describe(self) -> dict[str, Any]:
        """run.json's ``layer_layout``."""
        return {"layout": self.kind, "prefix_tokens": self.prefix_tokens if self.kind == "tokens" else None,
                "grid": list(self.grid) if self.grid else None, "source": self.source,
                "shape": list(self.raw_shape) if self.raw_shape else None}

    def text(self) -> str:
        if self.kind == "tokens":
            assert self.grid is not None
            return f"tokens ({self.prefix_tokens} prefix + {self.grid[0]}x{self.grid[1]} grid)"
        return self.kind


def _plausible_grid(size: tuple[int, int], h: int, w: int, strict: bool = False) -> bool:
    """True when an (h, w) map can come from an input of ``size`` by one integer stride k for both
    sides: up to one row or column of padding (7x7 at 224, 14x20 at 224x320), or ``strict``: both
    sides rounded the same way (H // k, W // k or both rounded up), as a patch embedding does."""
    H, W = size
    if not (1 <= h <= H and 1 <= w <= W):
        return False
    for k in range(1, max(H, W) + 1):
        if strict and ((h, w) == (H // k, W // k) or (h, w) == (-(-H // k), -(-W // k))):
            return True
        if not strict and abs(H / k - h) <= 1 and abs(W / k - w) <= 1:
            return True
    return False


def _token_grid(n: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid (h, w) of ``n`` tokens for an input of ``size``, or None."""
    grids = [(h, n // h) for h in range(1, n + 1) if n % h == 0 and _plausible_grid(size, h, n // h, strict=True)]
    if not grids:
        return None
    H, W = size
    return min(grids, key=lambda g: abs(g[0] / g[1] - H / W))  # the aspect ratio closest to the input's


def detect_layout(shape: tuple[int, ...], size: tuple[int, int], kind: str = "auto",
                  prefix_tokens: int | None = None) -> TensorLayout | None:
    """The layout of a layer's output of ``shape`` (batch first) for an input of ``size`` (H, W).
    ``kind``: ``auto`` or a layout to take as given (config ``layer_layout``); ``prefix_tokens``:
    the tokens before the patch grid when known. None for a tensor that is neither 3-d nor 4-d
    (no spatial map: the methods say so)."""
    raw = tuple(shape[1:])
    source = "config" if kind != "auto" or (prefix_tokens is not None and len(shape) == 3) else "detected"
    if kind not in ("auto", *LAYOUTS):
        raise LayerError(f"layer_layout: unknown layout {kind!r}", suggest(kind, ["auto", *LAYOUTS]))
    if len(shape) == 4 and kind != "tokens":
        if kind == "auto":
            nhwc = _plausible_grid(size, raw[0], raw[1]) and not _plausible_grid(size, raw[1], raw[2])
            kind = "nhwc" if nhwc else "nchw"
        return TensorLayout(kind, source=source, raw_shape=raw)  # type: ignore[arg-type]
    if len(shape) == 3 and kind in ("auto", "tokens"):
        return _token_layout(raw, size, prefix_tokens, source)
    if kind == "auto":
        return None
    raise LayerError(
        f"layer_layout: {kind!r} does not fit the target layer's shape {tuple(shape)}",
        "tokens is for (B, tokens, C), nhwc and nchw for 4-d maps; or leave layer_layout at auto",
    )


def _token_layout(raw: tuple[int, ...], size: tuple[int, int], prefix_tokens: int | None,
                  source: str) -> TensorLayout:
    n_tokens = raw[0]
    prefixes = [prefix_tokens] if prefix_tokens is not None else range(min(MAX_PREFIX_TOKENS, n_tokens - 1) + 1)
    for prefix in prefixes:
        grid = _token_grid(n_tokens - prefix, size) if 0 <= prefix < n_tokens else None
        if grid is not None:
            return TensorLayout("tokens", prefix, grid, source, raw)
    given = f"with prefix_tokens: {prefix_tokens}" if prefix_tokens is not None else \
        f"after 0 to {MAX_PREFIX_TOKENS} prefix tokens"
    raise LayerError(
        f"target layer gives {n_tokens} tokens (shape (B, {', '.join(map(str, raw))})): no patch grid for the "
        f"{size[0]}x{size[1]} input {given}",
        "set prefix_tokens (the class/register tokens before the patch tokens) in the config, or pick a layer "
        "whose output is a map (`xai layers` prints the shapes)",
    )


@dataclass(frozen=True)
class LayerRef:
    name: str  # dotted path as the user wrote it, without the ':input' suffix
    module: nn.Module
    use_input: bool = False
    layout: TensorLayout | None = None  # found by engine.setup's dummy forward; None: found at the capture

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
    """The layer the CAM papers and the peers' documentation use, in this order:

    * a vision transformer (global attention over tokens (1, T, C)): the norm before the last
      block's attention (``ln_1`` of torchvision's last encoder layer, ``norm1`` of timm's last
      block), or the last block's output when that block has no norm before its attention;
    * the input of the global pooling module when the model has one (the last feature map after
      its activation; Swin's and ConvNeXt's last stage, after the final norm);
    * else the last module, in execution order, that outputs a spatial map (B, C, h, w) with
      h, w > 1 and runs once per forward."""
    seen = seen if seen is not None else trace_modules(model, input_size, device)
    rows = {r.name: r for r in _rows(model, seen)}
    once = sorted((n for n, t in seen.items() if t.calls == 1), key=lambda n: -seen[n].last)  # last to finish first

    def spatial(s: tuple[int, ...] | None) -> bool:
        return s is not None and len(s) == 4 and s[2] > 1 and s[3] > 1

    vit = _transformer_layer(model, input_size, seen)
    if vit is not None:
        return resolve_layer(model, vit)
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


def is_attention(module: nn.Module) -> bool:
    """torchvision's nn.MultiheadAttention, timm's Attention and the like (by class name)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def _tokens(shape: tuple[int, ...] | None, size: tuple[int, int]) -> bool:
    if shape is None or len(shape) != 3 or shape[0] != 1:
        return False
    try:
        return detect_layout(shape, size) is not None
    except LayerError:
        return False


def _transformer_layer(model: nn.Module, size: tuple[int, int], seen: dict[str, ModuleTrace]) -> str | None:
    """The norm before the last global attention over patch tokens (one image: batch 1, so the
    window attention of Swin, which batches windows, is not taken), else that block's output."""
    attentions = [n for n, m in model.named_modules() if n in seen and seen[n].calls == 1 and is_attention(m)
                  and _tokens(seen[n].input_shape, size)]
    if not attentions:
        return None
    last = max(attentions, key=lambda n: seen[n].last)
    block, _, _ = last.rpartition(".")
    if not block:
        return None
    parent = dict(model.named_modules())[block]
    norms = [f"{block}.{n}" for n, m in parent.named_children()
             if "Norm" in type(m).__name__ and f"{block}.{n}" in seen and seen[f"{block}.{n}"].calls == 1
             and seen[f"{block}.{n}"].last < seen[last].last and _tokens(seen[f"{block}.{n}"].output_shape, size)]
    if norms:
        return max(norms, key=lambda n: seen[n].last)
    return block if block in seen and _tokens(seen[block].output_shape, size) else None
