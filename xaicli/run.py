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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from . import records
from .annotate import Caption, Legend, annotate, lut_array
from .config import Config, TargetConfig
from .data import (
    DecodeLimits,
    ImageEntry,
    ImageFolder,
    ListedImages,
    LoadedBatch,
    collate,
    list_images,
    worker_init,
)
from .engine import BatchResult, MethodResult, Setup, select_device, setup
from .errors import EXIT_OK, EXIT_PARTIAL, ConfigError, InputError, XaiError
from .methods.batch import Batch, is_oom, split_on_oom, stable_seed
from .metrics.context import MetricContext
from .metrics.ground_truth import build_context
from .models import weights_digest
from .outputs import (
    ScoresFile,
    Writer,
    check_out_dir,
    encode_image,
    encode_npy,
    make_out_dir,
    map_file,
    output_error,
    overlay_file,
    prepare_out_dir,
)
from .plan import Plan, resolve_plan
from .render import Palette, Style, compose, normalize, place, to_input_size
from .report import finish_pictures
from .shards import Layout, MergeResult, merge_folder

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
    notes: list[str] = field(default_factory=list)  # for the summary: skipped output folders, capped workers


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
    styles: Mapping[str, Style] = field(default_factory=dict)  # method name -> how its maps are drawn
    legends: Mapping[str, Legend] = field(default_factory=dict)  # method name -> its caption's colour bar


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
    check_out_dir(out, input_path)  # before the model loads: a file, the input's parent, not writable
    listed = _listed(input_path, out)
    with layout.joined():
        created = make_out_dir(out)
        # The folder is this process's (and its fellow parts') from here to the end (lock.py);
        # a run that stops before its first image leaves nothing behind.
        with layout.locked(_holder_text(req)), layout.tidy_if_unstarted(created):
            prepare_out_dir(out, resume=resume, overwrite=overwrite, own=layout.own_files(), clear=layout.is_main)
            layout.barrier()  # rank 0 has cleared an --overwrite before anyone writes
            return _run(req, plan, layout, listed, progress or _NoProgress(), clock)


def _holder_text(req: RunRequest) -> str:
    """How a lock holder is named to a refused process."""
    return "xai explain" + (f" --shard {req.shard[0]}/{req.shard[1]}" if req.shard else "")


def merge_run(out: Path, *, partial: bool = False) -> MergeResult | None:
    """`xai merge`: merge the parts of a sharded run, then finish the whole run."""
    merged = merge_folder(out, partial=partial)
    if merged is not None:
        finish_run(out, merged.run)
    return merged


# Steps that run once per run when the whole run's scores.jsonl and run.json are on disk: at the
# end of an unsharded run, and in the one process that merged a sharded or torchrun run (or
# `xai merge`). Each step takes (run folder, run.json). The contact sheet and the report
# (output.grid, output.report) are written here.
FINISH_STEPS: tuple[Callable[[Path, dict[str, Any]], None], ...] = (finish_pictures,)


def finish_run(out: Path, run: dict[str, Any]) -> None:
    """The single finish step of a run (see FINISH_STEPS)."""
    for step in FINISH_STEPS:
        step(out, run)


def _listed(input_path: Path, out: Path) -> ListedImages:
    listed = list_images(input_path, exclude=out)
    if not listed.entries:
        skipped = [f"{listed.ignored} other files ignored"] if listed.ignored else []
        if listed.skipped_outputs:
            skipped.append(f"{listed.skipped_outputs} images under xaicli output folders skipped")
        raise InputError(
            f"no images in {input_path}" + (f" ({'; '.join(skipped)})" if skipped else ""),
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
    described = _describe(req, st, layout, clock, plan.styles)
    layout.adopt_plan(described, resume=req.resume)  # a changed config never mixes with the earlier run
    entries = layout.select(listed.entries)
    done = layout.done() if req.resume else {}
    todo = [e for e in entries if e.rel not in done]
    targets, no_target = _image_targets(st, todo)
    tally = _Tally()
    scores = ScoresFile(layout.scores_path)
    threads = max(2, min(8, (os.cpu_count() or 2)))
    writer = Writer(scores, threads=threads, max_pending=4 * cfg.runtime.batch_size, on_done=tally.add, out=req.out)
    o = cfg.output
    ctx = RunContext(st, req.out, records.output_names([e.rel for e in listed.entries]), writer,
                     Palette.of(o.colormap, o.diverging_colormap, o.alpha, st.device),
                     st.explainer(keep_batches=bool(st.metrics), on_method=_hook(progress, "method")), targets,
                     plan.styles, _legends(st, plan.styles))
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
    writer.check()  # a line that could not be written stops the run here (exit 3), never silently
    clock.run_s = time.perf_counter() - clock.t_run
    try:
        return _finish(req, st, layout, (listed, entries, todo), tally, clock, described)
    except OSError as e:
        raise output_error(e, req.out, "cannot write the run's results") from None


def _finish(req: RunRequest, st: Setup, layout: Layout, images: tuple[ListedImages, list[ImageEntry], list[ImageEntry]],
            tally: _Tally, clock: _Clock, described: dict[str, Any]) -> RunResult:
    """Seal this process's scores, write its run.json (merging the parts when it is the last)."""
    from .metrics.summary import aggregate

    listed, entries, todo = images
    notes = _listing_notes(listed) + _worker_notes(st.cfg.runtime.workers)
    sealed = layout.seal()
    skipped = len(entries) - len(todo)
    if layout.part is None:  # the counts are those of the scores.jsonl just written, exactly
        failures, ok, _ = records.outcome(sealed)
    else:
        failures, ok = sorted(tally.failures, key=lambda f: f["path"]), tally.ok + skipped
    counts = {"listed": len(listed.entries), "shard": len(entries), "processed": len(todo), "ok": ok,
              "failed": len(failures), "skipped_done": skipped, "ignored_files": listed.ignored,
              "skipped_output_files": listed.skipped_outputs}
    run = _manifest(described, st, counts, failures, clock)
    run["aggregates"] = aggregate(sealed, run["metrics"])
    fin = layout.finish(run)
    if fin.complete:
        finish_run(req.out, fin.run)
    return RunResult(req.out, len(entries), ok, len(failures), skipped, listed.ignored, fin.exit_code, fin.run,
                     fin.merged, fin.pending, notes)


def _listing_notes(listed: ListedImages) -> list[str]:
    if not listed.output_folders:
        return []
    names = ", ".join(listed.output_folders[:5]) + (", ..." if len(listed.output_folders) > 5 else "")
    return [f"skipped {listed.skipped_outputs} images under xaicli output folders ({names}): earlier results "
            "are never read back as input"]


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers(requested: int, batches: int) -> int:
    """Loader worker processes: as many as asked, but no more than the CPUs this process may use
    (each is a process with its own memory: 1000 would exhaust the machine) or the batches."""
    return max(0, min(requested, usable_cpus(), batches if batches > 1 else 0))


def _worker_notes(requested: int) -> list[str]:
    cpus = usable_cpus()
    if requested <= cpus:
        return []
    return [f"--workers {requested} capped to {cpus}, the CPUs this process may use"]


def _legends(st: Setup, styles: Mapping[str, Style]) -> dict[str, Legend]:
    """The colour bar of each method's captions (what its colours mean, as it is drawn)."""
    o = st.cfg.output
    out = {}
    for spec, params in st.methods:
        mode, _ = spec.display(params)
        style = styles.get(spec.name, Style())
        lut = lut_array(o.diverging_colormap if mode == "diverging" else o.colormap)
        out[spec.name] = Legend.of(lut, mode, style.blend, o.alpha, style.clip)
    return out


def _describe(req: RunRequest, st: Setup, layout: Layout, clock: _Clock, styles: Mapping[str, Style]) -> dict[str, Any]:
    """What run.json says of a run that is known at its start, in run.json's order (``finished``
    and ``counts`` are filled in at the end). Written as the folder's plan file when it starts."""
    pre, device = st.loaded.preprocess, st.device
    channels = st.layer_shape[0] if st.layer_shape else None
    return {
        "schema_version": records.SCHEMA_VERSION,
        "command": req.argv,
        "started": clock.started,
        "finished": None,
        "input": str(req.input_path),
        "output": str(req.out),
        "config": req.cfg.to_dict(),
        "model": st.loaded.description,
        "weights_digest": weights_digest(st.model),
        "sources": st.loaded.sources,
        "warnings": st.warnings,
        "n_classes": st.n_classes,
        "layer": st.layer.spec if st.layer else None,
        "layer_shape": list(st.layer_shape) if st.layer_shape else None,
        "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": pre.mean, "std": pre.std,
                       "interpolation": pre.interpolation, "input_size": list(pre.input_size)},
        "target": st.target.describe(),
        "methods": [{"name": s.name, "params": _params_dict(p), "passes": s.cost_text(p, channels),
                     "style": _params_dict(styles.get(s.name, Style()))} for s, p in st.methods],
        "metrics": [{"name": s.name, "params": _params_dict(p)} for s, p in st.metrics],
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
        "precision": req.cfg.runtime.precision,
        "versions": records.versions(),
        "counts": None,
        "shard": list(req.shard) if req.shard else None,
        "part": layout.describe(),
        "host": _host(),
    }


def _manifest(described: dict[str, Any], st: Setup, counts: dict[str, int], failures: list[dict[str, Any]],
              clock: _Clock) -> dict[str, Any]:
    """This process's run.json (records.RunManifest); ``aggregates`` is added by the caller."""
    device = st.device
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    processed = counts["processed"]
    run = dict(described)
    run.update({
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "timings": {"load_s": round(clock.load_s, 3), "run_s": round(clock.run_s, 3),
                    "images_per_s": round(processed / clock.run_s, 3) if clock.run_s > 0 else None},
        "peak_gpu_memory_mb": round(peak, 1) if peak is not None else None,
        "failures": failures,
        "exit_code": EXIT_OK if not failures else EXIT_PARTIAL,
    })
    return run


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
    workers = loader_workers(rt.workers, -(-len(todo) // rt.batch_size))
    return torch.utils.data.DataLoader(
        ImageFolder(todo, st.loaded.preprocess, DecodeLimits(st.cfg.input.max_pixels, st.cfg.input.decode_pixels)),
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
        if (is_oom(e) and sub.size > 1) or isinstance(e, XaiError):  # a method, the disk: the run's problem
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
        self.sizes = [(int(im.shape[1]), int(im.shape[2])) for im in self.images]  # as decoded: overlays, maps
        self.originals = batch.sizes or self.sizes  # as stored: records, peaks, ground truth
        pre = st.loaded.preprocess
        self.windows = [pre.window(h, w) for h, w in self.sizes]
        self.metric_ctx = self._metric_context() if st.metrics else None
        self.entries: list[list[records.Explanation]] = [[] for _ in batch.rels]
        self.jobs: list[list[Any]] = [[] for _ in batch.rels]

    def _metric_context(self) -> MetricContext:
        st = self.ctx.st
        gt = st.ground_truth if any(ms.ground_truth for ms, _ in st.metrics) else None
        return build_context(self.batch.rels, self.originals, st.loaded.preprocess, gt, st.device)

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
        source = target_source(st.target, j)
        boxes, thresholds = self._drawn_boxes(metric_vals)
        overlays, peaks = compose(self.images, norm, self.windows, self.ctx.palette, signed=mode == "diverging",
                                  boxes=boxes, overlays=o.overlays, style=self.ctx.styles.get(spec.name))
        layer = st.layer.spec if (st.layer is not None and spec.needs_layer) else None
        for i in range(len(self.batch.rels)):
            target = self.preds.target(i, j, st.loaded.label)
            if source is not None:
                target["source"] = source
            suffix = f".{spec.name}" + target_suffix(st.target, j) + (
                f"-{records.file_safe(target['label'], target['index'])}" if st.target.mode == "topk" else "")
            tags = list(zip(boxes[i].reshape(-1, 4).tolist(), thresholds, strict=False)) if boxes is not None else []
            files = self._files(i, overlays[i], suffix, raw[i], Caption(spec.name, target["label"], target["prob"],
                                                                         target["rank"]), tags)
            map_stats: records.MapStats = {
                "shape": list(raw.shape[1:]), "min": float(stats[i, 0]), "max": float(stats[i, 1]),
                "mean": float(stats[i, 2]), "peak": self._peak(i, int(peaks[i]))}
            values: dict[str, Any] = {k: records.json_ready(v[i].tolist()) for k, v in extras.items()}
            if metric_vals:
                values["metrics"] = {k: records.json_ready(v[i].tolist()) for k, v in metric_vals.items()}
            self.entries[i].append(records.explanation_entry(spec.name, layer, target, map_stats, files, values))

    def _peak(self, i: int, flat: int) -> list[int]:
        """(x, y) of a map's peak in the image's own pixels (scaled up when it was decoded reduced)."""
        (h, w), (oh, ow) = self.sizes[i], self.originals[i]
        x, y = flat % w, flat // w
        if (h, w) == (oh, ow):
            return [x, y]
        return [min(ow - 1, int((x + 0.5) * ow / w)), min(oh - 1, int((y + 0.5) * oh / h))]

    def _drawn_boxes(self, metric_vals: dict[str, Tensor]) -> tuple[Tensor | None, tuple[float, ...]]:
        """The boxes a metric draws on the overlays (B, T, 4), and the thresholds they are tagged
        with (the metric's ``thresholds`` knob, when it has one)."""
        for ms, mp in self.ctx.st.metrics:
            b = ms.boxes_to_draw(mp, metric_vals)
            if b is not None:
                return b, tuple(getattr(mp, "thresholds", ()))
        return None, ()

    def _files(self, i: int, overlay: np.ndarray | None, suffix: str, raw: Tensor, caption: Caption,
               tags: list[tuple[list[float], float]]) -> records.Files:
        """Queue image ``i``'s overlay (annotated unless ``output.annotate`` is off) and raw map."""
        o = self.ctx.st.cfg.output
        stem = self.ctx.names[self.batch.rels[i]]
        files: records.Files = {"overlay": None, "map": None}
        if overlay is not None:
            files["overlay"] = name = overlay_file(stem, suffix, o.format)
            if o.annotate:
                produce = partial(_encode_annotated, overlay, caption, self.ctx.legends[caption.method], tags,
                                  o.format, o.jpeg_quality)
            else:
                produce = partial(encode_image, overlay, o.format, o.jpeg_quality)
            self.jobs[i].append((self.ctx.out / name, produce))
        if o.save_maps:
            files["map"] = name = map_file(stem, suffix)
            arr = _map_array(raw, self.sizes[i], self.windows[i])
            self.jobs[i].append((self.ctx.out / name, partial(encode_npy, arr)))
        return files

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
            rec = records.image_record(rel, self.originals[i], self.preds.topk(i, st.loaded.label), self.entries[i],
                                       decoded=self.sizes[i] if self.sizes[i] != self.originals[i] else None)
            self.ctx.writer.submit(rec, self.jobs[i])


def _encode_annotated(rgb: np.ndarray, caption: Caption, legend: Legend, tags: list[tuple[list[float], float]],
                      fmt: str, quality: int) -> bytes:
    """An overlay with its caption strip and box tags, encoded (on a writer thread)."""
    return encode_image(annotate(rgb, caption, legend, tags), fmt, quality)


def _map_array(raw: Tensor, size: tuple[int, int], window: tuple[float, float, float, float]) -> np.ndarray:
    """A raw map in its image's frame for maps/*.npy: float16 when that keeps it, else float32."""
    placed, _ = place(raw, size[0], size[1], window)
    arr = placed.cpu().numpy()
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    return arr.astype(np.float16) if 1e-3 <= peak <= 6e4 or peak == 0 else arr.astype(np.float32)
