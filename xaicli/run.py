"""The folder run behind `xai explain`: the images under a folder, loaded by worker processes,
explained batch by batch on the device (:class:`xaicli.engine.Explainer`), scored, rendered on the
device, written by a thread pool while the next batch computes; then the run finishes once.

The path of one image: ``data.list_images`` -> this process's share (``shards.Layout``) -> resume
filter -> ``data.ImageFolder`` (decode + preprocess in a loader worker) -> ``LoadedBatch`` ->
sub-batches split on out-of-memory -> ``_explain_batch``: the shared forward/backward and every
method (``Explainer``), the metrics, the overlays (``render.compose``), the record
(``records.image_record``) -> ``outputs.Writer`` (files first, then the scores line) -> at the end
``Layout.seal`` (sorted scores.jsonl) and ``Layout.finish`` (run.json; the merge of a sharded run)
-> :func:`finish_run` when the whole run is on disk.
"""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from . import records
from .config import Config, TargetConfig
from .data import ImageEntry, ImageFolder, ListedImages, LoadedBatch, collate, list_images, worker_init
from .engine import BatchResult, MethodResult, Setup, select_device, setup
from .errors import EXIT_OK, EXIT_PARTIAL, ConfigError, InputError, MethodError
from .methods.batch import Batch, is_oom, split_on_oom, stable_seed
from .metrics.context import MetricContext
from .metrics.ground_truth import build_context
from .outputs import ScoresFile, Writer, encode_image, encode_npy, map_file, overlay_file, prepare_out_dir
from .plan import Plan, resolve_plan
from .render import Palette, compose, normalize, place, to_input_size
from .shards import Layout, MergeResult, merge_parts

# --------------------------------------------------------------------------------------------
# What a run is asked to do, and what it reports


@dataclass(frozen=True)
class RunRequest:
    cfg: Config
    input_path: Path
    out: Path
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    argv: list[str] | None = None


class ProgressHook(Protocol):
    """What a run tells its display (xaicli/progress.py). Besides these, the run calls the
    following when the object has them, for progress inside a batch: ``plan(steps, ranks)`` once
    (method, runner passes per image and target or None, exact?), ``batch(size)`` as a batch
    starts, ``method(name)`` as a method starts on it, ``passes(n)`` after each chunk of inputs
    the engine's Runner sends through the model."""

    def warn(self, message: str) -> None: ...
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class _NoProgress:
    def warn(self, message: str) -> None:
        pass

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _hook(progress: Any, name: str) -> Callable[..., None]:
    """An optional hook of ``progress`` (see ProgressHook), or one that does nothing."""
    fn = getattr(progress, name, None)
    return fn if callable(fn) else (lambda *args: None)


_QUOTED = re.compile(r"^(\d+) \((\d+)[×x](\d+) input\)$")


def _passes_per_image(spec: Any, params: Any, channels: int | None, size: tuple[int, int]) -> tuple[int | None, bool]:
    """Passes a method sends through the Runner per image and target (its forwards less the shared
    one), and whether that is exact. A count the registry quotes for another input size (occlusion's
    windows) is scaled by the input's area, an estimate the display replaces by what the first
    batch took."""
    forwards = spec.cost(params, channels)[0]
    if isinstance(forwards, int):
        return max(0, forwards - 1), True
    m = _QUOTED.match(str(forwards))
    if m is None:
        return None, False
    n, qh, qw = (int(g) for g in m.groups())
    return max(0, round((n - 1) * size[0] * size[1] / (qh * qw))), False


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
    merged: MergeResult | None = None  # set when this process merged the parts
    pending: list[str] = field(default_factory=list)  # parts of this layout still running


@dataclass
class _Clock:
    t0: float = field(default_factory=time.perf_counter)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    load_s: float = 0.0
    t_run: float = 0.0
    run_s: float = 0.0


@dataclass
class _Tally:
    """Counts of the images written, fed by the writer threads."""

    ok: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rec: dict[str, Any]) -> None:
        with self.lock:
            if rec["status"] == "ok":
                self.ok += 1
            else:
                self.failed += 1
                self.failures.append({"path": rec["path"], "error": rec["error"]})


@dataclass(frozen=True)
class RunContext:
    """What every batch of a folder run needs, fixed at its start."""

    st: Setup
    out: Path
    names: dict[str, str]  # image rel path -> output stem
    writer: Writer
    palette: Palette
    explainer: Any  # engine.Explainer
    targets: dict[str, int] | None = None  # per-image targets (file or folder): image rel path -> class


# --------------------------------------------------------------------------------------------
# The run


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
    plan = resolve_plan(cfg)  # names and knobs checked before anything is read or written
    req = RunRequest(plan.cfg, input_path, out, resume, overwrite, shard, argv)
    clock = _Clock()
    layout = Layout.for_process(out, shard)
    if overwrite and shard is not None:
        raise ConfigError(
            "--overwrite with --shard: each shard would delete the results of the others",
            "delete the --out folder before launching the shards, or use --resume",
        )
    listed = _listed(input_path, out)
    with layout.joined():
        prepare_out_dir(out, input_path, resume=resume, overwrite=overwrite, own=layout.own_files(),
                        clear=layout.is_main)
        layout.barrier()  # rank 0 has cleared an --overwrite before anyone writes
        return _run(req, plan, layout, listed, progress or _NoProgress(), clock)


def merge_run(out: Path, *, partial: bool = False) -> MergeResult | None:
    """`xai merge`: merge the parts of a sharded run, then finish the whole run."""
    merged = merge_parts(out, partial=partial)
    if merged is not None:
        finish_run(out, merged.run)
    return merged


# Steps that run once per run when the whole run's scores.jsonl and run.json are on disk: at the
# end of an unsharded run, and in the one process that merged a sharded or torchrun run (or
# `xai merge`). Each step takes (run folder, run.json).
FINISH_STEPS: tuple[Callable[[Path, dict[str, Any]], None], ...] = ()


def finish_run(out: Path, run: dict[str, Any]) -> None:
    """The single finish step of a run (see FINISH_STEPS)."""
    for step in FINISH_STEPS:
        step(out, run)


def _listed(input_path: Path, out: Path) -> ListedImages:
    listed = list_images(input_path, exclude=out)
    if not listed.entries:
        raise InputError(
            f"no images in {input_path}"
            + (f" ({listed.ignored} other files ignored)" if listed.ignored else ""),
            "supported: " + ", ".join(sorted(e.lstrip(".") for e in ("jpg", "png", "bmp", "gif", "tif", "webp"))),
        )
    return listed


def _run(req: RunRequest, plan: Plan, layout: Layout, listed: ListedImages, progress: ProgressHook,
         clock: _Clock) -> RunResult:
    cfg = req.cfg
    st = setup(plan, layout.device(select_device(cfg.runtime.device)))
    clock.load_s = time.perf_counter() - clock.t0
    if layout.is_main:  # once per run, not once per torchrun rank
        for message in st.warnings:
            progress.warn(message)
    entries = layout.select(listed.entries)
    done = layout.done() if req.resume else {}
    todo = [e for e in entries if e.rel not in done]
    targets, no_target = _image_targets(st, todo)
    tally = _Tally()
    scores = ScoresFile(layout.scores_path)
    threads = max(2, min(8, (os.cpu_count() or 2)))
    writer = Writer(scores, threads=threads, max_pending=4 * cfg.runtime.batch_size, on_done=tally.add)
    o = cfg.output
    ctx = RunContext(st, req.out, records.output_names([e.rel for e in listed.entries]), writer,
                     Palette.of(o.colormap, o.diverging_colormap, o.alpha, st.device),
                     st.explainer(keep_batches=bool(st.metrics), on_method=_hook(progress, "method")), targets)
    st.runner.on_pass = _hook(progress, "passes")
    if st.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(st.device)
    clock.t_run = time.perf_counter()
    try:
        _explain_images(ctx, todo, progress, no_target)
    finally:
        writer.close()
        scores.close()
        progress.finish()
    clock.run_s = time.perf_counter() - clock.t_run
    sealed = layout.seal()
    counts = {"listed": len(listed.entries), "shard": len(entries), "processed": len(todo),
              "ok": tally.ok + len(entries) - len(todo), "failed": tally.failed,
              "skipped_done": len(entries) - len(todo), "ignored_files": listed.ignored}
    run = _manifest(req, st, layout, counts, tally, clock)
    from .metrics.summary import aggregate

    run["aggregates"] = aggregate(sealed, run["metrics"])
    fin = layout.finish(run)
    if fin.complete:
        finish_run(req.out, fin.run)
    return RunResult(req.out, len(entries), counts["ok"], tally.failed, counts["skipped_done"], listed.ignored,
                     fin.exit_code, fin.run, fin.merged, fin.pending)


def _manifest(req: RunRequest, st: Setup, layout: Layout, counts: dict[str, int], tally: _Tally,
              clock: _Clock) -> dict[str, Any]:
    """This process's run.json (records.RunManifest); ``aggregates`` is added by the caller."""
    pre, device = st.loaded.preprocess, st.device
    channels = st.layer_shape[0] if st.layer_shape else None
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    processed = counts["processed"]
    return {
        "schema_version": records.SCHEMA_VERSION,
        "command": req.argv,
        "started": clock.started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(req.input_path),
        "output": str(req.out),
        "config": req.cfg.to_dict(),
        "model": st.loaded.description,
        "sources": st.loaded.sources,
        "warnings": st.warnings,
        "n_classes": st.n_classes,
        "layer": st.layer.spec if st.layer else None,
        "layer_shape": list(st.layer_shape) if st.layer_shape else None,
        "layer_auto": st.layer_auto,
        "layer_layout": st.layer.layout.describe() if st.layer and st.layer.layout else None,
        "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": pre.mean, "std": pre.std,
                       "interpolation": pre.interpolation, "input_size": list(pre.input_size)},
        "target": st.target.describe(),
        "methods": [{"name": s.name, "params": _params_dict(p), "passes": s.cost_text(p, channels)}
                    for s, p in st.methods],
        "metrics": [{"name": s.name, "params": _params_dict(p)} for s, p in st.metrics],
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
        "precision": req.cfg.runtime.precision,
        "versions": records.versions(),
        "counts": counts,
        "shard": list(req.shard) if req.shard else None,
        "part": layout.describe(),
        "host": _host(),
        "timings": {"load_s": round(clock.load_s, 3), "run_s": round(clock.run_s, 3),
                    "images_per_s": round(processed / clock.run_s, 3) if clock.run_s > 0 else None},
        "peak_gpu_memory_mb": round(peak, 1) if peak is not None else None,
        "failures": sorted(tally.failures, key=lambda f: f["path"]),
        "exit_code": EXIT_OK if tally.failed == 0 else EXIT_PARTIAL,
    }


def _host() -> str:
    import socket

    return socket.gethostname()


def _params_dict(p: Any) -> dict[str, Any]:
    import dataclasses

    if not dataclasses.is_dataclass(p):
        return {}
    return {k: v for k, v in dataclasses.asdict(p).items() if not isinstance(v, Tensor)}  # no loaded tensors


# --------------------------------------------------------------------------------------------
# Batches


def _loader(todo: list[ImageEntry], st: Setup) -> torch.utils.data.DataLoader[LoadedBatch]:
    rt = st.cfg.runtime
    workers = rt.workers if len(todo) > 1 else 0
    return torch.utils.data.DataLoader(
        ImageFolder(todo, st.loaded.preprocess),
        batch_size=rt.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=st.device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def _image_targets(st: Setup, todo: list[ImageEntry]) -> tuple[dict[str, int] | None, dict[str, str]]:
    """Per-image targets (target: a file or folder): image -> class for the images that have one,
    and image -> why not for the others (they get error records and are not loaded)."""
    if st.image_targets is None:
        return None, {}
    found: dict[str, int] = {}
    missing: dict[str, str] = {}
    for e in todo:
        t = st.image_targets.resolve(e.rel, e.path)
        if isinstance(t, int):
            found[e.rel] = t
        else:
            missing[e.rel] = t
    return found, missing


def _explain_images(ctx: RunContext, todo: list[ImageEntry], progress: ProgressHook,
                    no_target: dict[str, str] | None = None) -> None:
    """Every image of ``todo``, batch by batch; a batch that runs out of device memory is split
    in halves (and the run keeps the smaller size). Images in ``no_target`` (rel -> why) get an
    error record and are not loaded."""
    st = ctx.st
    progress.start(len(todo), f"{'+'.join(st.cfg.method)} on {len(todo)} images")
    channels = st.layer_shape[0] if st.layer_shape else None
    size = st.loaded.preprocess.input_size
    _hook(progress, "plan")([(s.name, *_passes_per_image(s, p, channels, size)) for s, p in st.methods],
                            st.target_ranks)
    new_batch = _hook(progress, "batch")
    if no_target:
        for rel, why in no_target.items():
            ctx.writer.submit(records.error_record(rel, "target", why), [])
        progress.advance(len(no_target))
        todo = [e for e in todo if e.rel not in no_target]
    loader = _loader(todo, st)
    chunk = st.cfg.runtime.batch_size  # lowered for the rest of the run after an out-of-memory split
    for batch in loader:
        for err in batch.errors:
            ctx.writer.submit(records.error_record(err.rel, err.kind, err.message), [])
        if batch.size:
            new_batch(batch.size)
            chunk = split_on_oom(partial(_explain_slice, ctx, batch), batch.size, chunk)
        progress.advance(len(batch.errors) + batch.size)


def _explain_slice(ctx: RunContext, batch: LoadedBatch, sl: slice) -> None:
    """The images ``sl`` of a batch. An out-of-memory error of several images goes up to be split;
    any other unexpected failure becomes an error record for these images, and the run goes on."""
    sub = batch.select(sl)
    try:
        _explain_batch(ctx, sub)
    except Exception as e:
        if (is_oom(e) and sub.size > 1) or isinstance(e, (ConfigError, MethodError)):
            raise
        msg = f"{type(e).__name__}: {e}"
        for rel in sub.rels:
            ctx.writer.submit(records.error_record(rel, "explain", msg), [])


def _explain_batch(ctx: RunContext, batch: LoadedBatch) -> None:
    """One (sub-)batch: compute on the device, render on the device, hand files to the writer."""
    st = ctx.st
    assert batch.x is not None
    x = batch.x.to(st.device, non_blocking=True)
    seeds = torch.tensor([stable_seed(st.cfg.runtime.seed, r) for r in batch.rels], dtype=torch.long)
    targets = _batch_targets(ctx, batch.rels)
    res = ctx.explainer(x, seeds) if targets is None else ctx.explainer(x, seeds, targets=targets)
    out = _BatchOutputs(ctx, batch, res)
    for mres in res.methods:
        for j in range(len(mres.maps)):
            out.add(mres, j)
    out.submit()


def _batch_targets(ctx: RunContext, rels: list[str]) -> Tensor | Callable[[Tensor], Tensor] | None:
    """The classes to explain for per-image targets: (B,), or with ``also_predicted`` a function
    of the logits giving (B, 2): the prediction, then the image's own class. None: the Explainer's
    own rule (prediction, fixed class, top-k)."""
    if ctx.targets is None:
        return None
    known = torch.tensor([ctx.targets[r] for r in rels], dtype=torch.long, device=ctx.st.device)
    if not ctx.st.target.also_predicted:
        return known
    return lambda logits: torch.stack([logits.argmax(1), known], 1)


def target_source(target: TargetConfig, j: int) -> str | None:
    """Which source gave target rank ``j`` (scores.jsonl ``target.source``): ``predicted``,
    ``file`` or ``folder``; None for the run-wide rules (prediction, fixed class, top-k), whose
    records stay as they were."""
    if not target.per_image:
        return None
    return "predicted" if target.also_predicted and j == 0 else target.mode


def target_suffix(target: TargetConfig, j: int) -> str:
    """The file-name suffix of target rank ``j``: ``.top2`` for top-k, ``.predicted`` / ``.true``
    for the prediction beside a per-image class, none otherwise."""
    if target.mode == "topk":
        return f".top{j + 1}"
    if target.also_predicted:
        return ".predicted" if j == 0 else ".true"
    return ""


@dataclass
class _Predictions:
    """The batch's top-k and explained classes with their probabilities, on the host."""

    top_p: Tensor  # (B, k)
    top_i: Tensor
    tgt: Tensor  # (B, K) explained classes per target rank
    tgt_p: Tensor
    ranks: Tensor  # rank of each explained class among the predictions (1 = top)

    @staticmethod
    def of(res: BatchResult, topk: int) -> _Predictions:
        probs = res.logits.softmax(1)
        top_p, top_i = probs.topk(min(topk, probs.shape[1]), dim=1)
        tgt_p = probs.gather(1, res.targets)
        ranks = (probs[:, None, :] > tgt_p[:, :, None]).sum(2) + 1  # (B, K)
        return _Predictions(top_p.cpu(), top_i.cpu(), res.targets.cpu(), tgt_p.cpu(), ranks.cpu())

    def topk(self, i: int, label: Callable[[int], str]) -> list[records.Prediction]:
        return [{"index": int(self.top_i[i, r]), "label": label(int(self.top_i[i, r])),
                 "prob": round(float(self.top_p[i, r]), 6)} for r in range(self.top_i.shape[1])]

    def target(self, i: int, j: int, label: Callable[[int], str]) -> records.Target:
        t = int(self.tgt[i, j])
        return {"index": t, "label": label(t), "prob": round(float(self.tgt_p[i, j]), 6),
                "rank": int(self.ranks[i, j])}


class _BatchOutputs:
    """The files and records of one batch, built per method and target rank on the device, handed
    to the writer once the batch's copies to the host have landed (one sync per batch)."""

    def __init__(self, ctx: RunContext, batch: LoadedBatch, res: BatchResult) -> None:
        st = ctx.st
        self.ctx, self.batch, self.res = ctx, batch, res
        self.preds = _Predictions.of(res, st.cfg.output.topk)
        self.images = [im.to(st.device, non_blocking=True) for im in batch.images]
        self.sizes = [(int(im.shape[1]), int(im.shape[2])) for im in self.images]
        pre = st.loaded.preprocess
        self.windows = [pre.window(h, w) for h, w in self.sizes]
        self.metric_ctx = self._metric_context() if st.metrics else None
        self.entries: list[list[records.Explanation]] = [[] for _ in batch.rels]
        self.jobs: list[list[Any]] = [[] for _ in batch.rels]

    def _metric_context(self) -> MetricContext:
        st = self.ctx.st
        gt = st.ground_truth if any(ms.ground_truth for ms, _ in st.metrics) else None
        return build_context(self.batch.rels, self.sizes, st.loaded.preprocess, gt, st.device)

    def add(self, mres: MethodResult, j: int) -> None:
        """The map of method ``mres`` for target rank ``j``: stats, metrics, overlays, raw maps."""
        st, o = self.ctx.st, self.ctx.st.cfg.output
        spec, raw = mres.spec, mres.maps[j]
        mode, _ = spec.display(mres.params)
        flat = raw.flatten(1)
        stats = torch.stack([flat.amin(1), flat.amax(1), flat.mean(1)], 1).cpu()
        norm = normalize(raw, mode)
        metric_vals = self._metrics(self.res.batches[j], raw, mode) if st.metrics else {}
        extras = {k: v.detach().float().cpu() for k, v in mres.extras[j].items()}
        suffix = f".{spec.name}" + target_suffix(st.target, j)
        source = target_source(st.target, j)
        boxes = next((b for ms, mp in st.metrics if (b := ms.boxes_to_draw(mp, metric_vals)) is not None), None)
        overlays, peaks = compose(self.images, norm, self.windows, self.ctx.palette, signed=mode == "diverging",
                                  boxes=boxes, overlays=o.overlays)
        layer = st.layer.spec if (st.layer is not None and spec.needs_layer) else None
        for i, rel in enumerate(self.batch.rels):
            stem = self.ctx.names[rel]
            files: records.Files = {"overlay": None, "map": None}
            if overlays[i] is not None:
                files["overlay"] = overlay_file(stem, suffix, o.format)
                self.jobs[i].append((self.ctx.out / files["overlay"],
                                     partial(encode_image, overlays[i], o.format, o.jpeg_quality)))
            if o.save_maps:
                files["map"] = map_file(stem, suffix)
                arr = _map_array(raw[i], self.sizes[i], self.windows[i])
                self.jobs[i].append((self.ctx.out / files["map"], partial(encode_npy, arr)))
            width = self.sizes[i][1]
            map_stats: records.MapStats = {
                "shape": list(raw.shape[1:]), "min": float(stats[i, 0]), "max": float(stats[i, 1]),
                "mean": float(stats[i, 2]), "peak": [int(peaks[i] % width), int(peaks[i] // width)]}
            values: dict[str, Any] = {k: records.json_ready(v[i].tolist()) for k, v in extras.items()}
            if metric_vals:
                values["metrics"] = {k: records.json_ready(v[i].tolist()) for k, v in metric_vals.items()}
            target = self.preds.target(i, j, st.loaded.label)
            if source is not None:
                target["source"] = source
            self.entries[i].append(records.explanation_entry(spec.name, layer, target, map_stats, files, values))

    def _metrics(self, mb: Batch, raw: Tensor, mode: str | None) -> dict[str, Tensor]:
        """Every metric of the run on one method's maps, at the model input's size and scaled as
        rendered (signed maps: their positive part)."""
        st = self.ctx.st
        metric_map = normalize(raw, None if mode is None else ("positive" if mode == "diverging" else mode))
        metric_map = to_input_size(metric_map, st.loaded.preprocess.input_size)
        out: dict[str, Tensor] = {}
        for mspec, mparams in st.metrics:
            for key, val in mspec.fn(mb, metric_map, mparams, self.metric_ctx).items():
                out[key] = val.detach().float().cpu()
        return out

    def submit(self) -> None:
        st = self.ctx.st
        if st.device.type == "cuda":
            torch.cuda.synchronize(st.device)  # the queued overlay copies have landed
        for i, rel in enumerate(self.batch.rels):
            rec = records.image_record(rel, self.sizes[i], self.preds.topk(i, st.loaded.label), self.entries[i])
            self.ctx.writer.submit(rec, self.jobs[i])


def _map_array(raw: Tensor, size: tuple[int, int], window: tuple[float, float, float, float]) -> np.ndarray:
    """A raw map in its image's frame for maps/*.npy: float16 when that keeps it, else float32."""
    placed, _ = place(raw, size[0], size[1], window)
    arr = placed.cpu().numpy()
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    return arr.astype(np.float16) if 1e-3 <= peak <= 6e4 or peak == 0 else arr.astype(np.float32)
