"""Localization heads: the models `xai train` builds and writes, and what `xai explain` needs to
read an ACoL model.

A :class:`Localizer` is a backbone's feature extractor (its classifier removed, see :func:`trunk`)
read by a head:

* :class:`CamHead`: global average pooling + one linear layer, so the class map of class c is
  ``W_c . A`` (CAM, Zhou et al. 2016) and every CAM-family method reads the features (layer
  ``backbone``).
* :class:`AcolHead` (Adversarial Complementary Learning, Zhang et al. 2018): two such branches on
  the same features. Branch A classifies; branch B sees the features with the region where A's
  class map (min-max normalised per image) is at least ``delta`` erased, so it must find the rest
  of the object. Training sums both branches' losses and erases by the true class. In eval mode
  the model's output is branch A's logits (the classifier).

Departure from the paper: each branch is GAP + one linear layer directly on the backbone's
features (the paper puts two 3x3 convolutions before a 1x1 classifier in each branch). The CAM head
and the ACoL head are then comparable layer for layer, and `cam` reads each branch's linear layer.

**ACoL in `xai explain`.** The paper's localization map is the element-wise maximum of both
branches' class maps, each normalised. Methods stay unaware of it: when the target layer is the
features both branches read, the engine runs each CAM-family method a second time on a
complementary batch (:meth:`AcolHead.complementary`: the features erased for the explained class,
the gradient of branch B's logit with respect to them, branch B's logits, and
:class:`ComplementaryBranch` for methods that run the model again, e.g. Score-CAM) and fuses the
two maps with :func:`fuse_maps`. This sits in one place (``engine.Explainer``), needs no second
forward through the backbone, and leaves every other model's path unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelError

if TYPE_CHECKING:
    from .layers import LayerRef

# The factory that `xai train` writes into RUN/config.yaml.
FACTORY = "xaicli.heads:localizer"
# The Localizer's feature extractor: the layer both heads read.
FEATURES_LAYER = "backbone"


def normalise_maps(maps: Tensor) -> Tensor:
    """Min-max over the last two dims of (..., h, w); a constant map becomes 0."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1)[..., None, None]
    hi = flat.amax(-1)[..., None, None]
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), torch.zeros_like(maps))


def fuse_maps(a: Tensor, b: Tensor) -> Tensor:
    """The ACoL fusion of two branches' maps (B, h, w): element-wise maximum of the maps, each
    min-max normalised per image (their scales differ: two classifiers)."""
    return torch.maximum(normalise_maps(a.float()), normalise_maps(b.float()))


class CamHead(nn.Module):
    """Global average pooling + linear: logits = W . mean_hw(A) + b."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.fc(self.pool(features).flatten(1))

    def class_maps(self, features: Tensor, classes: Tensor) -> Tensor:
        """(B, h, w): W[classes[b]] . A[b] at every location (bias left out, as CAM)."""
        w = self.fc.weight[classes].to(features.dtype)
        return torch.einsum("bc,bchw->bhw", w, features)


class AcolHead(nn.Module):
    """Two CAM branches; B reads the features with A's most discriminative region erased."""

    def __init__(self, channels: int, classes: int, delta: float = 0.6) -> None:
        super().__init__()
        self.a = CamHead(channels, classes)
        self.b = CamHead(channels, classes)
        self.delta = float(delta)

    def keep_mask(self, features: Tensor, classes: Tensor) -> Tensor:
        """(B, 1, h, w) 1 where branch A's normalised class map is below ``delta``, else 0."""
        with torch.no_grad():
            att = normalise_maps(self.a.class_maps(features.detach().float(), classes))
            return (att < self.delta).to(features.dtype)[:, None]

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Eval: branch A's logits (B, N). Training: (logits A, logits B), B erased by ``labels``
        (by A's prediction when none are given)."""
        logits = self.a(features)
        if not self.training:
            return logits
        classes = labels if labels is not None else logits.argmax(1)
        return logits, self.b(features * self.keep_mask(features, classes))

    def complementary(self, features: Tensor, classes: Tensor,
                      with_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Branch B as a CAM-family method sees it for the explained ``classes`` (B,): the erased
        features (B, C, h, w), d logit_B[class] / d erased features (when ``with_grad``) and
        branch B's logits (B, N), float32. Only the head runs: no pass through the backbone."""
        erased = (features.float() * self.keep_mask(features, classes)).detach()
        with torch.enable_grad():
            leaf = erased.clone().requires_grad_(with_grad)
            logits = self.b(leaf).float()
            grads = None
            if with_grad:
                (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), leaf)
        return erased, grads, logits.detach()

    def complementary_logits(self, features: Tensor) -> Tensor:
        """(B, N) branch B's logit of every class c on the features erased by class c's own map:
        mean_hw(keep_c * W_b[c] . A) + b_c (what ``b(erased by c)[c]`` gives, for all classes in
        one pass, since the branch is linear after the erasing)."""
        a_maps = torch.einsum("nc,bchw->bnhw", self.a.fc.weight.to(features.dtype), features)
        keep = (normalise_maps(a_maps.float()) < self.delta).to(features.dtype)
        b_maps = torch.einsum("nc,bchw->bnhw", self.b.fc.weight.to(features.dtype), features)
        return (keep * b_maps).mean((2, 3)) + self.b.fc.bias.to(features.dtype)


class Localizer(nn.Module):
    """``backbone`` (images -> feature maps (B, C, h, w)) read by ``head`` (CamHead or AcolHead)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        return self.head(self.backbone(x), labels)

    @property
    def gap_classifier(self) -> nn.Linear:
        """The linear layer that gives the model's logits from the features' global average (CAM's
        weights): the CAM head's, or ACoL's branch A."""
        return self.head.a.fc if isinstance(self.head, AcolHead) else self.head.fc


class ComplementaryBranch(nn.Module):
    """An ACoL model seen through branch B: ``forward(x)`` gives :meth:`AcolHead.complementary_logits`,
    which depend on no target, so chunked passes (Score-CAM's masked inputs) score any class."""

    def __init__(self, model: Localizer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        head = self.model.head
        assert isinstance(head, AcolHead)
        return head.complementary_logits(self.model.backbone(x))

    @property
    def gap_classifier(self) -> nn.Linear:
        """Branch B's linear layer (CAM's weights on the complementary batch)."""
        head = self.model.head
        assert isinstance(head, AcolHead)
        return head.b.fc


def acol_model(model: nn.Module, layer: LayerRef | None) -> Localizer | None:
    """The ACoL model whose branches both read the target ``layer`` (the backbone's output or the
    head's input), else None: maps at any other layer explain the classifier (branch A) alone."""
    if not isinstance(model, Localizer) or not isinstance(model.head, AcolHead) or layer is None:
        return None
    reads = (layer.module is model.backbone and not layer.use_input) or (layer.module is model.head and layer.use_input)
    return model if reads else None


# --------------------------------------------------------------------------------------------
# Backbones: a classifier without its classifier


class FeatureMethod(nn.Module):
    """A model whose feature extractor is one of its methods (``extract_features`` of the
    EfficientNet packages, ``forward_features`` of timm)."""

    def __init__(self, net: nn.Module, method: str) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.net, self.method)(x)


def trunk(model: nn.Module) -> nn.Module:
    """The part of a classifier that gives its last feature maps (B, C, h, w), without the pooling
    and classifier: a Localizer's backbone; ``extract_features`` (EfficientNet-Lite, the embedded
    default); timm's ``forward_features``; torchvision's children before ``avgpool`` (ResNet,
    RegNet) or ``features`` (VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt)."""
    if isinstance(model, Localizer):
        return model.backbone
    if hasattr(model, "extract_features") and hasattr(model, "_fc"):
        model._fc = nn.Identity()
        return FeatureMethod(model, "extract_features")
    if hasattr(model, "forward_features") and hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
        return FeatureMethod(model, "forward_features")
    names = [n for n, _ in model.named_children()]
    if "avgpool" in names and "fc" in names:
        return nn.Sequential(OrderedDict(list(model.named_children())[: names.index("avgpool")]))
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        if type(model).__name__ == "DenseNet":  # its forward applies the last ReLU itself
            return nn.Sequential(OrderedDict([("features", features), ("relu", nn.ReLU())]))
        return features
    raise ModelError(
        f"cannot find the feature extractor of {type(model).__name__} to put a localization head on",
        "supported: torchvision models with avgpool + fc (ResNet, RegNet) or .features (VGG, DenseNet, MobileNet, "
        "EfficientNet, ConvNeXt), timm models, EfficientNet-Lite (the embedded default)",
    )


def feature_channels(backbone: nn.Module, size: int = 64) -> int:
    """Channels of the backbone's feature maps (one forward of a blank image, in eval mode)."""
    flags = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.inference_mode():
            out = backbone(torch.zeros(1, 3, size, size))
    finally:
        for m, flag in flags.items():
            m.training = flag
    if not isinstance(out, Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"the backbone's features have shape {shape}, not a spatial map (B, C, h, w)",
                         "use a convolutional backbone")
    return int(out.shape[1])


def make_head(kind: str, channels: int, classes: int, delta: float = 0.6) -> nn.Module:
    if kind == "cam":
        return CamHead(channels, classes)
    if kind == "acol":
        return AcolHead(channels, classes, delta)
    raise ConfigError(f"head: unknown kind {kind!r}", "valid choices: cam, acol")


def with_head(model: nn.Module, kind: str, classes: int, delta: float = 0.6) -> Localizer:
    """``model``'s feature extractor with a new head of ``classes`` outputs."""
    backbone = trunk(model)
    return Localizer(backbone, make_head(kind, feature_channels(backbone), classes, delta))


def localizer(backbone: dict[str, Any], num_classes: int, head: str = "cam", delta: float = 0.6) -> Localizer:
    """The model factory of the configs `xai train` writes (``model.factory: xaicli.heads:localizer``):
    the backbone's architecture (a ``model:`` mapping; no weights: the checkpoint holds them all)
    with its head."""
    from .config import RANDOM_WEIGHTS, ModelConfig, PreprocessConfig, build_dataclass
    from .models import build_model

    spec = build_dataclass(ModelConfig, {**backbone, "weights": RANDOM_WEIGHTS, "checkpoint": None, "labels": None},
                           "model.kwargs.backbone")
    module = build_model(spec, PreprocessConfig(resize=(64, 64))).module
    return with_head(module, head, num_classes, delta)
