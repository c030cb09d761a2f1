"""The Python API: :func:`explain` for images in memory (tensors, PIL images or files) and
:func:`run_folder` (``xaicli.run``) for the folder run of ``xai explain``. Both sit on the code the
command line runs: method names and knobs are checked by :mod:`xaicli.plan`, targets by
:func:`xaicli.engine.resolve_target`, every map comes from :class:`xaicli.engine.Explainer`, and
overlays are drawn by :mod:`xaicli.render`.

Anything the API cannot honour raises an :class:`xaicli.errors.XaiError` subclass that says how to
fix it; it never falls back to explaining the predicted class. See docs/api.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from PIL import Image
from torch import Tensor, nn

from .annotate import Caption, Legend, annotate, lut_array
from .capture import LogitsOnly, eval_mode
from .config import (
    Config,
    PreprocessConfig,
    RuntimeConfig,
    TargetConfig,
    build_dataclass,
    load_config,
    parse_target,
)
from .data import DecodeError, load_image, to_rgb
from .engine import BatchResult, Explainer, autocast_factory, resolve_target, targets_of
from .errors import ConfigError, InputError, LayerError, MethodError, suggest
from .layers import LayerRef, auto_layer, resolve_layer
from .methods import MethodSpec, get_method
from .methods.batch import PixelSpace, Runner, chunks, stable_seed
from .models import LoadedModel, build_model, load_labels
from .plan import Plan, method_params, method_style, prepare
from .preprocess import Preprocess
from .render import Palette, Style, compose, normalize, place
from .run import run_folder
from .targets import ClassNames

if TYPE_CHECKING:
    from .records import Prediction

ImageInput: TypeAlias = "Tensor | Image.Image | str | Path"
Images: TypeAlias = "ImageInput | Sequence[ImageInput]"
LayerSpec: TypeAlias = "str | nn.Module | LayerRef | None"
TargetSpec: TypeAlias = "int | str | Sequence[Any] | Tensor | TargetConfig | None"
PreprocessSpec: TypeAlias = "str | Preprocess | PreprocessConfig | Mapping[str, Any] | None"

__all__ = ["Explained", "Model", "explain", "explain_tensor", "load_config", "load_model", "run_folder"]


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class Explained:
    """What :func:`explain` returns: the raw maps, the classes they explain and the predictions.

    * ``maps``: one method: a float32 tensor (B, h, w) of raw maps (the layer's resolution for the
      CAM family, the input's for pixel methods), or (B, K, h, w) when each image has K targets
      (``target="top3"``, a (B, K) tensor); several methods: a dict method name -> such a tensor.
    * ``targets``: the class index each map explains, (B,) or (B, K).
    * ``scores``: the softmax probability of each explained class, shaped as ``targets``.
    * ``logits``: the model's logits (B, N).
    * ``extras``: per-image values some methods give (e.g. Integrated Gradients'
      ``completeness_gap``): method -> name -> (B,) or (B, K).
    * ``topk``: the top predictions of each image as in scores.jsonl (index, label, prob).

    >>> import torch, xaicli
    >>> from tests.nets import GapNet
    >>> res = xaicli.explain(GapNet().eval(), torch.rand(2, 3, 32, 32), layer="features", preprocess=None)
    >>> res.maps.shape, res.targets.shape, len(res.overlays())
    (torch.Size([2, 16, 16]), torch.Size([2]), 2)
    """

    maps: Tensor | dict[str, Tensor]
    targets: Tensor
    scores: Tensor
    logits: Tensor
    extras: dict[str, dict[str, Tensor]]
    labels: list[str] | None
    layer: str | None
    methods: tuple[str, ...]
    _views: _Views = field(repr=False)

    @property
    def target_labels(self) -> list[Any]:
        """The class name of each explained class (``class 7`` without names), shaped as ``targets``."""
        return [[_label(self.labels, int(t)) for t in row] if isinstance(row, list) else _label(self.labels, int(row))
                for row in self.targets.tolist()]

    def topk_of(self, k: int = 5) -> list[list[Prediction]]:
        """The ``k`` top predictions of each image: index, label, softmax probability."""
        probs = self.logits.float().softmax(1)
        p, i = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"index": int(c), "label": _label(self.labels, int(c)), "prob": round(float(q), 6)}
                 for q, c in zip(pr.tolist(), ir.tolist(), strict=True)] for pr, ir in zip(p, i, strict=True)]

    @property
    def topk(self) -> list[list[Prediction]]:
        """The five top predictions of each image (:meth:`topk_of` for another k)."""
        return self.topk_of(5)

    def _raw(self, method: str | None, rank: int) -> tuple[str, Tensor]:
        name = self._method(method)
        m = self.maps[name] if isinstance(self.maps, dict) else self.maps
        if self.targets.dim() == 1:
            if rank != 0:
                raise ConfigError(f"rank {rank}: each image has one target here", "use rank=0")
            return name, m
        if not 0 <= rank < self.targets.shape[1]:
            raise ConfigError(f"rank {rank}: each image has {self.targets.shape[1]} targets",
                              f"use a rank from 0 to {self.targets.shape[1] - 1}")
        return name, m[:, rank]

    def _method(self, method: str | None) -> str:
        if method is None:
            if len(self.methods) > 1:
                raise ConfigError(f"several methods were run ({', '.join(self.methods)}): say which one",
                                  f"e.g. method={self.methods[0]!r}")
            return self.methods[0]
        name = get_method(method, path="method").name
        if name not in self.methods:
            raise ConfigError(f"method {method!r} was not run", suggest(method, self.methods))
        return name

    def image_maps(self, method: str | None = None, rank: int = 0) -> list[Tensor]:
        """Each raw map placed in its image's own frame (H_i, W_i): upsampled over the part of the
        image the model saw, NaN outside a centre crop. The same values as ``xai explain
        --save-maps`` writes to maps/*.npy. For tensor inputs the frame is the input's size."""
        _, raw = self._raw(method, rank)
        v = self._views
        return [place(raw[i].to(v.device), h, w, v.windows[i])[0].cpu() for i, (h, w) in enumerate(v.sizes)]

    def overlays(self, method: str | None = None, rank: int = 0, *, caption: bool = False, colormap: str = "jet",
                 diverging_colormap: str = "bwr", alpha: float = 0.5, style: Style | None = None) -> list[Image.Image]:
        """The maps over their images as PIL images, drawn as ``xai explain`` draws them (its
        colormaps, the method's style); ``caption``: with the CLI's caption strip below (method,
        class, probability, rank, colour bar). For a normalised tensor input the image is the
        input with the normalisation undone (min-max scaled when it is unknown)."""
        name, raw = self._raw(method, rank)
        v = self._views
        mode, _ = v.specs[name].display(v.params[name])
        style = style or method_style(v.specs[name])
        palette = Palette.of(colormap, diverging_colormap, alpha, v.device)
        drawn, _ = compose([im.to(v.device) for im in v.images], normalize(raw.to(v.device), mode), v.windows,
                           palette, signed=mode == "diverging", style=style)
        arrays = [a for a in drawn if a is not None]
        if caption:
            legend = Legend.of(lut_array(diverging_colormap if mode == "diverging" else colormap), mode, style.blend,
                               alpha, style.clip)
            arrays = [annotate(a, self._caption(i, name, rank), legend) for i, a in enumerate(arrays)]
        return [Image.fromarray(a) for a in arrays]

    def _caption(self, i: int, method: str, rank: int) -> Caption:
        t = self.targets[i] if self.targets.dim() == 1 else self.targets[i, rank]
        probs = self.logits[i].float().softmax(0)
        p = probs[int(t)]
        return Caption(method, _label(self.labels, int(t)), float(p), int((probs > p).sum()) + 1)


@dataclass
class _Views:
    """What the result needs to draw: the images (uint8 (3, H, W)), the window of each that the
    model saw, and each method's spec and knobs."""

    images: list[Tensor]
    windows: list[tuple[float, float, float, float]]
    specs: dict[str, MethodSpec]
    params: dict[str, Any]
    device: torch.device

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(int(im.shape[1]), int(im.shape[2])) for im in self.images]


def _label(labels: Sequence[str] | None, index: int) -> str:
    return labels[index] if labels is not None and 0 <= index < len(labels) else f"class {index}"


# --------------------------------------------------------------------------------------------
# explain


def explain(
    model: nn.Module | Model | LoadedModel,
    images: Images,
    method: str | Sequence[str] = "gradcam",
    layer: LayerSpec = None,
    target: TargetSpec = None,
    preprocess: PreprocessSpec = "auto",
    *,
    labels: Sequence[str] | str | None = None,
    batch_size: int = 32,
    precision: str = "fp32",
    seed: int = 0,
    **knobs: Any,
) -> Explained:
    """Explain a classifier's decision on images in memory or on disk; the maps come from the
    same engine as ``xai explain``.

    ``model``: a ``torch.nn.Module`` (on the device to run on) or :func:`load_model`'s result,
    which brings its class names, preprocessing and target layer. ``images``: a float tensor (3, H, W) or
    (B, 3, H, W), a PIL image, an image file, or a list of them.

    ``preprocess`` says how inputs relate to pixels:

    * ``"auto"`` (default): PIL images and files are resized, cropped and normalised with the
      model's preprocessing (:func:`load_model`), ImageNet's for a bare module (with a warning).
      Float tensors are model inputs, used as given: with :func:`load_model`'s model they are taken
      as normalised with its mean and std; with a bare module their normalisation is unknown, and
      a method that needs it (Integrated Gradients' black or uniform baseline) raises an error
      asking for ``preprocess=``.
    * ``None``: no preprocessing; tensors are used as given and baselines are built in that space
      (the black image is the zero tensor).
    * ``"imagenet"``, a :class:`xaicli.preprocess.Preprocess` or a mapping like the config's
      ``preprocess:`` section (``{"resize": 256, "crop": 224, "mean": [...], "std": [...]}``):
      images go through it, and tensors are taken as already normalised with its mean and std.

    ``method``: a name or a list of names (``xai methods``); knobs of one method as keywords
    (``steps=64``), of several as ``NAME={...}`` keywords. ``layer``: a dotted name
    (``"layer4"``, ``"layer4.1:input"``), a module of ``model`` (``model.layer4``), ``"auto"``, or
    None: the config's layer for :func:`load_model`'s model, else the automatic choice. ``target``: None (the predicted class), a class index, a class name, ``"top3"``
    (three maps per image), or one class per image (a list or tensor of B indices or names, or
    (B, K) for K each). ``labels``: class names for a bare module (a list, ``"imagenet"`` or a
    file). ``seed``: the noise of sampling methods, per image from it and the image's file name
    (its position for in-memory images).

    >>> import torch, xaicli
    >>> from tests.nets import GapNet
    >>> net = GapNet(num_classes=3).eval()
    >>> res = xaicli.explain(net, torch.rand(4, 3, 32, 32), "gradcam", layer=net.features,
    ...                      target=[0, 1, 2, 0], preprocess=None)
    >>> res.maps.shape, res.targets.tolist()
    (torch.Size([4, 16, 16]), [0, 1, 2, 0])
    """
    module, names, model_pre, model_layer = _model_parts(model, labels)
    _runner_options(batch_size, precision)
    pre = _preprocess(preprocess, model_pre)
    batch = _inputs(images, pre)
    pairs = _methods(method, knobs, batch.preprocess)
    pick = _target_rule(target, names, batch.x.shape[0])
    device = _device(module)
    wrapped = LogitsOnly(module)  # a forward may return a tuple, a dict or an object with .logits
    runner = Runner(model=wrapped, budget=batch_size, autocast=autocast_factory(device, precision), precision=precision)
    seeds = torch.tensor([stable_seed(seed, k) for k in batch.keys], dtype=torch.long)
    with eval_mode(module):  # the automatic layer's dummy forward included
        ref = _layer(module, model_layer if layer is None else layer, pairs, (int(batch.x.shape[-2]),
                                                                              int(batch.x.shape[-1])), device)
        explainer = Explainer(wrapped, pairs, ref, TargetConfig(), runner, pixels=batch.pixels)
        parts = [explainer(batch.x[sl].to(device), seeds[sl], targets=pick(sl))
                 for sl in chunks(len(batch.keys), batch_size)]
    return _result(parts, pairs, names, ref, _Views(batch.images, batch.windows, {s.name: s for s, _ in pairs},
                                                    {s.name: p for s, p in pairs}, device))


def _runner_options(batch_size: int, precision: str) -> None:
    """``batch_size`` and ``precision`` checked as the config checks ``runtime:``."""
    build_dataclass(RuntimeConfig, {"batch_size": batch_size, "precision": precision}, "runtime")


@dataclass
class Model:
    """A config's model ready for :func:`explain`: the ``module`` (eval mode, on the CPU; move it
    with ``model.module.to(device)``), its class names, preprocessing and target layer."""

    module: nn.Module
    labels: list[str] | None
    preprocess: Preprocess
    layer: str | None  # the config's target_layer; None: the automatic choice
    description: str


def load_model(config: str | Path | Config | None = None) -> Model:
    """The model of a config (a YAML file, a shipped config's name, a :class:`xaicli.config.Config`
    or None for the embedded default) with its class names, preprocessing and target layer, which
    :func:`explain` then uses. What had to be assumed (random weights asked for with ``null``, no
    class names, ImageNet's preprocessing) is issued as a ``UserWarning``, as the CLI prints it.

    >>> import xaicli
    >>> model = xaicli.load_model()  # the embedded default: EfficientNet-Lite0, ImageNet weights
    >>> model.preprocess.input_size, model.labels[285], model.layer
    ((224, 224), 'Egyptian cat', '_avg_pooling:input')
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    loaded = build_model(cfg.model, cfg.preprocess)
    for note in [*cfg.warnings, *loaded.notes]:
        warnings.warn(f"xaicli.load_model: {note}", UserWarning, stacklevel=2)
    return Model(loaded.module, loaded.labels, loaded.preprocess, cfg.target_layer, loaded.description)


# --------------------------------------------------------------------------------------------
# The model, its labels and preprocessing


def _model_parts(model: Any, labels: Sequence[str] | str | None) -> tuple[nn.Module, list[str] | None,
                                                                        Preprocess | None, str | None]:
    """The module, its class names, preprocessing and configured layer (None where unknown)."""
    layer = None
    if isinstance(model, (Model, LoadedModel)):
        names = model.labels
        module, pre = model.module, model.preprocess
        layer = model.layer if isinstance(model, Model) else None
    elif isinstance(model, nn.Module):
        module, names, pre = model, None, None
    else:
        raise ConfigError(f"model: expected a torch.nn.Module or xaicli.load_model(...)'s result, "
                          f"got {type(model).__name__}")
    if labels is not None:
        names = load_labels(labels) if isinstance(labels, str) else [str(n) for n in labels]
    return module, names, pre, layer


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class UnknownPixels(PixelSpace):
    """The pixel space of tensors whose normalisation nobody stated: a method that needs it (a
    black baseline is a pixel value) gets an error instead of a silently wrong baseline."""

    def to_model(self, pixels: Tensor) -> Tensor:
        raise ConfigError(
            "this method builds inputs from pixel values (e.g. Integrated Gradients' black baseline) but the "
            "tensors' normalisation is unknown",
            "pass preprocess=None if the tensors are the model input as is (the black image is then the zero "
            "tensor), or preprocess={'mean': [...], 'std': [...]} (or 'imagenet') for the normalisation they went "
            "through; or pass PIL images or files, or the model from xaicli.load_model(...)",
        )


_AUTO = "auto"


def _preprocess(spec: PreprocessSpec, model_pre: Preprocess | None) -> Preprocess | str | None:
    """The preprocessing: a Preprocess, None (no preprocessing) or "auto" (a bare module: unknown)."""
    if spec is None or isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, str):
        if spec == _AUTO:
            return model_pre if model_pre is not None else _AUTO
        if spec == "imagenet":
            return Preprocess.resolve(PreprocessConfig(), {})
        raise ConfigError(f"preprocess: unknown value {spec!r}",
                          "use 'auto', 'imagenet', None, a Preprocess or a mapping {resize, crop, mean, std}")
    cfg = spec if isinstance(spec, PreprocessConfig) else build_dataclass(PreprocessConfig, dict(spec), "preprocess")
    return Preprocess.resolve(cfg, {})


# --------------------------------------------------------------------------------------------
# The inputs


@dataclass
class _Inputs:
    x: Tensor  # (B, 3, H, W) model inputs
    images: list[Tensor]  # uint8 (3, H_i, W_i): what overlays are drawn on
    windows: list[tuple[float, float, float, float]]
    keys: list[str]  # per image: the seed's key
    pixels: PixelSpace
    preprocess: Preprocess | None  # for knobs that name image files


def _inputs(images: Images, pre: Preprocess | str | None) -> _Inputs:
    items = _as_list(images)
    if not items:
        raise InputError("images: nothing to explain (an empty list)")
    tensors = [it for it in items if isinstance(it, Tensor) and it.is_floating_point()]
    if tensors and len(tensors) != len(items):
        raise InputError("images: mix of float tensors (model inputs) and images (PIL, files, uint8 tensors)",
                         "pass one kind: float tensors, or PIL images / files")
    if tensors:
        return _tensor_inputs(tensors, pre)
    if pre == _AUTO:
        warnings.warn("xaicli.explain: the model's preprocessing is unknown (a bare nn.Module); images are resized, "
                      "cropped and normalised with ImageNet's recipe. Pass preprocess=... or "
                      "xaicli.load_model(...)'s model to say otherwise", UserWarning, stacklevel=3)
        pre = Preprocess.resolve(PreprocessConfig(), {})
    assert not isinstance(pre, str)
    decoded = [_decode(it, i) for i, it in enumerate(items)]
    raw = [im for im, _ in decoded]
    if pre is None:
        if len({tuple(im.shape) for im in raw}) > 1:
            raise InputError("images: with preprocess=None every image must have the same size",
                             "give a preprocess (e.g. 'imagenet' or {'resize': [224, 224]})")
        x = torch.stack([im.float() / 255.0 for im in raw])
        windows = [(0.0, 0.0, float(im.shape[1]), float(im.shape[2])) for im in raw]
        return _Inputs(x, raw, windows, [k for _, k in decoded], PixelSpace(), None)
    x = torch.stack([pre(im) for im in raw])
    windows = [pre.window(int(im.shape[1]), int(im.shape[2])) for im in raw]
    return _Inputs(x, raw, windows, [k for _, k in decoded], PixelSpace(tuple(pre.mean), tuple(pre.std)), pre)


def _as_list(images: Images) -> list[Any]:
    if isinstance(images, Tensor):
        if images.dim() == 4:
            return list(images)
        if images.dim() == 3:
            return [images]
        raise InputError(f"images: a tensor of shape {tuple(images.shape)}; expected (3, H, W) or (B, 3, H, W)")
    if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _tensor_inputs(tensors: list[Tensor], pre: Preprocess | str | None) -> _Inputs:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InputError(f"images: tensors of different shapes {sorted(shapes)}", "resize them to one size first")
    x = torch.stack([t.detach() for t in tensors])
    if x.shape[1] != 3:
        raise InputError(f"images: tensors of shape {tuple(x.shape[1:])}; expected 3 channels first (3, H, W)")
    if pre == _AUTO:
        pixels: PixelSpace = UnknownPixels()
        shown = _minmax(x)
    else:
        assert not isinstance(pre, str)
        pixels = PixelSpace(tuple(pre.mean), tuple(pre.std)) if pre is not None else PixelSpace()
        mean, std = pixels._stats(x.float())
        shown = x.float() * std + mean
    images = [(im.clamp(0, 1) * 255).round().to(torch.uint8).cpu() for im in shown]
    h, w = int(x.shape[2]), int(x.shape[3])
    return _Inputs(x, images, [(0.0, 0.0, float(h), float(w))] * len(images), [str(i) for i in range(len(images))],
                   pixels, pre if isinstance(pre, Preprocess) else None)


def _minmax(x: Tensor) -> Tensor:
    flat = x.float().flatten(1)
    lo, hi = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
    return (x.float() - lo) / (hi - lo).clamp_min(1e-12)


def _decode(item: Any, i: int) -> tuple[Tensor, str]:
    """uint8 (3, H, W) RGB and the image's seed key (its file name, else its position)."""
    if isinstance(item, (str, Path)):
        try:
            return load_image(Path(item).expanduser())[0], Path(item).name
        except DecodeError as e:
            raise InputError(f"images: {item}: {e.message}") from None
    if isinstance(item, Tensor):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3:
            raise InputError(f"images[{i}]: a {item.dtype} tensor of shape {tuple(item.shape)}",
                             "images are float tensors (3, H, W) (model inputs) or uint8 (3, H, W) RGB")
        return item.cpu(), str(i)
    if isinstance(item, Image.Image):
        import numpy as np

        arr = np.array(to_rgb(item), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), str(i)
    raise InputError(f"images[{i}]: cannot explain a {type(item).__name__}",
                     "pass tensors, PIL images or image file paths")


# --------------------------------------------------------------------------------------------
# Methods, layer, targets


def _methods(method: str | Sequence[str], knobs: dict[str, Any], pre: Preprocess | None) -> list[tuple[MethodSpec, Any]]:
    names = [m.strip() for m in method.split(",")] if isinstance(method, str) else [str(m) for m in method]
    specs: list[MethodSpec] = []
    for n in names:
        spec = get_method(n, path="method")
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ConfigError("method: no method given", "e.g. method='gradcam' (`xai methods` lists them)")
    if len(specs) == 1:
        per = {specs[0].name: knobs}
    else:
        per = {}
        for key, value in knobs.items():
            spec = get_method(key, path="knobs")
            if spec not in specs or not isinstance(value, Mapping):
                raise ConfigError(f"{key}=: with several methods, knobs go as METHOD={{...}} for a method that runs",
                                  f"e.g. {specs[0].name}={{...}}; methods: {', '.join(s.name for s in specs)}")
            per[spec.name] = dict(value)
    pairs = [(s, method_params(s, per.get(s.name))) for s in specs]
    if pre is None:
        return pairs
    plan = Plan(Config(method=tuple(s.name for s in specs)), tuple(pairs), ())
    return list(prepare(plan, pre).methods)  # knobs that name image files, read like the inputs


def _layer(module: nn.Module, layer: LayerSpec, pairs: list[tuple[MethodSpec, Any]], size: tuple[int, int],
           device: torch.device) -> LayerRef | None:
    """The target layer by dotted name or module object; None when no method needs one (as the
    folder run, which resolves ``target_layer`` only then)."""
    if not any(s.needs_layer for s, _ in pairs):
        return None
    if isinstance(layer, LayerRef):
        return layer
    if isinstance(layer, nn.Module):
        name = next((n for n, m in module.named_modules() if m is layer), None)
        if name is None or name == "":
            what = "the model itself" if name == "" else f"a {type(layer).__name__} that is not part of the model"
            raise LayerError(f"layer: {what} ({type(module).__name__})",
                             "pass a submodule of this model (e.g. model.layer4) or its dotted name; "
                             "`xai layers` prints the tree")
        return resolve_layer(module, name)
    if layer is not None and not isinstance(layer, str):
        raise LayerError(f"layer: expected a dotted name or a module of the model, got {type(layer).__name__}")
    if layer not in (None, "auto"):
        return resolve_layer(module, layer)  # a bad name: LayerError with the closest names
    return auto_layer(module, size, device)


def _target_rule(target: TargetSpec, labels: list[str] | None, b: int) -> Callable[[slice], Callable[[Tensor], Tensor]]:
    """For a slice of the images, a function of their logits (n, N) giving the classes (n, K)."""
    if isinstance(target, Tensor) or (isinstance(target, Sequence) and not isinstance(target, str)):
        given = _per_image(target, b)
        return lambda sl: (lambda logits: _checked(given[sl], logits, labels))
    rule = target if isinstance(target, TargetConfig) else parse_target(target)
    if rule.per_image:
        raise ConfigError(f"target: {rule.describe()!r} reads classes per image file, which the Python API does "
                          "not have", "pass one class per image as a list or tensor (target=[285, 281, ...])")
    if rule.mode == "name":  # resolved now, before any computation
        if labels is None:
            raise ConfigError(f"target: class name {rule.name!r} given but the model has no class names",
                              "pass labels=[...] (or labels='imagenet'), a class index, or xaicli.load_model's model")
        rule = resolve_target(rule, labels, len(labels))

    def of(logits: Tensor) -> Tensor:
        n = _classes(logits, labels)
        return targets_of(resolve_target(rule, labels, n), logits)

    return lambda sl: of


def _per_image(target: Sequence[Any] | Tensor, b: int) -> list[list[Any]]:
    rows = target.tolist() if isinstance(target, Tensor) else list(target)
    if len(rows) != b:
        raise ConfigError(f"target: {len(rows)} targets for {b} images", "give one class (or one list of classes) "
                          "per image, or a single class, 'top3' or None for all")
    nested = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
    if len({len(r) for r in nested}) > 1:
        raise ConfigError("target: per-image lists of different lengths", "give every image the same number of classes")
    return nested


def _checked(rows: list[list[Any]], logits: Tensor, labels: list[str] | None) -> Tensor:
    """Per-image classes as (n, K) indices on the logits' device; names and ranges checked."""
    names = ClassNames(labels, _classes(logits, labels))
    out, problems = [], []
    for i, row in enumerate(rows):
        found = [names.index(v) for v in row]
        problems += [f"image {i}: {f}" for f in found if isinstance(f, str)]
        out.append([f if isinstance(f, int) else 0 for f in found])
    if problems:
        raise ConfigError("target: " + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                                                 if len(problems) > 3 else ""))
    return torch.tensor(out, dtype=torch.long, device=logits.device)


def _classes(logits: Tensor, labels: list[str] | None) -> int:
    if logits.dim() != 2:
        raise MethodError(f"the model's output has shape {tuple(logits.shape)}; xaicli explains classifiers (B, classes)")
    n = int(logits.shape[1])
    if labels is not None and len(labels) != n:
        raise ConfigError(f"labels: {len(labels)} class names but the model outputs {n} classes",
                          "give one name per output")
    return n


# --------------------------------------------------------------------------------------------
# Putting the result together


def _result(parts: list[BatchResult], pairs: list[tuple[MethodSpec, Any]], labels: list[str] | None,
            ref: LayerRef | None, views: _Views) -> Explained:
    targets = torch.cat([p.targets for p in parts]).cpu()
    logits = torch.cat([p.logits for p in parts]).cpu()
    k = targets.shape[1]
    maps: dict[str, Tensor] = {}
    extras: dict[str, dict[str, Tensor]] = {}
    for j, (spec, _) in enumerate(pairs):
        per_rank = [torch.cat([p.methods[j].maps[r] for p in parts]).cpu() for r in range(k)]
        maps[spec.name] = per_rank[0] if k == 1 else torch.stack(per_rank, 1)
        names = parts[0].methods[j].extras[0].keys()
        extras[spec.name] = {n: _ranks([torch.cat([p.methods[j].extras[r][n] for p in parts]).detach().float().cpu()
                                        for r in range(k)]) for n in names}
    scores = logits.softmax(1).gather(1, targets)
    one = k == 1
    return Explained(
        maps=next(iter(maps.values())) if len(maps) == 1 else maps,
        targets=targets[:, 0] if one else targets,
        scores=scores[:, 0] if one else scores,
        logits=logits,
        extras=extras,
        labels=labels,
        layer=ref.spec if ref is not None and any(s.needs_layer for s, _ in pairs) else None,
        methods=tuple(s.name for s, _ in pairs),
        _views=views,
    )


def _ranks(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.stack(values, 1)


# --------------------------------------------------------------------------------------------
# The former entry point


def explain_tensor(
    model: nn.Module,
    x: Tensor,
    method: str = "gradcam",
    layer: str | nn.Module | None = None,
    target: int | str | TargetConfig | None = None,
    params: dict[str, Any] | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
    seeds: Tensor | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Tensor:
    """Raw maps (B, h, w) of one method for a batch already on the model's device, (B, K, h, w)
    for K targets per image (kept for tests and benchmarks; :func:`explain` is the API). ``x`` is taken as pixels in [0, 1] unless
    ``mean`` / ``std`` give the normalisation it went through. ``seeds``: one per image (default:
    its position). Targets as :func:`explain` takes them (a class name needs no labels here:
    it raises)."""
    spec = get_method(method)
    p = method_params(spec, params)
    pick = _target_rule(target, None, x.shape[0])(slice(0, x.shape[0]))
    runner = Runner(model=model, budget=batch_size, autocast=autocast_factory(x.device, precision), precision=precision)
    with eval_mode(model):
        ref = _layer(model, layer, [(spec, p)], (int(x.shape[-2]), int(x.shape[-1])), x.device)
        pixels = PixelSpace(tuple(mean or (0.0, 0.0, 0.0)), tuple(std or (1.0, 1.0, 1.0)))
        res = Explainer(model, [(spec, p)], ref, TargetConfig(), runner, pixels=pixels)(x, seeds, targets=pick)
    maps = res.methods[0].maps
    return maps[0] if len(maps) == 1 else torch.stack(maps, 1)

