"""What a run writes about itself: the scores.jsonl record of each image and the run.json
manifest, as typed definitions, the functions that build them, and the one reader of a run folder
(`xai check`, `xai compare`, `xai merge` and reports read runs through it).

scores.jsonl holds one :class:`ImageRecord` (or :class:`ErrorRecord`) per line, sorted by path at
the end of a run. run.json is a :class:`RunManifest`. Both are plain JSON; the TypedDicts below are
their schema and the field lists other modules use come from them.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .errors import EXIT_OK, EXIT_PARTIAL, InputError
from .outputs import RUN, SCORES, read_scores

SCHEMA_VERSION = 1  # of run.json

# --------------------------------------------------------------------------------------------
# scores.jsonl


class ErrorInfo(TypedDict):
    type: str  # decode, unsupported, empty, unreadable, too_large, preprocess, explain, write
    message: str


class Prediction(TypedDict):
    index: int
    label: str
    prob: float


class _TargetFields(TypedDict):
    index: int
    label: str
    prob: float
    rank: int  # 1 = the prediction


class Target(_TargetFields, total=False):
    # Per-image targets only (target: a file, folder, or predicted beside one): which source gave
    # the class: "predicted", "file" or "folder".
    source: str


class MapStats(TypedDict):
    shape: list[int]  # the raw map's (h, w)
    min: float
    max: float
    mean: float
    peak: list[int]  # (x, y) of the maximum (of |map| when diverging) in original image pixels


class Files(TypedDict):
    overlay: str | None  # relative to the run folder
    map: str | None


class Explanation(TypedDict, total=False):
    """One method's map of one target. Besides these keys an entry carries the method's own
    per-image values (e.g. ``completeness_gap``) at the top level."""

    method: str
    layer: str | None
    target: Target
    map: MapStats
    files: Files
    metrics: dict[str, Any]  # per-image metric values (numbers, lists, null)


class ImageRecord(TypedDict):
    path: str  # relative to the input root, POSIX (a non-UTF-8 name's bytes as \udcXX escapes)
    status: str  # "ok"
    error: None
    width: int
    height: int
    topk: list[Prediction]
    explanations: list[Explanation]
    # and, only for an image decoded reduced (input.decode_pixels): "decoded": {width, height},
    # the size of its overlays and maps


class ErrorRecord(TypedDict):
    path: str
    status: str  # "error"
    error: ErrorInfo


RECORD_FIELDS: tuple[str, ...] = tuple(ImageRecord.__annotations__)
ENTRY_FIELDS: tuple[str, ...] = tuple(Explanation.__annotations__)


def error_record(path: str, kind: str, message: str) -> ErrorRecord:
    return {"path": path, "status": "error", "error": {"type": kind, "message": message}}


def image_record(path: str, size: tuple[int, int], topk: list[Prediction],
                 explanations: list[Explanation], decoded: tuple[int, int] | None = None) -> ImageRecord:
    """The record of an image that succeeded; ``size`` is (height, width) of the original;
    ``decoded`` the (height, width) it was explained at when it was decoded reduced (input.decode_pixels)."""
    rec: ImageRecord = {"path": path, "status": "ok", "error": None, "width": size[1], "height": size[0],
                        "topk": topk, "explanations": explanations}
    if decoded is not None:
        rec["decoded"] = {"width": decoded[1], "height": decoded[0]}  # type: ignore[typeddict-unknown-key]
    return rec


def explanation_entry(method: str, layer: str | None, target: Target, stats: MapStats, files: Files,
                      values: Mapping[str, Any]) -> Explanation:
    """One entry of ``explanations``: ``values`` holds the method's extras (top level) and, under
    ``metrics``, the metric values; both already JSON-ready (see :func:`json_ready`)."""
    entry: Explanation = {"method": method, "layer": layer, "target": target, "map": stats, "files": files}
    entry.update({k: v for k, v in values.items() if k != "metrics"})  # type: ignore[typeddict-item]
    if "metrics" in values:
        entry["metrics"] = values["metrics"]
    return entry


def json_ready(v: Any) -> Any:
    """A per-image value for JSON: a number, or nested lists for (N,) / (N, 4) values. Non-finite
    numbers become null, and so does a list holding nothing but nulls (e.g. no box, no ground truth)."""
    if isinstance(v, list):
        items = [json_ready(a) for a in v]
        return None if items and all(a is None for a in items) else items
    f = float(v)
    return f if np.isfinite(f) else None


def record_files(record: Mapping[str, Any]) -> list[str]:
    """The files (relative to the run folder) that a record's explanations point at."""
    return [f for e in record.get("explanations", []) for f in (e.get("files") or {}).values() if f]


def ok_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def file_safe(label: str, index: int, limit: int = 40) -> str:
    """A class name as a file name part: lower-case ASCII letters, digits and ``_`` (accents
    dropped, any other run of characters one ``_``), at most ``limit`` characters; ``class_INDEX``
    when nothing is left (e.g. a name in another script)."""
    import re
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")[:limit].rstrip("_")
    return safe or f"class_{index}"


# Bytes of an output file name left for the stem: file systems take 255, and the suffix
# (".integrated_gradients.top10-<class name, at most 40>.png") needs the rest.
MAX_STEM_BYTES = 160


def output_names(rels: Sequence[str]) -> dict[str, str]:
    """rel path -> output stem path (without method suffix). ``a.jpg`` and ``a.png`` in one folder
    would collide on the stem, so those keep their extension. A name too long for the file
    system once suffixed is cut and given a hash of its whole path (scores.jsonl records where
    each image's files went)."""
    stems: dict[str, int] = {}
    for rel in rels:
        key = str(Path(rel).with_suffix(""))
        stems[key] = stems.get(key, 0) + 1
    out = {}
    for rel in rels:
        key = str(Path(rel).with_suffix(""))
        out[rel] = _short_enough(rel, rel if stems[key] > 1 else key)
    return out


def _short_enough(rel: str, stem: str) -> str:
    """``stem`` whose last component fits MAX_STEM_BYTES: else its beginning, ``~`` and 12 hex
    digits of a hash of ``rel`` (the same name in every run and process)."""
    import hashlib

    folder, _, name = stem.rpartition("/")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    head, size = [], 0
    for ch in name:  # whole characters only
        size += len(ch.encode("utf-8", "surrogateescape"))
        if size > MAX_STEM_BYTES - 13:
            break
        head.append(ch)
    short = f"{''.join(head)}~{digest}"
    return f"{folder}/{short}" if folder else short


# --------------------------------------------------------------------------------------------
# run.json


class RunManifest(TypedDict, total=False):
    """run.json. A sharded run's merged manifest replaces ``part`` by ``parts`` and ``devices``."""

    schema_version: int
    command: list[str] | None
    started: str
    finished: str
    input: str
    output: str
    config: dict[str, Any]  # the resolved config
    model: str
    weights_digest: str  # models.weights_digest of the model explained (absent in older runs)
    sources: dict[str, Any]  # where the weights, class names and each preprocessing value came from
    warnings: list[str]  # what the run printed at its start: random weights, assumed labels or preprocessing
    n_classes: int
    layer: str | None
    layer_shape: list[int] | None
    preprocess: dict[str, Any]
    target: str
    methods: list[dict[str, Any]]  # {name, params, passes}
    metrics: list[dict[str, Any]]  # {name, params}
    device: dict[str, Any]
    precision: str
    versions: dict[str, str]
    counts: dict[str, Any]
    shard: list[int] | None
    part: dict[str, Any] | None
    host: str
    timings: dict[str, Any]
    peak_gpu_memory_mb: float | None
    failures: list[dict[str, Any]]  # {path, error}
    exit_code: int
    aggregates: dict[str, Any]
    parts: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    incomplete_parts: list[str]  # a merged run: the parts that had not finished ([] when complete)


def versions() -> dict[str, str]:
    """Library versions for run.json."""
    import PIL
    import torch
    import torchvision

    from . import __version__

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


# What decides a run's outputs, compared by --resume and between the parts of a sharded run:
# run.json keys, and the config's output and seed. Batch size, workers and device may change.
PLAN_KEYS = ("model", "weights_digest", "n_classes", "layer", "preprocess", "target", "methods", "metrics",
             "precision")
PLAN_OUTPUT_KEYS = ("format", "colormap", "diverging_colormap", "alpha", "overlays", "save_maps", "topk",
                    "jpeg_quality")


def plan_of(run: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of a run as its run.json (or a part's, or the plan file written at its start)
    records it: model, weights, layer, preprocessing, target, methods and metrics with their
    knobs, precision, seed and output settings. Keys an older run.json lacks are None."""
    cfg = run.get("config") if isinstance(run.get("config"), Mapping) else {}
    out_cfg = cfg.get("output") if isinstance(cfg.get("output"), Mapping) else {}
    runtime = cfg.get("runtime") if isinstance(cfg.get("runtime"), Mapping) else {}
    plan = {k: run.get(k) for k in PLAN_KEYS}
    for key in ("methods", "metrics"):
        items = run.get(key)
        if isinstance(items, list):
            plan[key] = [{"name": m.get("name"), "params": m.get("params")} for m in items if isinstance(m, Mapping)]
    plan["seed"] = runtime.get("seed")
    plan["output"] = {k: out_cfg.get(k) for k in PLAN_OUTPUT_KEYS} if out_cfg else None
    return json.loads(json.dumps(plan, default=str))  # tuples as lists, as read back from a file


def plan_differences(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per difference between two plans (keys the earlier run did not record are skipped)."""
    lines = []
    for key, value in now.items():
        before = earlier.get(key)
        if before is None or before == value:
            continue
        if key in ("methods", "metrics") and isinstance(before, list) and isinstance(value, list):
            lines += _named_differences(key, before, value)
        elif isinstance(value, Mapping) and isinstance(before, Mapping):
            lines += _differences(key, before, value)
        else:
            lines.append(_difference(key, before, value))
    return lines


def _difference(key: str, before: Any, now: Any) -> str:
    from .errors import quote

    return f"{key}: {quote(before)} before, {quote(now)} now"


def _differences(prefix: str, before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [_difference(f"{prefix}.{k}", before.get(k), now.get(k))
            for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]


def _named_differences(key: str, before: list[Any], now: list[Any]) -> list[str]:
    """Methods or metrics: their names, then the knobs of each."""
    names_before = [m.get("name") for m in before if isinstance(m, Mapping)]
    names_now = [m.get("name") for m in now if isinstance(m, Mapping)]
    if names_before != names_now:
        return [f"{key}: {', '.join(map(str, names_before)) or 'none'} before, "
                f"{', '.join(map(str, names_now)) or 'none'} now"]
    lines = []
    for b, n in zip(before, now, strict=True):
        pb, pn = b.get("params") or {}, n.get("params") or {}
        if pb != pn:
            lines += _differences(f"{key}.{n.get('name')}", pb, pn)
    return lines


def outcome(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """(failures, ok count, exit code) of a complete scores.jsonl."""
    failures = [{"path": r["path"], "error": r.get("error")} for r in records if r.get("status") != "ok"]
    ok = len(records) - len(failures)
    return failures, ok, EXIT_OK if not failures else EXIT_PARTIAL


def part_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a merged run.json keeps of one part: where and how fast it ran, what it did."""
    part = run.get("part") or {}
    return {
        "part": part.get("label"),
        "index": part.get("index"),
        "count": part.get("count"),
        "rank": part.get("rank"),
        "host": run.get("host"),
        "device": run.get("device"),
        "started": run.get("started"),
        "finished": run.get("finished"),
        "counts": run.get("counts"),
        "timings": run.get("timings"),
        "peak_gpu_memory_mb": run.get("peak_gpu_memory_mb"),
    }


def merged_manifest(new: list[dict[str, Any]], prev: Mapping[str, Any] | None, kept_parts: list[dict[str, Any]],
                    records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run.json of a merged sharded run: the manifests of the parts merged now (``new``),
    the earlier merged run.json (``prev``) and the summaries it keeps of parts merged before, over
    the merged ``records``. Counts are summed, timings are the slowest part's. The caller adds
    the ``aggregates`` of the records."""
    failures, ok, exit_code = outcome(records)
    base = dict(new[0] if new else (prev or {"schema_version": SCHEMA_VERSION}))
    summaries = kept_parts + [part_summary(r) for r in new]

    def total(key: str) -> int:
        return sum(int((r.get("counts") or {}).get(key) or 0) for r in new)

    def most(key: str) -> float | None:
        vals = [float((r.get("timings") or {}).get(key)) for r in new if (r.get("timings") or {}).get(key) is not None]
        return round(max(vals), 3) if vals else None

    processed, run_s = total("processed"), most("run_s")
    peaks = [float(r["peak_gpu_memory_mb"]) for r in new if r.get("peak_gpu_memory_mb") is not None]
    started = [str(r["started"]) for r in new if r.get("started")]
    ended = [str(r["finished"]) for r in new if r.get("finished")]
    counts = dict(base.get("counts") or {})
    counts.update({"shard": None, "processed": processed, "ok": ok, "failed": len(failures),
                   "skipped_done": total("skipped_done"), "records": len(records), "parts": len(summaries)})
    base.update({
        "started": min(started) if started else base.get("started"),
        "finished": max(ended) if ended else base.get("finished"),
        "counts": counts,
        "shard": None,
        "part": None,
        "timings": {"load_s": most("load_s"), "run_s": run_s,
                    "images_per_s": round(processed / run_s, 3) if run_s else None,
                    "images_per_s_by_part": [(r.get("timings") or {}).get("images_per_s") for r in new]},
        "peak_gpu_memory_mb": max(peaks) if peaks else base.get("peak_gpu_memory_mb"),
        "devices": [{"part": s.get("part"), "host": s.get("host"), **(s.get("device") or {})} for s in summaries],
        "parts": summaries,
        "failures": failures,
        "exit_code": exit_code,
    })
    return base


# --------------------------------------------------------------------------------------------
# Reading a run folder


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class RunFolder:
    path: Path
    run: dict[str, Any] | None  # run.json (None when missing or unreadable)
    records: list[dict[str, Any]]  # scores.jsonl


def is_run_folder(path: Path) -> bool:
    return (path / SCORES).is_file()


def read_run(path: str | Path) -> RunFolder:
    """scores.jsonl and run.json of a run folder written by `xai explain --out`."""
    p = Path(path)
    if not is_run_folder(p):
        raise InputError(f"{p} is not a run folder: no {SCORES}", "pass folders written by `xai explain --out`")
    return RunFolder(p, read_json(p / RUN), read_scores(p / SCORES))
