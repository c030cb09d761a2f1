"""The run: loader -> device -> one shared forward (+ backward) per batch -> methods -> maps put
back at each image's size -> overlays composed on the device -> files written by a thread pool
while the next batch computes -> scores.jsonl and run.json.

:class:`Explainer` is the in-memory core (tensors in, raw maps out), used by the folder run, the
benchmarks and the sanity checks; :func:`run_explain` wraps it with files, progress and errors.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__, shards
from .capture import record
from .config import SCHEMA_VERSION, Config, TargetConfig
from .data import ImageEntry, ImageFolder, collate, list_images, worker_init
from .errors import EXIT_OK, EXIT_PARTIAL, ConfigError, InputError, MethodError, OutputError, suggest
from .layers import LayerRef, auto_layer, resolve_layer
from .methods import MethodSpec, get_method
from .methods.batch import Batch, MethodOutput, PixelSpace, Runner, is_oom
from .metrics import MetricSpec, get_metric
from .metrics.ground_truth import GroundTruth, load_ground_truth
from .models import LoadedModel, build_model
from .outputs import (
    RUN,
    SCORES,
    ScoresFile,
    Writer,
    encode_image,
    encode_npy,
    read_scores,
    write_json,
)
from .render import colormap, draw_boxes, normalize, overlay, place, reduce_channels, to_input_size

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


class LogitsOnly(nn.Module):
    """Wraps a model whose forward returns a tuple, dict or object with ``.logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: Tensor) -> Tensor:
        return as_logits(self.inner(x))


def as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise MethodError(f"the model returned {type(out).__name__}; expected a logits tensor (B, classes)")


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
    batches: list[list[Batch]] = field(default_factory=list)  # per target rank, per method (for metrics)


def signed_mode(spec: MethodSpec, params: Any) -> str | None:
    """How a map is scaled for display and metrics: None (unsigned), or the method's ``render``."""
    if not spec.signed:
        return None
    return getattr(params, "render", "diverging")


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
    ) -> None:
        self.model = model
        self.pixels = pixels or PixelSpace()
        self.methods = methods
        self.layer = layer
        self.target = target
        self.runner = runner
        self.keep_batches = keep_batches
        self.need_layer = any(s.needs_layer for s, _ in methods)
        self.grad_of = {s.grad_of for s, _ in methods} - {"none"}
        if self.need_layer and layer is None:
            raise ConfigError("target_layer: the chosen methods need a target layer")

    def targets_for(self, logits: Tensor) -> Tensor:
        t = self.target
        b = logits.shape[0]
        if t.mode == "topk":
            return logits.topk(min(t.k, logits.shape[1]), dim=1).indices
        if t.mode == "index":
            assert t.index is not None
            return torch.full((b, 1), t.index, dtype=torch.long, device=logits.device)
        return logits.argmax(1, keepdim=True)

    def __call__(self, x: Tensor, seeds: Tensor | None = None) -> BatchResult:
        runner = self.runner
        need_grad = bool(self.grad_of)
        xin = runner.prepare(x.detach())
        if need_grad:
            # Gradients flow from the input even when the user's parameters are frozen.
            xin = xin.clone().requires_grad_(True)
        grad_ctx = torch.enable_grad() if need_grad else torch.inference_mode()
        with record(self.layer if self.need_layer else None) as rec, grad_ctx, runner.autocast():
            live = as_logits(self.model(xin))
        acts_live = rec.tensor() if self.need_layer else None
        logits = live.detach().float()
        targets = self.targets_for(logits)
        acts = acts_live.detach().float() if acts_live is not None else None
        k = targets.shape[1]
        results = [MethodResult(s, p, [], []) for s, p in self.methods]
        kept: list[list[Batch]] = []
        for j in range(k):
            t = targets[:, j].contiguous()
            grads = input_grad = None
            if need_grad:
                wrt: list[Tensor] = []
                if "layer" in self.grad_of:
                    assert acts_live is not None
                    if not acts_live.requires_grad:
                        raise MethodError(
                            f"target_layer {self.layer.spec if self.layer else '?'} is not connected to the logits "
                            "by differentiable operations",
                            "pick a layer before the classifier whose output feeds it",
                        )
                    wrt.append(acts_live)
                if "input" in self.grad_of:
                    wrt.append(xin)
                score = live.float().gather(1, t[:, None]).sum()
                gs = torch.autograd.grad(score, wrt, retain_graph=j < k - 1, allow_unused=True)
                gi = iter(gs)
                if "layer" in self.grad_of:
                    g = next(gi)
                    grads = torch.zeros_like(acts) if g is None else g.detach().float()  # type: ignore[arg-type]
                if "input" in self.grad_of:
                    g = next(gi)
                    input_grad = torch.zeros_like(x, dtype=torch.float32) if g is None else g.detach().float()
            batch = Batch(
                x=x.detach(), targets=t, logits=logits, runner=runner, layer=self.layer,
                activations=acts, gradients=grads, input_grad=input_grad, seeds=seeds, pixels=self.pixels,
            )
            row = []
            for res in results:
                out = res.spec.fn(batch, res.params)
                if isinstance(out, MethodOutput):
                    m, extras = out.map, out.extras
                else:
                    m, extras = out, {}
                reduce = getattr(res.params, "reduce", "max_abs" if not res.spec.signed else "sum")
                res.maps.append(reduce_channels(m.float(), reduce))
                res.extras.append(extras)
                row.append(batch)
            if self.keep_batches:
                kept.append(row)
        del live, acts_live
        return BatchResult(logits=logits, targets=targets, methods=results, batches=kept)


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

    def explainer(self, keep_batches: bool = False) -> Explainer:
        pre = self.loaded.preprocess
        return Explainer(self.model, self.methods, self.layer, self.target, self.runner, keep_batches,
                         pixels=PixelSpace(tuple(pre.mean), tuple(pre.std)))


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
    if target.mode == "topk" and target.k > n_classes:
        raise ConfigError(f"target: top{target.k} but the model has only {n_classes} classes")
    return target


def setup(cfg: Config, device: torch.device | None = None) -> Setup:
    """Model, layer, target and methods resolved and checked with one dummy forward."""
    device = device or select_device(cfg.runtime.device)
    torch.manual_seed(cfg.runtime.seed)
    methods = [(get_method(n), cfg.method_params(n)) for n in cfg.method]
    from .config import build_dataclass

    metrics = [
        (spec, build_dataclass(spec.params, cfg.metrics[name] or {}, f"metrics.{name}"))
        for name in cfg.metrics
        for spec in [get_metric(name)]
    ]
    ground_truth = load_ground_truth(cfg.ground_truth.masks, cfg.ground_truth.boxes)
    needs_gt = [s.name for s, _ in metrics if s.ground_truth]
    if needs_gt and ground_truth is None:
        raise ConfigError(
            f"metrics: {', '.join(needs_gt)} need ground truth",
            "add `ground_truth: {masks: DIR}` (or `{boxes: FILE}`) to the config, or --ground-truth PATH",
        )
    loaded = build_model(cfg.model, cfg.preprocess)
    # Knobs that name files (e.g. an Integrated Gradients baseline image) are read here, once.
    methods = [(s, p.prepare(loaded.preprocess) if hasattr(p, "prepare") else p) for s, p in methods]
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
    layer_shape = tuple(rec.tensor().shape[1:]) if layer is not None else None
    if loaded.labels is not None and len(loaded.labels) != n_classes:
        raise ConfigError(
            f"model.labels: {len(loaded.labels)} class names but the model outputs {n_classes} classes",
            "give a labels file with one name per output",
        )
    target = resolve_target(cfg.target, loaded.labels, n_classes)
    runner = Runner(
        model=model,
        budget=cfg.runtime.batch_size,
        autocast=autocast_factory(device, cfg.runtime.precision),
        memory_format=memory_format,
        precision=cfg.runtime.precision,
    )
    st = Setup(cfg, device, loaded, model, layer, layer_shape, n_classes, target, methods, metrics, runner,
               ground_truth)
    _dry_run(st)
    return st


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


# --------------------------------------------------------------------------------------------
# The folder run


class ProgressHook(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class _NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class RunResult:
    out: Path
    total: int
    ok: int
    failed: int
    skipped: int
    ignored: int
    exit_code: int
    run: dict[str, Any]
    merged: shards.MergeResult | None = None  # set when this process merged the parts
    pending: list[str] = field(default_factory=list)  # parts of this layout still running


def image_seed(rel: str, seed: int) -> int:
    """A per-image seed from the run seed and the image's path: stable across batching and resume."""
    h = hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def output_names(entries: list[ImageEntry]) -> dict[str, str]:
    """rel path -> output stem path (without method suffix). ``a.jpg`` and ``a.png`` in one folder
    would collide on the stem, so those keep their extension."""
    stems: dict[str, int] = {}
    for e in entries:
        key = str(Path(e.rel).with_suffix(""))
        stems[key] = stems.get(key, 0) + 1
    out = {}
    for e in entries:
        key = str(Path(e.rel).with_suffix(""))
        out[e.rel] = e.rel if stems[key] > 1 else key
    return out


def _versions() -> dict[str, str]:
    import PIL
    import torchvision

    v = {
        "xaicli": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }
    try:
        import cv2

        v["opencv"] = cv2.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
    return v


def _prepare_out(out: Path, input_path: Path, resume: bool, overwrite: bool,
                 part: shards.Part | None = None, clear: bool = True) -> None:
    """Create --out; refuse to mix with an earlier run unless --resume or --overwrite is given.
    The input is never modified: --out may not be the input folder or lie above it. A part looks
    only at the merged files and its own part files (the other parts may be running); ``clear``
    False leaves the deleting of --overwrite to rank 0."""
    inp = input_path.resolve()
    o = out.resolve()
    if o == inp or o in inp.parents:
        raise OutputError(
            f"--out {out} contains the input {input_path}", "write results to a folder beside or inside the input"
        )
    if o.exists() and not o.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    existing = (o / SCORES).exists() or (o / RUN).exists()
    if part is not None:
        existing = existing or part.scores_path(o).exists() or part.run_path(o).exists()
    if existing and not (resume or overwrite):
        raise OutputError(
            f"--out {out} already holds a run (scores.jsonl / run.json)",
            "add --resume to continue it, --overwrite to replace it, or choose another folder",
        )
    try:
        o.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    if overwrite and not resume and clear:
        for name in (SCORES, RUN):
            (o / name).unlink(missing_ok=True)
        for sub in ("overlays", "maps", shards.PARTS):
            if (o / sub).is_dir():
                shutil.rmtree(o / sub)


def _done_images(out: Path) -> dict[str, dict[str, Any]]:
    """Records of images already complete in ``out`` (scores.jsonl and any part): status ok and
    every listed file present."""
    return shards.done_images(out)


def run_explain(
    cfg: Config,
    input_path: Path,
    out: Path,
    *,
    progress: ProgressHook | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    argv: list[str] | None = None,
) -> RunResult:
    """Explain every image under ``input_path`` into ``out``. Bad images become error records.

    Under torchrun (WORLD_SIZE > 1) and/or with ``shard``, this process runs one part of the
    sorted list and writes its own part files; the parts are merged at the end (see shards.py).
    """
    progress = progress or _NoProgress()
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    dist = shards.dist_env()
    part = shards.part_for(shard, dist)
    if overwrite and shard is not None:
        raise ConfigError(
            "--overwrite with --shard: each shard would delete the results of the others",
            "delete the --out folder before launching the shards, or use --resume",
        )
    listed = list_images(input_path, exclude=out)
    entries = listed.entries
    if part is not None:
        entries = entries[part.index :: part.count]
    if not listed.entries:
        raise InputError(
            f"no images in {input_path}"
            + (f" ({listed.ignored} other files ignored)" if listed.ignored else ""),
            "supported: " + ", ".join(sorted(e.lstrip(".") for e in ("jpg", "png", "bmp", "gif", "tif", "webp"))),
        )
    group = shards.Group(dist) if dist is not None else None
    try:
        _prepare_out(out, input_path, resume, overwrite, part, clear=group is None or group.is_main)
        if group is not None:
            group.barrier()  # rank 0 has cleared an --overwrite before anyone writes
        return _run_part(cfg, input_path, out, listed, entries, part, dist, group, progress, resume,
                         shard, argv, t0, started)
    finally:
        if group is not None:
            group.close()


def _run_part(
    cfg: Config,
    input_path: Path,
    out: Path,
    listed: Any,
    entries: list[ImageEntry],
    part: shards.Part | None,
    dist: shards.DistEnv | None,
    group: shards.Group | None,
    progress: ProgressHook,
    resume: bool,
    shard: tuple[int, int] | None,
    argv: list[str] | None,
    t0: float,
    started: str,
) -> RunResult:
    device = select_device(cfg.runtime.device)
    if dist is not None and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    st = setup(cfg, device)
    load_s = time.perf_counter() - t0

    done = _done_images(out) if resume else {}
    todo = [e for e in entries if e.rel not in done]
    skipped = len(entries) - len(todo)
    names = output_names(listed.entries)
    loaded = st.loaded
    pre = loaded.preprocess
    device = st.device
    o = cfg.output
    lut = colormap(o.colormap, device)
    dlut = colormap(o.diverging_colormap, device)
    explainer = st.explainer(keep_batches=bool(st.metrics))

    failures: list[dict[str, Any]] = []
    counts = {"ok": 0, "failed": 0}
    count_lock = threading.Lock()

    def on_done(rec: dict[str, Any]) -> None:  # called from the writer threads
        with count_lock:
            if rec["status"] == "ok":
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                failures.append({"path": rec["path"], "error": rec["error"]})

    scores = ScoresFile(part.scores_path(out) if part is not None else out / SCORES)
    threads = max(2, min(8, (os.cpu_count() or 2)))
    writer = Writer(scores, threads=threads, max_pending=4 * cfg.runtime.batch_size, on_done=on_done)
    dataset = ImageFolder(todo, pre)
    workers = cfg.runtime.workers if len(todo) > 1 else 0
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.runtime.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress.start(len(todo), f"{'+'.join(cfg.method)} on {len(todo)} images")
    chunk = cfg.runtime.batch_size  # lowered for the rest of the run after an out-of-memory split
    t_run = time.perf_counter()
    try:
        for batch in loader:
            for err in batch["errors"]:
                writer.submit({"path": err["rel"], "status": "error", "error": err["error"]}, [])
            if batch["x"] is not None:
                n = batch["x"].shape[0]
                start = 0
                while start < n:
                    sl = slice(start, min(n, start + chunk))
                    try:
                        _explain_and_write(st, explainer, batch, sl, names, out, lut, dlut, writer)
                    except Exception as e:
                        if is_oom(e) and chunk > 1:
                            chunk = max(1, (sl.stop - sl.start) // 2)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        if isinstance(e, (ConfigError, MethodError)):
                            raise
                        # An unexpected failure on these images: record it, keep the run going.
                        msg = f"{type(e).__name__}: {e}"
                        for rel in batch["rels"][sl]:
                            writer.submit({"path": rel, "status": "error",
                                           "error": {"type": "explain", "message": msg}}, [])
                    start = sl.stop
            progress.advance(len(batch["errors"]) + len(batch["rels"]))
    finally:
        writer.close()
        scores.close()
        progress.finish()
    run_s = time.perf_counter() - t_run
    records = read_scores(scores.path) if part is not None else shards.finalize_unsharded(out)
    total_ok = counts["ok"] + skipped
    exit_code = EXIT_OK if counts["failed"] == 0 else EXIT_PARTIAL
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    run = {
        "schema_version": SCHEMA_VERSION,
        "command": argv,
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(input_path),
        "output": str(out),
        "config": cfg.to_dict(),
        "model": loaded.description,
        "n_classes": st.n_classes,
        "layer": st.layer.spec if st.layer else None,
        "layer_shape": list(st.layer_shape) if st.layer_shape else None,
        "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": pre.mean, "std": pre.std,
                       "interpolation": pre.interpolation, "input_size": list(pre.input_size)},
        "target": st.target.describe(),
        "methods": [
            {"name": s.name, "params": _params_dict(p),
             "passes": s.cost_text(p, st.layer_shape[0] if st.layer_shape else None)}
            for s, p in st.methods
        ],
        "metrics": [{"name": s.name, "params": _params_dict(p)} for s, p in st.metrics],
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
        "precision": cfg.runtime.precision,
        "versions": _versions(),
        "counts": {"listed": len(listed.entries), "shard": len(entries), "processed": len(todo),
                   "ok": total_ok, "failed": counts["failed"], "skipped_done": skipped,
                   "ignored_files": listed.ignored},
        "shard": list(shard) if shard else None,
        "part": None if part is None else {"label": part.label, "index": part.index, "count": part.count,
                                           "rank": dist.rank if dist else None,
                                           "world_size": dist.world if dist else None},
        "host": shards.host(),
        "timings": {"load_s": round(load_s, 3), "run_s": round(run_s, 3),
                    "images_per_s": round(len(todo) / run_s, 3) if run_s > 0 else None},
        "peak_gpu_memory_mb": round(peak, 1) if peak is not None else None,
        "failures": sorted(failures, key=lambda f: f["path"]),
        "exit_code": exit_code,
    }
    from .metrics.summary import aggregate

    run["aggregates"] = aggregate(records, run["metrics"])
    result = RunResult(out, len(entries), total_ok, counts["failed"], skipped, listed.ignored, exit_code, run)
    if part is None:
        write_json(out / RUN, run)
        return result
    write_json(part.run_path(out), run)
    return _merge_parts(out, part, group, result)


def _merge_parts(out: Path, part: shards.Part, group: shards.Group | None, result: RunResult) -> RunResult:
    """After a part: under torchrun rank 0 merges once every rank is done and all ranks return
    the merged exit code; alone, the last part of the layout to finish merges."""
    merged: shards.MergeResult | None
    if group is not None:
        group.barrier()
        merged, pending = None, []
        if group.is_main:
            merged, pending = shards.merge_if_complete(out, part)
        code = group.broadcast(merged.exit_code if merged is not None else result.exit_code)
    else:
        merged, pending = shards.merge_if_complete(out, part)
        code = merged.exit_code if merged is not None else result.exit_code
    result.pending = [p.label for p in pending]
    if merged is not None:
        result.merged = merged
        result.run = merged.run
    result.exit_code = code
    return result


def _params_dict(p: Any) -> dict[str, Any]:
    import dataclasses

    if not dataclasses.is_dataclass(p):
        return {}
    return {k: v for k, v in dataclasses.asdict(p).items() if not isinstance(v, Tensor)}  # no loaded tensors


def _explain_and_write(
    st: Setup,
    explainer: Explainer,
    batch: dict[str, Any],
    sl: slice,
    names: dict[str, str],
    out: Path,
    lut: Tensor,
    dlut: Tensor,
    writer: Writer,
) -> None:
    """One (sub-)batch: compute on the device, render on the device, hand files to the writer."""
    device = st.device
    cfg = st.cfg
    o = cfg.output
    pre = st.loaded.preprocess
    rels: list[str] = batch["rels"][sl]
    x = batch["x"][sl].to(device, non_blocking=True)
    seeds = torch.tensor([image_seed(r, cfg.runtime.seed) for r in rels], dtype=torch.long)
    res = explainer(x, seeds)

    probs = res.logits.softmax(1)
    k_top = min(o.topk, probs.shape[1])
    top_p, top_i = probs.topk(k_top, dim=1)
    tgt = res.targets
    tgt_p = probs.gather(1, tgt)
    ranks = (probs[:, None, :] > tgt_p[:, :, None]).sum(2) + 1  # (B, K)
    host = {k: v.cpu() for k, v in {"top_p": top_p, "top_i": top_i, "tgt": tgt, "tgt_p": tgt_p, "ranks": ranks}.items()}

    images = [im.to(device, non_blocking=True) for im in batch["images"][sl]]
    b = len(rels)
    ctx = None
    if any(ms.context for ms, _ in st.metrics):
        from .metrics.context import build_context

        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        ctx = build_context(rels, sizes, pre, st.ground_truth, device)
    # Metrics whose `draw` knob is on put their boxes on the overlays.
    draw = any(getattr(mp, "draw", False) for _, mp in st.metrics)
    # Per method and target rank: stats, normalised map, metrics.
    per_entry: list[list[dict[str, Any]]] = [[] for _ in range(b)]
    jobs: list[list[Any]] = [[] for _ in range(b)]
    input_size = pre.input_size
    for mi, mres in enumerate(res.methods):
        spec, params = mres.spec, mres.params
        mode = signed_mode(spec, params)
        for j, raw in enumerate(mres.maps):
            stats = torch.stack([raw.flatten(1).amin(1), raw.flatten(1).amax(1), raw.flatten(1).mean(1)], 1).cpu()
            norm = normalize(raw, mode)  # (B, h, w)
            metric_vals: dict[str, Tensor] = {}
            if st.metrics:
                mb = res.batches[j][mi]
                metric_map = normalize(raw, None if mode is None else ("positive" if mode == "diverging" else mode))
                metric_map = to_input_size(metric_map, input_size)
                for mspec, mparams in st.metrics:
                    margs = (mb, metric_map, mparams, ctx) if mspec.context else (mb, metric_map, mparams)
                    for key, val in mspec.fn(*margs).items():
                        metric_vals[key] = val.detach().float().cpu()
            extras = {k: v.detach().float().cpu() for k, v in mres.extras[j].items()}
            suffix = f".{spec.name}" + (f".top{j + 1}" if st.target.mode == "topk" else "")
            peaks = []
            for i in range(b):
                img = images[i]
                hgt, wid = int(img.shape[1]), int(img.shape[2])
                window = pre.window(hgt, wid)
                placed, mask = place(norm[i], hgt, wid, window)
                peaks.append(placed.abs().flatten().argmax() if mode == "diverging" else placed.flatten().argmax())
                stem = names[rels[i]]
                files: dict[str, str | None] = {"overlay": None, "map": None}
                if o.overlays:
                    ov = overlay(img, placed, dlut if mode == "diverging" else lut, o.alpha,
                                 signed=mode == "diverging", mask=mask)
                    if draw and "boxes" in metric_vals:
                        ov = draw_boxes(ov, metric_vals["boxes"][i].reshape(-1, 4))
                    # No sync per image: the copy is queued (into pinned memory on CUDA) and the
                    # batch synchronises once before the files are handed to the writer.
                    ov = ov.to("cpu", non_blocking=device.type == "cuda").numpy()
                    rel_ov = f"overlays/{stem}{suffix}.{o.format}"
                    files["overlay"] = rel_ov
                    jobs[i].append((out / rel_ov, partial(encode_image, ov, o.format, o.jpeg_quality)))
                if o.save_maps:
                    raw_placed, _ = place(raw[i], hgt, wid, window)
                    arr = raw_placed.cpu().numpy()
                    peak = float(np.abs(arr).max()) if arr.size else 0.0
                    arr = arr.astype(np.float16) if 1e-3 <= peak <= 6e4 or peak == 0 else arr.astype(np.float32)
                    rel_map = f"maps/{stem}{suffix}.npy"
                    files["map"] = rel_map
                    jobs[i].append((out / rel_map, partial(encode_npy, arr)))
                t_idx = int(host["tgt"][i, j])
                entry: dict[str, Any] = {
                    "method": spec.name,
                    "layer": st.layer.spec if (st.layer is not None and spec.needs_layer) else None,
                    "target": {"index": t_idx, "label": st.loaded.label(t_idx),
                               "prob": round(float(host["tgt_p"][i, j]), 6), "rank": int(host["ranks"][i, j])},
                    "map": {"shape": list(raw.shape[1:]), "min": float(stats[i, 0]), "max": float(stats[i, 1]),
                            "mean": float(stats[i, 2])},
                    "files": files,
                }
                for key, val in extras.items():
                    entry[key] = _scalar(val[i])
                if metric_vals:
                    entry["metrics"] = {key: _scalar(val[i]) for key, val in metric_vals.items()}
                per_entry[i].append(entry)
            peak_idx = torch.stack(peaks).cpu().tolist()
            for i in range(b):
                wid = int(images[i].shape[2])
                per_entry[i][-1]["map"]["peak"] = [int(peak_idx[i] % wid), int(peak_idx[i] // wid)]

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the queued overlay copies have landed
    for i in range(b):
        rec = {
            "path": rels[i],
            "status": "ok",
            "error": None,
            "width": int(images[i].shape[2]),
            "height": int(images[i].shape[1]),
            "topk": [
                {"index": int(host["top_i"][i, r]), "label": st.loaded.label(int(host["top_i"][i, r])),
                 "prob": round(float(host["top_p"][i, r]), 6)}
                for r in range(k_top)
            ],
            "explanations": per_entry[i],
        }
        writer.submit(rec, jobs[i])


def _scalar(v: Tensor) -> Any:
    """A per-image value for JSON: a number, or nested lists for (N,) / (N, 4) values. Non-finite
    numbers become null, and so does a list holding nothing but nulls (e.g. no box, no ground truth)."""
    return _json_ready(v.tolist())


def _json_ready(v: Any) -> Any:
    if isinstance(v, list):
        items = [_json_ready(a) for a in v]
        return None if items and all(a is None for a in items) else items
    f = float(v)
    return f if np.isfinite(f) else None
