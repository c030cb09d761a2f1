"""Model sources (torchvision, timm, ``module:callable`` factories), checkpoints, labels and
the preprocessing each model expects.

Checkpoints are state dicts read with ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling is refused. torchvision's weights enums give labels and preprocessing
(``meta`` and ``transforms()``); their files come from torch hub's cache, never from the network
unless the cache misses and the network is there.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RANDOM_WEIGHTS, ModelConfig, PreprocessConfig
from .errors import ConfigError, ModelError, suggest
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

PKG_PREFIX = "pkg://"


@dataclass
class LoadedModel:
    module: nn.Module
    labels: list[str] | None
    preprocess: Preprocess
    description: str  # e.g. "torchvision resnet50 (IMAGENET1K_V2)"
    # Where the weights, the class names and each preprocessing value came from (run.json "sources").
    sources: dict[str, Any] = field(default_factory=dict)
    # What had to be assumed (no class names, ImageNet's preprocessing for want of any other):
    # printed once at the start of a run and kept in run.json's "warnings".
    notes: list[str] = field(default_factory=list)

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"


def resolve_path(spec: str, what: str = "file") -> Path:
    """A filesystem path, or ``pkg://package/relative/path`` for a file inside an installed package."""
    if spec.startswith(PKG_PREFIX):
        rest = spec[len(PKG_PREFIX):]
        package, _, rel = rest.partition("/")
        if not package or not rel:
            raise ConfigError(f"{what}: {spec!r} must look like pkg://package/relative/path")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"{what}: package {package!r} of {spec!r} is not installed",
                f"pip install {package.replace('_', '-')}",
            )
        base = Path(next(iter(found.submodule_search_locations)))
        path = base / rel
        if not path.resolve().is_relative_to(base.resolve()):
            raise ConfigError(f"{what}: {spec!r} points outside the package {package!r}",
                              "pkg:// names a file inside an installed package; give other files as paths")
    else:
        path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise ModelError(f"{what}: file not found: {path}", "check the path in the config")
    return path


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_state_dict(spec: str, key: str | None = None, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict safely: ``weights_only=True``; unwrap {'state_dict': ...} style files;
    strip DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` prefixes. ``what`` names
    the file in errors as the user wrote it (``model.weights``, ``model.checkpoint``)."""
    path = resolve_path(spec, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"{what} {path}: cannot be read as plain weights ({msg})",
            "xaicli loads checkpoints with torch.load(weights_only=True) and refuses pickled code; "
            "save them with torch.save(model.state_dict(), path)",
        ) from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj) if isinstance(obj, Mapping) else []
            raise ModelError(f"{what} {path}: no key {key!r}", suggest(key, [str(k) for k in keys]))
        obj = obj[key]
    elif isinstance(obj, Mapping):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"{what} {path}: not a state dict (a mapping of names to tensors)",
            "set model.checkpoint_key to the entry holding the weights",
        )
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ModelError(
            f"checkpoint {source} does not fit {type(model).__name__}: {first.strip()}",
            "check model.name / model.kwargs (e.g. num_classes) against the checkpoint",
        ) from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(
                f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})"
            )
        raise ModelError(
            f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(parts),
            "check the architecture, or set model.checkpoint_key if the weights are nested",
        )


def load_labels(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    if spec == "imagenet":
        path = Path(__file__).parent / "data" / "imagenet_classes.txt"
    else:
        try:
            path = resolve_path(spec, "model.labels")
        except ModelError as e:
            raise ConfigError(e.message, e.hint) from None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.labels: cannot read {path}: {e}") from None
    while lines and not lines[-1].strip():  # blank lines at the very end shift nothing
        lines.pop()
    blank = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        raise ConfigError(f"model.labels: {path}: blank line(s) {shown}",
                          "one class name per line, in class order: a blank line would shift every label after it")
    if not lines:
        raise ConfigError(f"model.labels: {path} holds no class names")
    return [ln.strip() for ln in lines]


def _looks_like_path(s: str) -> bool:
    return s.startswith(PKG_PREFIX) or "/" in s or os.sep in s or s.endswith((".pth", ".pt", ".bin", ".ckpt"))


def _state_file(cfg: ModelConfig) -> tuple[str, str] | None:
    """The state-dict file the config names and the key it was written under (errors say that
    key): a path in ``model.weights`` or ``model.checkpoint``."""
    if cfg.weights is not None and _looks_like_path(cfg.weights):
        return cfg.weights, "model.weights"
    if cfg.checkpoint:
        return cfg.checkpoint, "model.checkpoint"
    return None


def _no_weights(cfg: ModelConfig) -> ConfigError:
    return ConfigError(
        f"model.weights: not given, so {cfg.source} {cfg.name} would run with random weights and its maps would "
        "explain an untrained network",
        "give trained weights (" + ("a weights name such as DEFAULT or IMAGENET1K_V1, or " if cfg.source == "torchvision"
                                    else "") + "a state-dict path), or `weights: random` to explain the untrained model",
    )


def _torchvision(cfg: ModelConfig, architecture_only: bool = False) \
        -> tuple[nn.Module, list[str] | None, dict[str, Any], str, str]:
    """(model, labels, preprocessing of the weights, description, where the weights came from).
    ``architecture_only``: weights missing from the cache leave the model as initialised (the
    origin then starts with ``not loaded``)."""
    import torchvision.models as tvm

    assert cfg.name
    names = tvm.list_models()
    if cfg.name not in names:
        raise ConfigError(f"model.name: unknown torchvision model {cfg.name!r}", suggest(cfg.name, names))
    weights = None
    file = _state_file(cfg)
    if cfg.weights is not None and cfg.weights != RANDOM_WEIGHTS and file is None:
        enum = tvm.get_model_weights(cfg.name)
        members = list(enum.__members__)
        if cfg.weights not in members:
            raise ConfigError(
                f"model.weights: {cfg.name} has no weights {cfg.weights!r}", suggest(cfg.weights, [*members, RANDOM_WEIGHTS])
            )
        weights = enum[cfg.weights]
    if file is None and weights is None and cfg.weights != RANDOM_WEIGHTS:
        raise _no_weights(cfg)
    kwargs = dict(cfg.kwargs)
    if weights is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = len(weights.meta["categories"])
    try:
        model = tvm.get_model(cfg.name, weights=None, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs: {cfg.name} rejects {kwargs}: {e}") from None
    desc = f"torchvision {cfg.name}"
    if file is not None:
        apply_state_dict(model, load_state_dict(file[0], cfg.checkpoint_key, file[1]), file[0])
        desc += f" ({file[0]})"
        origin = f"{file[1]}: {file[0]}"
    elif weights is not None:
        try:
            apply_state_dict(model, _hub_weights(weights), str(weights))
            desc += f" ({weights})"
            origin = f"torchvision weights {weights}"
        except ModelError as e:
            if not architecture_only:
                raise
            desc += f" ({weights} not loaded)"
            origin = f"not loaded: {e.message}"
    else:
        desc += " (random weights)"
        origin = "random"
    labels, pre = None, {}
    if weights is not None:
        labels = list(weights.meta["categories"])
        t = weights.transforms()
        pre = {
            "resize": _first(getattr(t, "resize_size", None)),
            "crop": _first(getattr(t, "crop_size", None)),
            "mean": tuple(getattr(t, "mean", IMAGENET_MEAN)),
            "std": tuple(getattr(t, "std", IMAGENET_STD)),
            "interpolation": getattr(getattr(t, "interpolation", None), "value", "bilinear"),
        }
    return model, labels, pre, desc, origin


def _first(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and len(v) == 1:
        return int(v[0])
    return v


def _hub_weights(weights: Any) -> dict[str, torch.Tensor]:
    """torchvision weights from torch hub's cache, downloading only when the cache misses."""
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return load_state_dict(str(cached))
    import contextlib
    import sys

    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub says "Downloading" on stdout: keep --json clean
            return torch.hub.load_state_dict_from_url(
                weights.url, map_location="cpu", progress=False, weights_only=True
            )
    except Exception as e:
        raise ModelError(
            f"weights {weights} are not in torch hub's cache ({cached}) and could not be downloaded "
            f"({type(e).__name__})",
            f"copy {filename} into {cached.parent} (or set TORCH_HOME), or point model.weights at a local "
            "state-dict file",
        ) from None


def _import_factory_module(name: str) -> Any:
    """Import ``name``; a module of the user's own in the current folder is found too (as
    ``python -m`` would; the ``xai`` script alone does not look there). The folder goes at the end of
    the search path, so it never shadows an installed package."""
    import sys

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def _factory(cfg: ModelConfig) -> tuple[nn.Module, str]:
    assert cfg.factory
    mod_name, sep, attr = cfg.factory.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"model.factory: {cfg.factory!r} must look like 'package.module:callable'")
    if mod_name.split(".")[0] in _NOT_FACTORIES:
        raise ConfigError(f"model.factory: {cfg.factory} is in the Python standard library, not a model factory",
                          FACTORY_HINT)
    try:
        obj: Any = _import_factory_module(mod_name)
    except ImportError as e:
        raise ModelError(
            f"model.factory: cannot import {mod_name!r}: {e}",
            f"pip install the package providing {mod_name}, or run xai from the folder that holds "
            f"{mod_name.split('.')[0]} (or put that folder on PYTHONPATH)",
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"model.factory: {mod_name} has no attribute {attr!r}", suggest(part, names))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.factory: {cfg.factory} is not callable")
    _check_factory(obj, cfg)
    try:
        model = obj(**cfg.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {cfg.factory} rejects {dict(cfg.kwargs)}: {e}") from None
    except Exception as e:
        raise ModelError(f"model.factory: {cfg.factory} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory: {cfg.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model, f"factory {cfg.factory}"


# A factory is a callable of the user's code or of a model package that returns an nn.Module.
# The standard library has none (and ``os:system`` or ``subprocess:run`` would run commands).
_NOT_FACTORIES = frozenset(sys.stdlib_module_names) | {"builtins", "importlib", "pip", "setuptools"}
FACTORY_HINT = ("a factory is a callable of your code or of a model package that returns a torch.nn.Module, "
                "e.g. torchvision.models:resnet50")


def _check_factory(obj: Any, cfg: ModelConfig) -> None:
    """Refuse, before calling it, a factory that cannot return a model: a class that is not an
    nn.Module, a callable whose return annotation says something else, or one that does not take
    the configured kwargs (listing the ones it takes)."""
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ConfigError(f"model.factory: {cfg.factory} is a class but not a torch.nn.Module", FACTORY_HINT)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: nothing more to check
        return
    if not isinstance(obj, type):
        try:
            ret = typing.get_type_hints(obj).get("return")
        except Exception:  # unresolvable annotations: not ours to judge
            ret = None
        if isinstance(ret, type) and not issubclass(ret, nn.Module):
            raise ConfigError(f"model.factory: {cfg.factory} returns {ret.__name__}, not a torch.nn.Module",
                              FACTORY_HINT)
    try:
        sig.bind(**cfg.kwargs)
    except TypeError as e:
        takes = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise ConfigError(f"model.kwargs: {cfg.factory} rejects {dict(cfg.kwargs)}: {e}",
                          f"it takes: {', '.join(takes) or 'no keyword arguments'}") from None


def _timm(cfg: ModelConfig) -> tuple[nn.Module, dict[str, Any], str]:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelError("model.source 'timm' needs the timm package", "pip install timm") from None
    assert cfg.name
    if not timm.is_model(cfg.name):
        raise ConfigError(f"model.name: unknown timm model {cfg.name!r}", suggest(cfg.name, timm.list_models()))
    model = timm.create_model(cfg.name, pretrained=False, **cfg.kwargs)
    dc = timm.data.resolve_data_config({}, model=model)
    _, h, w = dc["input_size"]
    crop_pct = float(dc.get("crop_pct") or 1.0)
    pre = {
        "resize": round(min(h, w) / crop_pct),
        "crop": (h, w),
        "mean": tuple(dc["mean"]),
        "std": tuple(dc["std"]),
        "interpolation": dc.get("interpolation", "bilinear"),
    }
    return model, pre, f"timm {cfg.name}"


def _other_weights(cfg: ModelConfig, model: nn.Module, desc: str) -> tuple[str, str]:
    """timm and factory models: a state-dict file, random weights (asked for), or the factory's
    own. Returns (description, where the weights came from)."""
    file = _state_file(cfg)
    if cfg.weights is not None and cfg.weights != RANDOM_WEIGHTS and file is None:
        raise ConfigError(
            f"model.weights: {cfg.weights!r} is a torchvision weights name; for source {cfg.source!r} give "
            f"a checkpoint path (model.checkpoint) or {RANDOM_WEIGHTS!r}"
        )
    if file is not None:
        apply_state_dict(model, load_state_dict(file[0], cfg.checkpoint_key, file[1]), file[0])
        return desc + f" ({file[0]})", f"{file[1]}: {file[0]}"
    if cfg.weights == RANDOM_WEIGHTS:
        return desc + " (random weights)", "random"
    if cfg.source == "timm":  # created with pretrained=False: nothing but random weights
        raise _no_weights(cfg)
    return desc, f"as {cfg.factory} returns them (no checkpoint)"


PREPROCESS_FIELDS = ("resize", "crop", "mean", "std", "interpolation")


def _preprocess_sources(cfg: PreprocessConfig, from_model: dict[str, Any], model_origin: str,
                        resolved: Preprocess) -> dict[str, str]:
    """Where each preprocessing value came from: the config, the model's weights (or timm's data
    config), ``assumed`` (xaicli's ImageNet fallback), or ``none`` (no crop)."""
    out = {}
    for key in PREPROCESS_FIELDS:
        if getattr(resolved, key) is None:
            out[key] = "none"
        elif getattr(cfg, key) is not None:
            out[key] = "config"
        elif from_model.get(key) is not None:
            out[key] = model_origin
        else:
            out[key] = "assumed"
    return out


def _size_text(v: int | tuple[int, ...] | None) -> str:
    return str(v) if isinstance(v, int) else "x".join(map(str, v or ()))


def _assumption_notes(labels: list[str] | None, pre: Preprocess, sources: dict[str, str]) -> list[str]:
    """What a run must say at its start because nothing told xaicli: no class names, ImageNet's
    preprocessing taken for want of any other."""
    notes = []
    if labels is None:
        notes.append("the model has no class names: classes are shown as 'class N' "
                     "(set model.labels to `imagenet` or a file with one name per line)")
    assumed = [k for k in ("resize", "crop", "mean", "std") if sources.get(k) == "assumed"]
    if assumed:
        values = {"resize": _size_text(pre.resize), "crop": _size_text(pre.crop), "mean": list(pre.mean),
                  "std": list(pre.std)}
        notes.append("preprocessing assumed (neither the config nor the weights give it): "
                     + ", ".join(f"{k} {values[k]}" for k in assumed)
                     + " (ImageNet's recipe; set `preprocess:` in the config if the model was trained otherwise)")
    return notes


def build_model(cfg: ModelConfig, preprocess: PreprocessConfig, architecture_only: bool = False) -> LoadedModel:
    """Build the model in eval mode on the CPU, with its labels and resolved preprocessing, and
    say where each came from (``sources``) and what had to be assumed (``notes``).
    ``architecture_only`` (listing layers and costs): torchvision weights that are not in the cache
    are left out, with a note, since names and shapes do not depend on them."""
    labels: list[str] | None = None
    pre: dict[str, Any] = {}
    if cfg.source == "torchvision":
        model, labels, pre, desc, origin = _torchvision(cfg, architecture_only)
        model_pre = "weights"
    else:
        if cfg.source == "factory":
            model, desc = _factory(cfg)
        else:
            model, pre, desc = _timm(cfg)
        desc, origin = _other_weights(cfg, model, desc)
        model_pre = "timm data config"
    labels_origin = "weights" if labels is not None else "none"
    if cfg.labels is not None:
        labels = load_labels(cfg.labels)
        labels_origin = f"model.labels: {cfg.labels}"
    model.eval()
    resolved = Preprocess.resolve(preprocess, pre)
    pre_sources = _preprocess_sources(preprocess, pre, model_pre, resolved)
    sources = {"weights": origin, "labels": labels_origin, "preprocess": pre_sources}
    if origin.startswith("not loaded: "):
        notes = [origin.removeprefix("not loaded: ") + "; the architecture alone is used (layer names, shapes "
                 "and costs do not depend on the weights)"]
    else:
        notes = _assumption_notes(labels, resolved, pre_sources) + _zero_head_note(model)
    return LoadedModel(model, labels, resolved, desc, sources, notes)


def _zero_head_note(model: nn.Module) -> list[str]:
    """A classifier (the last linear layer) with all-zero weights gives every image the same
    logits, so every gradient is zero: torchvision's ViT before training, or weights not loaded."""
    name, head = next(((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)),
                      ("", None))
    if head is None or bool(head.weight.detach().any()):
        return []
    return [f"the classifier `{name}` has all-zero weights (torchvision initialises a ViT's head to zero): every "
            "image gets the same logits, so gradient maps (Grad-CAM, Integrated Gradients, grad_rollout, ...) are "
            "zero; load trained weights"]


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's parameters and buffers (names, dtypes, shapes, values): two runs
    with the same digest explain the same weights (run.json's ``weights_digest``)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        data = t.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16 or data.is_quantized:
            data = data.float() if not data.is_quantized else data.dequantize()
        h.update(data.numpy().tobytes())
    return h.hexdigest()
