"""Rollout through window attention (Swin): the attention of torchvision's ``ShiftedWindowAttention``
(v1 and v2) and timm's ``SwinTransformerBlock`` (and its V2) read beside the forward, and relevance carried back
from the pooled output to the patch grid.

Swin has no class token: its head averages the last stage's tokens, so the query the rollout starts
from is that average (uniform over the last grid). Each block attends inside windows of its
(cyclically shifted, zero-padded) grid, so a block's attention is a block-diagonal matrix over the
grid's positions; it is never built. The relevance row vector v (over a block's output positions) is
moved into the block's window frame (pad and shift as the block does), multiplied by the windows'
matrices, and moved back (:class:`Frame`): v <- v M, exactly the row of the dense product. Patch
merging joins 2x2 tokens into one; a merged token's relevance is split evenly over its four sources.

The weights are the module's own softmax output: torchvision calls ``F.softmax`` inside
``shifted_window_attention``, timm's ``softmax`` submodule calls it too (its experimental fused
path is switched off for the call and restored); a torch function mode records the result while a
window-attention call runs and returns every result unchanged. The recorded tensor is the one the forward goes on with, so
the gradient with respect to it is autograd's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import MethodError

_SOFTMAX = (F.softmax, torch.softmax, Tensor.softmax)


@dataclass(frozen=True)
class Frame:
    """Where one window-attention call's tokens sit: its input grid (H, W), the window, the cyclic
    shift it applied, and whether it padded before shifting (torchvision) or after (timm)."""

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    pad_first: bool

    @property
    def padded(self) -> tuple[int, int]:
        return tuple(-(-g // w) * w for g, w in zip(self.grid, self.window, strict=True))  # type: ignore[return-value]

    @property
    def windows(self) -> int:
        (ph, pw), (wh, ww) = self.padded, self.window
        return (ph // wh) * (pw // ww)

    def _roll(self, v: Tensor, sign: int) -> Tensor:
        if not any(self.shift):
            return v
        return torch.roll(v, shifts=(sign * self.shift[0], sign * self.shift[1]), dims=(-2, -1))

    def _pad(self, v: Tensor) -> Tensor:
        (h, w), (ph, pw) = self.grid, self.padded
        return F.pad(v, (0, pw - w, 0, ph - h))

    def to_windows(self, v: Tensor) -> Tensor:
        """(B, K, H, W) over the call's positions -> (B, nW, K, T) in its windows, in the order the
        call partitions them; padded positions hold zeros."""
        v = self._roll(self._pad(v), -1) if self.pad_first else self._pad(self._roll(v, -1))
        b, k = v.shape[:2]
        (ph, pw), (wh, ww) = self.padded, self.window
        v = v.reshape(b, k, ph // wh, wh, pw // ww, ww).permute(0, 2, 4, 1, 3, 5)
        return v.reshape(b, self.windows, k, wh * ww)

    def from_windows(self, w: Tensor) -> Tensor:
        """The inverse of :meth:`to_windows` (padded positions dropped): (B, nW, K, T) -> (B, K, H, W)."""
        b, _, k, _ = w.shape
        (h, wd), (ph, pw), (wh, ww) = self.grid, self.padded, self.window
        v = w.reshape(b, ph // wh, pw // ww, k, wh, ww).permute(0, 3, 1, 4, 2, 5).reshape(b, k, ph, pw)
        return self._roll(v, 1)[..., :h, :wd] if self.pad_first else self._roll(v[..., :h, :wd], 1)


@dataclass
class WindowTap:
    """One window-attention call: where its tokens sit, and its attention (B * nW, heads, T, T) as
    the forward computed it (in the graph when the forward was)."""

    frame: Frame
    attn: Tensor

    def per_window(self, m: Tensor) -> Tensor:
        """(B * nW, ...) -> (B, nW, ...)."""
        return m.reshape(-1, self.frame.windows, *m.shape[1:])


class _Softmaxes(TorchFunctionMode):
    """Records the results of softmax while ``into`` is a list; every result is returned unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.into: list[Tensor] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.into is not None and func in _SOFTMAX:
            self.into.append(out)
        return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))


def _torchvision_frame(m: nn.Module, x: Tensor) -> Frame:
    """torchvision pads to whole windows, clears the shift where one window covers the padded grid,
    then shifts (``shifted_window_attention``)."""
    grid, window = (int(x.shape[1]), int(x.shape[2])), _pair(m.window_size)
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window, strict=True))
    shift = tuple(0 if w >= p else int(s) for s, w, p in zip(_pair(m.shift_size), window, padded, strict=True))
    return Frame(grid, window, shift, pad_first=True)  # type: ignore[arg-type]


def _timm_frame(m: nn.Module, x: Tensor) -> Frame:
    """timm's block shifts by its (already cleared) shift_size, then pads (``SwinTransformerBlock._attn``)."""
    return Frame((int(x.shape[1]), int(x.shape[2])), _pair(m.window_size), _pair(m.shift_size), pad_first=False)


def _is_torchvision_window(m: nn.Module) -> bool:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    return isinstance(m, ShiftedWindowAttention)


def _is_timm_window_block(m: nn.Module) -> bool:
    attn = getattr(m, "attn", None)
    return hasattr(m, "window_size") and hasattr(m, "shift_size") and isinstance(attn, nn.Module) \
        and isinstance(getattr(attn, "softmax", None), nn.Softmax)


def has_window_attention(model: nn.Module) -> bool:
    return any(_is_torchvision_window(m) or _is_timm_window_block(m) for m in model.modules())


@contextmanager
def window_taps(model: nn.Module) -> Iterator[list[WindowTap]]:
    """Every window-attention call of the forwards run in the block, in call order. Hooks and a
    recording torch function mode only, removed on exit (also on error); timm's ``fused_attn`` is
    off inside and restored."""
    taps: list[WindowTap] = []
    handles: list[Any] = []
    fused: list[tuple[nn.Module, Any]] = []
    mode = _Softmaxes()

    def start(frame_of: Callable[[nn.Module, Tensor], Frame]) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            pending.append(frame_of(mod, args[0]))
            mode.into = []
        return pre

    def finish(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen, mode.into = mode.into or [], None
        if len(seen) != 1:
            raise MethodError(f"attention rollout: expected one softmax in {type(mod).__name__}, saw {len(seen)}")
        taps.append(WindowTap(pending.pop(), seen[0]))

    pending: list[Frame] = []
    try:
        for m in model.modules():
            if _is_torchvision_window(m):
                handles += [m.register_forward_pre_hook(start(_torchvision_frame)), m.register_forward_hook(finish)]
            elif _is_timm_window_block(m):
                attn = m.get_submodule("attn")
                if getattr(attn, "fused_attn", False):
                    fused.append((attn, attn.fused_attn))
                    attn.fused_attn = False  # type: ignore[assignment]
                handles += [m.register_forward_pre_hook(start(_timm_frame)), m.register_forward_hook(finish)]
        with mode:
            yield taps
    finally:
        mode.into = None
        for h in handles:
            h.remove()
        for attn, was in fused:
            attn.fused_attn = was


def _to_grid(v: Tensor, grid: tuple[int, int]) -> Tensor:
    """Relevance (B, K, h, w) on a merged grid -> the grid before the merge: each merged token's
    share split evenly over its 2x2 sources (patch merging pads odd sizes; the padding is dropped)."""
    h, w = v.shape[-2:]
    if (h, w) == grid:
        return v
    if (h, w) != (-(-grid[0] // 2), -(-grid[1] // 2)):
        raise MethodError(f"attention rollout: the token grid goes from {grid[0]}x{grid[1]} to {h}x{w} between "
                          "two attention blocks; only Swin's 2x2 patch merging is followed")
    return v.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :grid[0], :grid[1]] / 4


def roll_windows(taps: list[WindowTap], blocks: list[Tensor]) -> Tensor:
    """v = the mean over the last call's tokens (what the head pools); then, last call first,
    v <- v M with M the call's block (B * nW, T, T) inside its windows, through merges as
    :func:`_to_grid`. The relevance on the first call's grid (the patch grid), (B, H, W)."""
    last = taps[-1]
    b = last.attn.shape[0] // last.frame.windows
    h, w = last.frame.grid
    v = torch.full((b, 1, h, w), 1.0 / (h * w), device=last.attn.device)
    for tap, m in zip(reversed(taps), reversed(blocks), strict=True):
        v = _to_grid(v, tap.frame.grid)
        v = tap.frame.from_windows(tap.frame.to_windows(v) @ tap.per_window(m))
    return v[:, 0]
