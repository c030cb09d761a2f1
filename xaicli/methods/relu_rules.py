"""ReLU backward rules for DeconvNet and guided backpropagation, applied to a user's model for the
duration of one call and restored exactly afterwards (a capture-side concern, like eval_mode).

:func:`relu_rule` replaces the ``forward`` of every ``nn.ReLU`` / ``nn.ReLU6`` module instance
with an autograd function for the block. ReLUs called as functions (``torch.relu``, ``F.relu``,
``Tensor.relu`` in a model's ``forward``) cannot be rewritten that way; they are detected while
the model runs and the method stops with an error instead of returning a map that silently
mixes the rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import MethodError

Rule = Literal["guided", "deconvnet"]




class _ReluRule(torch.autograd.Function):
    """y = clamp(x, 0, upper) forward; the backward replaces the ReLU's gradient by a rule:
    guided: relu(g) * 1[0 < x < upper] (Springenberg et al. 2015);
    deconvnet: relu(g), the forward mask ignored (Zeiler & Fergus 2014)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None, deconv: bool) -> Tensor:
        y = x.clamp_min(0) if upper is None else x.clamp(0, upper)
        ctx.deconv = deconv
        if not deconv:
            # A bool mask, not the output: later in-place ops on the output cannot invalidate it.
            mask = x > 0 if upper is None else (x > 0) & (x < upper)
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        out = g.clamp_min(0)
        if not ctx.deconv:
            (mask,) = ctx.saved_tensors
            out = out * mask
        return out, None, None


def _rule_forward(x: Tensor, *, upper: float | None, deconv: bool) -> Tensor:
    return _ReluRule.apply(x, upper, deconv)


_FUNCTIONAL_RELUS = {
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    F.relu: "F.relu",
    F.relu_: "F.relu_",
    F.relu6: "F.relu6",
    F.hardtanh: "F.hardtanh",
    F.hardtanh_: "F.hardtanh_",
    Tensor.relu: "Tensor.relu",
    Tensor.relu_: "Tensor.relu_",
}

_NOT_ACTIVATIONS = {"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "Identity"}
_ACTIVATION_NAMES = ("swish", "silu", "gelu", "mish", "hardswish", "sigmoid", "tanh", "elu")


class _FunctionalReluCheck(TorchFunctionMode):
    """Stops the forward at a ReLU called as a function: the rule cannot be applied to it."""

    def __init__(self, method: str, model: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.model_name = type(model).__name__

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _FUNCTIONAL_RELUS.get(func)
        if name is not None:
            raise MethodError(
                f"{self.method}: {self.model_name} calls {name} inside its forward; the {self.method} rule "
                "rewrites only nn.ReLU / nn.ReLU6 modules, so this ReLU would keep its plain gradient and "
                "the map would mix two rules. Models that apply ReLU as a function (torch.relu, F.relu, "
                "Tensor.relu; e.g. torchvision's Inception v3 and GoogLeNet) cannot be handled",
                "use saliency, smoothgrad or integrated_gradients on this model, or replace the functional "
                "calls by nn.ReLU modules",
            )
        return func(*args, **(kwargs or {}))


def _other_activations(model: nn.Module) -> list[str]:
    names = []
    for m in model.modules():
        cls = type(m)
        n = cls.__name__
        if n in _NOT_ACTIVATIONS or isinstance(m, (nn.ReLU, nn.ReLU6)):
            continue  # ReLU subclasses with their own forward are reported by the functional check
        if cls.__module__ == "torch.nn.modules.activation" or any(a in n.lower() for a in _ACTIVATION_NAMES):
            names.append(n)
    return names


@contextmanager
def relu_rule(model: nn.Module, rule: Rule, method: str | None = None) -> Iterator[int]:
    """Apply ``rule`` to the backward of every ``nn.ReLU`` / ``nn.ReLU6`` of ``model`` inside the
    block; yields how many modules were rewritten.

    Each ReLU module keeps its identity, ``inplace`` flag, hooks and training flag: only an
    instance attribute ``forward`` is set for the block and removed on exit (also on error), so a
    module used several times (torchvision's ResNet blocks) gets the rule at every call. The
    replacement computes out of place (an in-place ReLU's result is the same tensor value).
    ReLU6 keeps its upper clip: guided passes relu(g) where 0 < x < 6.
    Raises MethodError for TorchScript modules, for functional ReLU calls met during the forward,
    and for a model whose only activations are not ReLUs (the map would be the plain gradient).
    """
    method = method or ("deconvnet" if rule == "deconvnet" else "guided_backprop")
    if isinstance(model, torch.jit.ScriptModule):
        raise MethodError(
            f"{method}: {type(model).__name__} is a TorchScript module; its ReLUs cannot be rewritten",
            "load the eager (Python) model instead",
        )
    # Subclasses that override forward are left alone: their own forward calls F.relu, which the
    # check below reports, rather than having their extra behaviour silently dropped.
    relus = [
        m for m in model.modules()
        if (isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward)
        or (isinstance(m, nn.ReLU6) and type(m).forward is nn.ReLU6.forward)
    ]
    if not relus:
        others = _other_activations(model)
        if others:
            kinds = sorted(set(others))
            raise MethodError(
                f"{method}: {type(model).__name__} has no nn.ReLU / nn.ReLU6 modules (its activations: "
                f"{', '.join(kinds)}); the {method} rule is defined for ReLUs only, so the map would be "
                "the plain gradient",
                "use saliency (or smoothgrad / integrated_gradients) on this model",
            )
    deconv = rule == "deconvnet"
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        for m in relus:
            had = "forward" in m.__dict__
            saved.append((m, had, m.__dict__.get("forward")))
            upper = float(m.max_val) if isinstance(m, nn.ReLU6) else None
            m.__dict__["forward"] = partial(_rule_forward, upper=upper, deconv=deconv)
        with _FunctionalReluCheck(method, model):
            yield len(relus)
    finally:
        for m, had, old in reversed(saved):
            if had:
                m.__dict__["forward"] = old
            else:
                m.__dict__.pop("forward", None)
