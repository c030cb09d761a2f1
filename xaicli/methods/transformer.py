"""Transformer methods that read the model's own attention: attention rollout (Abnar & Zuidema
2020) and its gradient-weighted variant (Chefer, Gur & Wolf 2021). Maps are (B, h, w) on the
patch grid (layer space), from the class token's row; on Swin's window attention (no class token)
from the pooled tokens, through windows and patch merging (windows.py).

The attention weights are read without touching the model's computation: torchvision's
``EncoderBlock`` calls ``nn.MultiheadAttention`` with ``need_weights=False`` and timm's
``Attention`` uses a fused kernel, so neither returns them. Hooks (removed on exit, also on error)
keep the tensors the module already computes (its input, or timm's q, k and v), the weights are
recomputed beside the forward as softmax(q k^T / sqrt(d)), and the gradient with respect to them
comes from the gradient of the heads' output H = A V: dA = dH V^T, exact because H is linear in A.
No flag, module or output of the model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import as_logits
from ..errors import LayerError, MethodError
from ..layers import detect_layout, is_attention
from . import register
from .batch import Batch
from .windows import has_window_attention, roll_windows, window_taps

HeadFusion = Literal["mean", "max", "min"]


@dataclass
class Tap:
    """One attention call: q, k, v (B, heads, T, d) float32 and detached, the scale of q k^T, and
    the heads' output as the graph holds it with the map from its gradient to dH per head."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    live: Tensor | None = None  # in the graph; its gradient gives dH
    to_dh: Callable[[Tensor], Tensor] | None = None  # gradient of ``live`` -> dH (B, heads, T, d)

    def weights(self) -> Tensor:
        """A = softmax(q k^T * scale), (B, heads, T, T)."""
        return (self.q @ self.k.transpose(-2, -1) * self.scale).softmax(-1)

    def weight_grads(self, live_grad: Tensor) -> Tensor:
        """dA = dH V^T, (B, heads, T, T)."""
        assert self.to_dh is not None
        return self.to_dh(live_grad.float()) @ self.v.transpose(-2, -1)


def _heads(t: Tensor, n_heads: int) -> Tensor:
    """(B, T, heads * d) -> (B, heads, T, d)."""
    b, n, c = t.shape
    return t.reshape(b, n, n_heads, c // n_heads).transpose(1, 2)


def _tap_torchvision(m: nn.MultiheadAttention, taps: list[Tap]) -> list[Any]:
    """nn.MultiheadAttention (self-attention): q, k, v from its input and in_proj, H's gradient
    from its output's through out_proj (O = H W_out^T + b)."""
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise MethodError("attention rollout: this nn.MultiheadAttention has separate key/value sizes or extra "
                          "key/value biases, which the rollout does not read")
    seen: dict[str, Tensor] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["x"] = args[0] if args else kwargs["query"]

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x, o = seen.pop("x"), out[0]
        if not m.batch_first:
            x, o = x.transpose(0, 1), o.transpose(0, 1)
        with torch.no_grad():
            q, k, v = F.linear(x.detach().float(), m.in_proj_weight.float(), _float(m.in_proj_bias)).chunk(3, -1)
        h, w_out = m.num_heads, m.out_proj.weight
        taps.append(Tap(_heads(q, h), _heads(k, h), _heads(v, h), (m.head_dim) ** -0.5, o,
                        lambda g: _heads(g @ w_out.detach().float(), h)))

    return [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]


def _tap_timm(m: nn.Module, taps: list[Tap]) -> list[Any]:
    """timm's Attention: q and k after its q_norm / k_norm, v from its qkv, H at the input of its
    norm (Identity unless scale_norm) before the output projection."""
    seen: dict[str, Tensor] = {}
    n_heads = int(m.num_heads)  # type: ignore[arg-type]

    def keep(key: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any = None) -> None:
            seen[key] = out if out is not None else args[0]
        return hook

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        qkv, h_live = seen.pop("qkv"), seen.pop("h")
        b, n, _ = qkv.shape
        v = qkv.reshape(b, n, 3, n_heads, -1).permute(2, 0, 3, 1, 4)[2]
        taps.append(Tap(seen.pop("q").detach().float(), seen.pop("k").detach().float(), v.detach().float(),
                        float(m.scale), h_live, lambda g: _heads(g, n_heads)))  # type: ignore[arg-type]

    sub = m.get_submodule
    before_proj = sub("norm") if isinstance(getattr(m, "norm", None), nn.Module) else sub("proj")
    return [sub("qkv").register_forward_hook(keep("qkv")), sub("q_norm").register_forward_hook(keep("q")),
            sub("k_norm").register_forward_hook(keep("k")), before_proj.register_forward_pre_hook(keep("h")),
            m.register_forward_hook(post)]


def _float(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None else None


def _is_timm_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("qkv", "q_norm", "k_norm", "proj")) \
        and hasattr(m, "num_heads") and hasattr(m, "scale")


@contextmanager
def attention_taps(model: nn.Module) -> Iterator[list[Tap]]:
    """Every supported attention call of the forwards run in the block, in call order. Hooks
    only: removed on exit, also on error; the model computes exactly what it would without."""
    taps: list[Tap] = []
    handles: list[Any] = []
    unsupported: list[str] = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                handles += _tap_torchvision(m, taps)
            elif _is_timm_attention(m):
                handles += _tap_timm(m, taps)
            elif is_attention(m):
                unsupported.append(f"{name} ({type(m).__name__})")
        if not handles:
            found = f"; it has {', '.join(unsupported[:3])}" if unsupported else ""
            raise MethodError(
                f"attention rollout needs attention it can read: global self-attention over tokens "
                f"(torchvision's nn.MultiheadAttention or timm's Attention, as in ViT and DeiT) or Swin's window "
                f"attention (torchvision, timm); {type(model).__name__} has none{found}",
                "use a CAM or gradient method on this model" + (
                    " (MaxViT-like models mix their tokens with convolutions between their attention blocks, "
                    "which a rollout does not follow)" if unsupported else ""),
            )
        yield taps
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The methods


@dataclass(frozen=True)
class RolloutParams:
    head_fusion: HeadFusion = field(default="mean")  # how the heads' attention is merged per block


def _run_taps(batch: Batch, grads: bool, tapping: Callable[[nn.Module], Any] = attention_taps) \
        -> tuple[list[Any], Tensor | None]:
    """One forward of the batch with the attention tapped (in the graph when ``grads``), and the
    target scores inside the graph."""
    x = batch.runner.prepare(batch.x.detach())
    if grads:
        x = x.clone().requires_grad_(True)  # gradients flow even when the parameters are frozen
    ctx = torch.enable_grad() if grads else torch.no_grad()
    with tapping(batch.model) as taps, ctx, batch.runner.autocast():
        logits = batch.model(x)
    batch.runner.count_pass(batch.size)
    if not taps:
        raise MethodError(f"attention rollout: no attention module of {type(batch.model).__name__} ran")
    logits = as_logits(logits)
    score = logits.float().gather(1, batch.targets[:, None]).sum() if grads else None
    return taps, score


def _class_row(r: Tensor, batch: Batch) -> Tensor:
    """The class token's row of the relevance (B, T, T) over the patch tokens, on the grid (B, h, w);
    without prefix tokens (a model that averages its tokens) the mean over the rows."""
    b, n, _ = r.shape
    size = (int(batch.x.shape[-2]), int(batch.x.shape[-1]))
    try:
        layout = detect_layout((b, n, 1), size)
    except LayerError as e:
        raise MethodError(f"attention rollout: {e.message}", e.hint) from None
    assert layout is not None and layout.grid is not None
    p = layout.prefix_tokens
    row = r[:, 0, p:] if p else r.mean(1)
    return row.reshape(b, *layout.grid)


def _fuse(a: Tensor, how: HeadFusion) -> Tensor:
    if how == "max":
        return a.amax(1)
    if how == "min":
        return a.amin(1)
    return a.mean(1)


@register(
    "attention_rollout",
    family="attention",
    summary="Attention rollout: the product over blocks of the head-fused attention plus identity (ViT, DeiT, Swin)",
    paper="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers",
    space="layer",
    needs_layer=False,
    params=RolloutParams,
    cost=lambda p, c: (2, 0),
    aliases=("rollout",),
)
def attention_rollout(batch: Batch, p: RolloutParams) -> Tensor:
    """R = prod_l (0.5 A_l + 0.5 I), rows renormalised, later blocks on the left (:func:`rollout`);
    A_l the block's attention fused over heads (mean, or max/min as in Gildenblat's vit-explain);
    the map is the class token's row over the patch tokens (B, h, w). Swin: the same factors inside
    each call's windows, from the pooled tokens (:func:`windows.roll_windows`). Class-agnostic."""
    if has_window_attention(batch.model):
        wtaps, _ = _run_taps(batch, grads=False, tapping=window_taps)
        return roll_windows(wtaps, [_rollout_factor(t.attn.detach().float(), p.head_fusion) for t in wtaps])
    taps, _ = _run_taps(batch, grads=False)
    return _class_row(rollout([t.weights() for t in taps], p.head_fusion), batch)


def _rollout_factor(w: Tensor, head_fusion: HeadFusion) -> Tensor:
    """0.5 fuse(A) + 0.5 I with rows renormalised: (B, heads, T, T) -> (B, T, T)."""
    a = 0.5 * _fuse(w, head_fusion) + 0.5 * torch.eye(w.shape[-1], device=w.device)
    return a / a.sum(-1, keepdim=True)


def rollout(weights: list[Tensor], head_fusion: HeadFusion = "mean") -> Tensor:
    """Abnar & Zuidema's rollout of the blocks' attention (B, heads, T, T), first block first:
    R = A'_L ... A'_1 with A' = 0.5 fuse(A) + 0.5 I, rows renormalised; (B, T, T)."""
    b, _, n, _ = weights[0].shape
    r = torch.eye(n, device=weights[0].device).expand(b, n, n)
    for w in weights:
        r = _rollout_factor(w, head_fusion) @ r
    return r


def gradient_rollout(weights: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Chefer et al.'s relevance for self-attention: R = I, then per block (first first)
    R += mean_h((dA ⊙ A)^+) R; (B, T, T)."""
    b, _, n, _ = weights[0].shape
    r = torch.eye(n, device=weights[0].device).expand(b, n, n).clone()
    for a, da in zip(weights, grads, strict=True):
        r = r + (da * a).clamp_min(0).mean(1) @ r
    return r


@register(
    "grad_rollout",
    family="attention",
    summary="Gradient-weighted rollout: positive gradient x attention per block, accumulated (class-specific; ViT, DeiT, "
            "Swin)",
    paper="Chefer, Gur & Wolf 2021, Generic Attention-model Explainability for Interpreting Bi-Modal and "
          "Encoder-Decoder Transformers",
    space="layer",
    needs_layer=False,
    cost=lambda p, c: (2, 1),
    aliases=("chefer", "gradient_rollout"),
)
def grad_rollout(batch: Batch, p: Any) -> Tensor:
    """R = I; per block R += mean_h((dA ⊙ A)^+) R (:func:`gradient_rollout`), dA = d logit[target] / d A
    (their eq. 5-6 for self-attention); the map is the class token's row over the patch tokens (B, h, w);
    Swin: :func:`_grad_roll_windows`."""
    if has_window_attention(batch.model):
        return _grad_roll_windows(batch)
    taps, score = _run_taps(batch, grads=True)
    assert score is not None
    lives = [t.live for t in taps]
    if any(t is None or not t.requires_grad for t in lives):
        raise MethodError("grad_rollout: the attention is not connected to the logits by differentiable operations")
    found = torch.autograd.grad(score, lives, allow_unused=True)
    weights = [t.weights() for t in taps]
    grads = [t.weight_grads(g) if g is not None else torch.zeros_like(a)
             for t, g, a in zip(taps, found, weights, strict=True)]
    return _class_row(gradient_rollout(weights, grads), batch)


def _grad_roll_windows(batch: Batch) -> Tensor:
    """Chefer's factor I + mean_h((dA ⊙ A)^+) per window-attention call, carried from the pooled
    output to the patch grid by :func:`roll_windows`; dA is autograd's gradient with respect to the
    call's own softmax output."""
    taps, score = _run_taps(batch, grads=True, tapping=window_taps)
    assert score is not None
    if any(not t.attn.requires_grad for t in taps):
        raise MethodError("grad_rollout: the attention is not connected to the logits by differentiable operations")
    found = torch.autograd.grad(score, [t.attn for t in taps], allow_unused=True)
    blocks = []
    for t, g in zip(taps, found, strict=True):
        a = t.attn.detach().float()
        da = g.float() if g is not None else torch.zeros_like(a)
        blocks.append(torch.eye(a.shape[-1], device=a.device) + (da * a).clamp_min(0).mean(1))
    return roll_windows(taps, blocks)
