"""The in-memory core: tensors in, raw maps out. The device and precision of a run, the model
set up and checked once (:func:`setup`), and :class:`Explainer`: one shared forward (+ backward)
per batch on the device, then every method. Used by the folder run (xaicli/run.py), the Python
API, the benchmarks and the sanity test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .capture import LogitsOnly, as_logits, forward, record
from .config import Config, TargetConfig
from .errors import ConfigError, MethodError, suggest
from .heads import AcolHead, ComplementaryBranch, acol_model, fuse_maps
from .layers import LayerRef, auto_layer, detect_layout, resolve_layer
from .methods import MethodSpec
from .methods.batch import Batch, MethodOutput, PixelSpace, Runner
from .metrics import MetricSpec
from .metrics.ground_truth import GroundTruth, load_ground_truth
from .models import LoadedModel, build_model
from .plan import Plan, prepare, resolve_plan
from .render import reduce_channels
from .targets import ImageTargets, load_image_targets

# --------------------------------------------------------------------------------------------
# Device and precision


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' requested but no CUDA device is available", "use --device cpu or auto")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("runtime.device: 'mps' requested but MPS is not available", "use --device cpu or auto")
    return torch.device(name)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[object]]:
    """Precision as a context factory chosen once: fp32 is a no-op, bf16/fp16 autocast the forward.
    Maps are always computed in fp32 from the captured tensors."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("runtime.precision: fp16 autocast needs a GPU", "use bf16 or fp32 on the CPU")
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The in-memory core


@dataclass
class MethodResult:
    spec: MethodSpec
    params: Any
    maps: list[Tensor]  # one (B, h, w) float32 raw map per target rank
    extras: list[dict[str, Tensor]]  # per target rank: name -> (B,)


@dataclass
class BatchResult:
    logits: Tensor  # (B, N) float32
    targets: Tensor  # (B, K)
    methods: list[MethodResult]
    batches: list[Batch] = field(default_factory=list)  # per target rank, what the methods saw (for metrics)


def targets_of(target: TargetConfig, logits: Tensor) -> Tensor:
    """The classes (B, K) a run-wide target rule explains for a batch's logits (B, N): the
    prediction, a fixed class (already an index, see :func:`resolve_target`) or the top k."""
    b = logits.shape[0]
    if target.per_image:
        raise ConfigError(f"target: {target.describe()} gives a class per image file; pass the classes as targets=")
    if target.mode == "topk":
        return logits.topk(min(target.k, logits.shape[1]), dim=1).indices
    if target.mode == "index":
        assert target.index is not None
        return torch.full((b, 1), target.index, dtype=torch.long, device=logits.device)
    if target.mode == "name":
        raise ConfigError(f"target: class name {target.name!r} not resolved to an index (engine.resolve_target)")
    return logits.argmax(1, keepdim=True)


class Explainer:
    """Tensors in, raw maps out: the shared pass and every method for one batch, on the device."""

    def __init__(
        self,
        model: nn.Module,
        methods: list[tuple[MethodSpec, Any]],
        layer: LayerRef | None,
        target: TargetConfig,
        runner: Runner,
        keep_batches: bool = False,
        pixels: PixelSpace | None = None,
        on_method: Callable[[str], None] | None = None,
    ) -> None:
        self.on_method = on_method  # told each method's name as it starts on a batch (progress)
        self.model = model
        self.pixels = pixels or PixelSpace()
        self.methods = methods
        self.layer = layer
        self.target = target
        self.runner = runner
        self.keep_batches = keep_batches
        self.need_layer = any(s.needs_layer for s, _ in methods)
        self.grad_of = {s.grad_of for s, _ in methods} - {"none"}
        self.checks = True  # the methods' host-side consistency checks on every batch (see Batch.checks)
        if self.need_layer and layer is None:
            raise ConfigError("target_layer: the chosen methods need a target layer")
        # An ACoL model read at its features: CAM-family maps fuse both branches (xaicli/heads.py).
        self.acol = acol_model(model, layer) if any(s.family == "cam" for s, _ in methods) else None
        self.branch_b = dataclasses.replace(runner, model=ComplementaryBranch(self.acol)) if self.acol else None

    def targets_for(self, logits: Tensor) -> Tensor:
        return targets_of(self.target, logits)

    def __call__(self, x: Tensor, seeds: Tensor | None = None,
                 targets: Tensor | Callable[[Tensor], Tensor] | None = None) -> BatchResult:
        """Every method's raw maps for the batch ``x``. ``targets``: the classes to explain, (B,)
        or (B, K) for K target ranks, or a function of the logits (B, N) giving them (e.g. the
        prediction beside a known class); None: as the Explainer's target says (the prediction,
        a fixed class or the top-k)."""
        cap = forward(self.model, self.runner.prepare(x), self.layer if self.need_layer else None,
                      frozenset(self.grad_of), self.runner.autocast)
        if callable(targets):
            targets = targets(cap.logits.detach())
        if targets is None:
            targets = self.targets_for(cap.logits)
        elif targets.dim() == 1:
            targets = targets[:, None]
        targets = targets.to(cap.logits.device)
        k = targets.shape[1]
        results = [MethodResult(s, p, [], []) for s, p in self.methods]
        kept: list[Batch] = []
        try:
            for j in range(k):
                t = targets[:, j].contiguous()
                grads, input_grad = cap.gradients(t, retain=j < k - 1)
                batch = Batch(
                    x=x.detach(), targets=t, logits=cap.logits, runner=self.runner, layer=self.layer,
                    activations=cap.activations, gradients=grads, input_grad=input_grad, seeds=seeds,
                    pixels=self.pixels, checks=self.checks,
                )
                second = self._complementary(batch) if self.acol is not None else None
                for res in results:
                    if self.on_method is not None:
                        self.on_method(res.spec.name)
                    self._dispatch(res, batch, second)
                if self.keep_batches:
                    kept.append(batch)
        finally:
            cap.release()
        return BatchResult(logits=cap.logits, targets=targets, methods=results, batches=kept)

    def _complementary(self, batch: Batch) -> Batch:
        """What a CAM-family method sees of an ACoL model's branch B for the batch's targets: the
        features erased by branch A's map of the target, their gradient, branch B's logits, and a
        runner whose passes give branch B's logits."""
        assert self.acol is not None and batch.activations is not None
        head = self.acol.head
        assert isinstance(head, AcolHead)
        erased, grads, logits = head.complementary(batch.activations, batch.targets, batch.gradients is not None)
        return dataclasses.replace(batch, activations=erased, gradients=grads, input_grad=None, logits=logits,
                                   runner=self.branch_b)

    @staticmethod
    def _dispatch(res: MethodResult, batch: Batch, second: Batch | None = None) -> None:
        """One method on the batch; on an ACoL model (``second``: branch B's batch) a CAM-family
        map is fused with the same method's map on branch B."""
        out = res.spec.fn(batch, res.params)
        m, extras = (out.map, out.extras) if isinstance(out, MethodOutput) else (out, {})
        if second is not None and res.spec.family == "cam":
            out_b = res.spec.fn(second, res.params)
            m = fuse_maps(m, out_b.map if isinstance(out_b, MethodOutput) else out_b)
        _, reduce = res.spec.display(res.params)
        res.maps.append(reduce_channels(m.float(), reduce))  # pixel maps (B, C, H, W): the one reduction
        res.extras.append(extras)


# --------------------------------------------------------------------------------------------
# Setting up a run


@dataclass
class Setup:
    cfg: Config
    device: torch.device
    loaded: LoadedModel
    model: nn.Module
    layer: LayerRef | None
    layer_shape: tuple[int, ...] | None
    n_classes: int
    target: TargetConfig
    methods: list[tuple[MethodSpec, Any]]
    metrics: list[tuple[MetricSpec, Any]]
    runner: Runner
    ground_truth: GroundTruth | None = None  # for the localization metrics
    image_targets: ImageTargets | None = None  # target: a file or folder of per-image classes
    layer_auto: bool = False  # the layer was chosen automatically (target_layer omitted or auto)

    @property
    def warnings(self) -> list[str]:
        """What the user should know before trusting the maps: random weights asked for with
        ``null``, class names or preprocessing that had to be assumed (printed at the start of a run)."""
        return [*self.cfg.warnings, *self.loaded.notes]

    def explainer(self, keep_batches: bool = False, on_method: Callable[[str], None] | None = None) -> Explainer:
        """The Explainer of the run. Setup's dry run did the methods' host-side checks once, so
        batches skip them (no sync per batch for them on a GPU)."""
        pre = self.loaded.preprocess
        explainer = Explainer(self.model, self.methods, self.layer, self.target, self.runner, keep_batches,
                              pixels=PixelSpace(tuple(pre.mean), tuple(pre.std)), on_method=on_method)
        explainer.checks = False
        return explainer

    @property
    def target_ranks(self) -> int:
        """Maps per image and method: k for top-k targets, 2 for the prediction beside a per-image class."""
        if self.target.mode == "topk":
            return min(self.target.k, self.n_classes)
        return 2 if self.target.also_predicted else 1


def resolve_target(target: TargetConfig, labels: list[str] | None, n_classes: int) -> TargetConfig:
    """Class names to indices (close matches on error); indices checked against the model."""
    if target.mode == "name":
        assert target.name is not None
        if labels is None:
            raise ConfigError(
                f"target: class name {target.name!r} given but the model has no class names",
                "set model.labels or give a class index",
            )
        lower = {lab.lower(): i for i, lab in enumerate(labels)}
        idx = lower.get(target.name.lower())
        if idx is None:
            raise ConfigError(f"target: unknown class name {target.name!r}", suggest(target.name, labels))
        return TargetConfig(mode="index", index=idx)
    if target.mode == "index":
        assert target.index is not None
        if target.index >= n_classes:
            raise ConfigError(f"target: class index {target.index} out of range (the model has {n_classes} classes)")
    if target.per_image:
        return target  # each image's class is checked against the model by targets.load_image_targets
    if target.mode == "topk" and target.k > n_classes:
        raise ConfigError(f"target: top{target.k} but the model has only {n_classes} classes")
    return target


def setup(cfg: Config | Plan, device: torch.device | None = None, architecture_only: bool = False) -> Setup:
    """Model, layer, target and methods resolved and checked with one dummy forward. Takes a
    config or its already resolved plan. ``architecture_only``: see :func:`models.build_model`."""
    plan = cfg if isinstance(cfg, Plan) else resolve_plan(cfg)
    cfg = plan.cfg
    if cfg.head is not None:
        raise ConfigError("head: is read by `xai train`, which puts the head on the backbone and trains it",
                          "explain the trained model with the config it writes: --config RUN/config.yaml")
    device = device or select_device(cfg.runtime.device)
    torch.manual_seed(cfg.runtime.seed)
    metrics = list(plan.metrics)
    ground_truth = load_ground_truth(cfg.ground_truth.masks, cfg.ground_truth.boxes)
    needs_gt = [s.name for s, _ in metrics if s.ground_truth]
    if needs_gt and ground_truth is None:
        raise ConfigError(
            f"metrics: {', '.join(needs_gt)} need ground truth",
            "add `ground_truth: {masks: DIR}` (or `{boxes: FILE}`) to the config, or --ground-truth PATH",
        )
    loaded = build_model(cfg.model, cfg.preprocess, architecture_only)
    methods = list(prepare(plan, loaded.preprocess).methods)  # knobs that name files are read here, once
    model = loaded.module.to(device).eval()
    memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    h, w = loaded.preprocess.input_size
    need_layer = any(s.needs_layer for s, _ in methods)
    layer = None
    if need_layer:
        layer = resolve_layer(model, cfg.target_layer) if cfg.target_layer else auto_layer(model, (h, w), device)
    with record(layer) as rec, torch.inference_mode():
        out = model(torch.zeros(1, 3, h, w, device=device))
    if not isinstance(out, Tensor):
        model = LogitsOnly(model)
        out = as_logits(out)
    if out.dim() != 2:
        raise MethodError(f"the model's output has shape {tuple(out.shape)}; xaicli explains classifiers (B, classes)")
    n_classes = int(out.shape[1])
    layer_shape = None
    if layer is not None:
        layer, layer_shape = _with_layout(layer, tuple(rec.tensor().shape), (h, w), cfg)
    if loaded.labels is not None and len(loaded.labels) != n_classes:
        raise ConfigError(
            f"model.labels: {len(loaded.labels)} class names but the model outputs {n_classes} classes",
            "give a labels file with one name per output",
        )
    target = resolve_target(cfg.target, loaded.labels, n_classes)
    image_targets = load_image_targets(target, loaded.labels, n_classes)
    runner = Runner(
        model=model,
        budget=cfg.runtime.batch_size,
        autocast=autocast_factory(device, cfg.runtime.precision),
        memory_format=memory_format,
        precision=cfg.runtime.precision,
    )
    st = Setup(cfg, device, loaded, model, layer, layer_shape, n_classes, target, methods, metrics, runner,
               ground_truth, image_targets, layer_auto=layer is not None and not cfg.target_layer)
    _dry_run(st)
    return st


def _with_layout(layer: LayerRef, shape: tuple[int, ...], size: tuple[int, int],
                 cfg: Config) -> tuple[LayerRef, tuple[int, ...]]:
    """The layer with its layout found once from the dummy forward's ``shape`` (or as the config
    says), and the (C, h, w) shape the methods will see."""
    layout = detect_layout(shape, size, cfg.layer_layout, cfg.prefix_tokens)
    if layout is None:
        return layer, shape[1:]
    return dataclasses.replace(layer, layout=layout), layout.spatial_shape(shape[1:])


def _dry_run(st: Setup) -> None:
    """Run the cheap methods once on a blank image, so a method that cannot work on this model
    (CAM without a GAP + linear head, a non-spatial layer) fails before any output is written."""
    channels = st.layer_shape[0] if st.layer_shape else None
    cheap = [(s, p) for s, p in st.methods if isinstance(f := s.cost(p, channels)[0], int) and f <= 4]
    if not cheap:
        return
    h, w = st.loaded.preprocess.input_size
    x = torch.zeros(1, 3, h, w, device=st.device)
    Explainer(st.model, cheap, st.layer, TargetConfig(), st.runner)(x, torch.zeros(1, dtype=torch.long))
