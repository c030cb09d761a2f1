"""Layer-wise Relevance Propagation and Deep Taylor decomposition through Zennit (Anders et al.,
the field's LRP library for PyTorch): Zennit's composites assign the rules per layer type, its
canonizers merge batch norms into the preceding linear layers and rewrite ResNet's and EfficientNet's
skip connections,
and the relevance at the input is the gradient of the class logit under the composite's hooks.

Zennit is optional (``pip install 'xaicli[lrp]'``). Everything it changes on the model (hooks,
merged batch-norm parameters, rewritten forwards) is undone when the call returns, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MethodError, suggest
from ..render import ChannelReduce, Render
from . import register
from .batch import Batch, MethodOutput

# Our name -> Zennit's registered composite name. ``epsilon`` (all layers LRP-epsilon) is built
# here; Deep Taylor decomposition (z+ for ReLU layers, z^B in the first) is ``epsilon_gamma_box``
# with gamma -> inf, or ``epsilon_plus`` / ``epsilon_plus_flat`` (z+ everywhere but the dense layers).
COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat", "epsilon")
CANONIZERS = ("auto", "none", "resnet", "batchnorm")
INSTALL = "pip install zennit   (or: pip install 'xaicli[lrp]')"


def _composite_check(v: str) -> str | None:
    if v in COMPOSITES:
        return None
    return f"unknown composite {v!r} ({suggest(v, COMPOSITES)}); the composites: {', '.join(COMPOSITES)}"


def _canonizer_check(v: str) -> str | None:
    if v in CANONIZERS:
        return None
    return f"unknown canonizer {v!r}; the canonizers: {', '.join(CANONIZERS)}"


@dataclass(frozen=True)
class LrpParams:
    composite: str = field(default="epsilon_plus_flat", metadata={"check": _composite_check})
    # auto: Zennit's ResNetCanonizer for torchvision ResNets, else every batch norm that directly
    # follows a convolution or linear layer (found by tracing one forward) merged into it, and
    # EfficientNet's MBConv skips made Zennit sums (batchnorm); none.
    canonizer: str = field(default="auto", metadata={"check": _canonizer_check})
    epsilon: float = 1e-6  # of the epsilon rule (Zennit's default)
    gamma: float = 0.25  # of the gamma rule (epsilon_gamma_box)
    render: Render = "diverging"
    reduce: ChannelReduce = "sum"  # the sum over channels keeps conservation for the map


def zennit() -> Any:
    """The zennit package, or a MethodError with the pip command."""
    try:
        import zennit as zn
        import zennit.canonizers
        import zennit.composites
        import zennit.rules
        import zennit.torchvision
        import zennit.types
    except ImportError:
        raise MethodError("lrp needs the zennit package, which is not installed", INSTALL) from None
    return zn


def batchnorm_pairs(model: nn.Module, x: Tensor) -> list[tuple[list[str], str]]:
    """(linear layer names, batch-norm name) for every BatchNorm whose input is exactly the output of
    a convolution or linear layer in one traced forward of ``x`` (one image)."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    pairs: list[tuple[list[str], str]] = []

    def on_linear(m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            produced[id(out)] = names[m]

    def on_norm(m: nn.Module, inp: Any, _out: Any) -> None:
        src = produced.get(id(inp[0])) if inp and isinstance(inp[0], Tensor) else None
        if src is not None and all(names[m] != b for _, b in pairs):
            pairs.append(([src], names[m]))

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_hook(on_norm))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _is_mbconv(m: nn.Module) -> bool:
    """EfficientNet's MBConvBlock as efficientnet_pytorch and efficientnet_lite_pytorch write it
    (the embedded default model): its skip connection is ``x + inputs`` inside its forward."""
    return type(m).__name__ == "MBConvBlock" and hasattr(m, "_block_args") and hasattr(m, "id_skip")


def _mbconv_skip_canonizer(zn: Any) -> Any:
    """A Zennit canonizer for :func:`_is_mbconv` blocks. A relevance pass gives a function's sum the
    whole relevance on both branches, doubling it at every skip (2^9 on EfficientNet-Lite0); this
    runs the block's own forward without its skip and adds the skip through Zennit's ``Sum`` module,
    whose Norm rule splits the relevance in proportion to the two terms (as Zennit's ResNet
    canonizer does for ResNet's blocks)."""

    class MBConvSkip(zn.canonizers.AttributeCanonizer):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__(self._attribute_map)

        @classmethod
        def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, Any] | None:
            if not _is_mbconv(module):
                return None
            return {"forward": cls.forward.__get__(module), "canonizer_sum": zn.layer.Sum()}

        @staticmethod
        def forward(self: Any, inputs: Tensor, drop_connect_rate: float | None = None) -> Tensor:
            args = self._block_args
            if not (self.id_skip and args.stride == 1 and args.input_filters == args.output_filters):
                return type(self).forward(self, inputs, drop_connect_rate)
            self.id_skip = False  # the block's own forward, less its skip sum
            try:
                x = type(self).forward(self, inputs, drop_connect_rate)
            finally:
                self.id_skip = True
            return self.canonizer_sum(torch.stack([inputs, x], dim=-1))

    return MBConvSkip()


def _canonizers(zn: Any, model: nn.Module, x: Tensor, p: LrpParams) -> list[Any]:
    kind = p.canonizer
    if kind == "auto":
        import torchvision

        kind = "resnet" if isinstance(model, torchvision.models.ResNet) else "batchnorm"
    if kind == "resnet":
        return [zn.torchvision.ResNetCanonizer()]
    if kind == "batchnorm":
        pairs = batchnorm_pairs(model, x[:1])
        out = [zn.canonizers.NamedMergeBatchNorm(pairs)] if pairs else []
        if any(_is_mbconv(m) for m in model.modules()):
            out.append(_mbconv_skip_canonizer(zn))
        return out
    return []


def make_composite(zn: Any, batch: Batch, p: LrpParams, canonizers: list[Any]) -> Any:
    """The Zennit composite named by ``p.composite`` with ``p``'s parameters."""
    comp = zn.composites
    if p.composite == "epsilon":
        rule = zn.rules.Epsilon(epsilon=p.epsilon)
        layer_map = [*comp.layer_map_base(), (zn.types.Convolution, rule), (nn.Linear, rule)]
        return comp.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    if p.composite == "epsilon_gamma_box":
        x = batch.x
        low = batch.pixels.to_model(torch.zeros_like(x[:1]))
        high = batch.pixels.to_model(torch.ones_like(x[:1]))
        return comp.EpsilonGammaBox(low=low, high=high, epsilon=p.epsilon, gamma=p.gamma, canonizers=canonizers)
    cls = comp.COMPOSITES.get(p.composite)
    if cls is None:  # a Zennit version without it
        raise ConfigError(f"methods.lrp.composite: zennit {zn.__version__ if hasattr(zn, '__version__') else ''} "
                          f"has no composite {p.composite!r}", f"choose one of {', '.join(sorted(comp.COMPOSITES))}")
    return cls(epsilon=p.epsilon, canonizers=canonizers)


@contextmanager
def lrp_context(batch: Batch, p: LrpParams) -> Iterator[None]:
    """Inside the block, gradients of the model are Zennit's relevances under the composite."""
    zn = zennit()
    canonizers = _canonizers(zn, batch.model, batch.x, p)
    composite = make_composite(zn, batch, p, canonizers)
    with composite.context(batch.model):
        yield


def _refuse_attention(model: nn.Module) -> None:
    """Zennit has no rules for attention (its products of activations and its softmax): on a
    transformer the relevance would be neither conserved nor meaningful, so say so instead."""
    found = next((m for m in model.modules() if "Attention" in type(m).__name__), None)
    if found is not None:
        raise MethodError(
            f"lrp: the model has attention modules ({type(found).__name__}), for which Zennit has no LRP rules",
            "on a vision transformer use grad_rollout, attention_rollout or integrated_gradients",
        )


@register(
    "lrp",
    family="gradient",
    summary="LRP / Deep Taylor through Zennit: composites of rules per layer type, batch norm and ResNet canonizers",
    paper="Bach et al. 2015 (LRP); Montavon et al. 2017 (Deep Taylor); Anders et al. 2021 (Zennit)",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=LrpParams,
    # The shared forward and the relevance pass; the batch-norm canonizer traces one image per batch.
    cost=lambda p, c: (2, 1),
    aliases=("layerwise_relevance_propagation", "deep_taylor"),
)
def lrp(batch: Batch, p: LrpParams) -> MethodOutput:
    """Relevance R (B, C, H, W) at the input of the target logit, initialised to the logit (Zennit's
    Gradient attributor with a one-hot output gradient times the output). ``relevance_sum`` (sum R)
    and ``conservation_gap`` (sum R - logit) go to scores.jsonl: the gap is about 0 for epsilon-type
    rules on networks without biases (biases and the stabilisers absorb relevance), and tells how
    much a composite leaks on a real model. Models whose non-linearities are functions
    (torch.relu, F.relu) pass them unchanged, as Zennit does."""
    _refuse_attention(batch.model)
    with lrp_context(batch, p):
        unit, scores = batch.runner.input_gradients(batch.x, batch.targets)
    # The rules are linear in the relevance they receive: start from 1 and scale by the logit.
    relevance = unit * scores.view(-1, 1, 1, 1)
    total = relevance.sum((1, 2, 3))
    return MethodOutput(relevance, {"relevance_sum": total, "conservation_gap": total - scores})
