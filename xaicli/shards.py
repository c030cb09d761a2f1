"""Scale-out: one folder run split into parts that never write the same file, and the merge.

A run is split by ``--shard I/N`` (e.g. Slurm array jobs), by ``torchrun`` ranks (RANK /
WORLD_SIZE), or both: part ``I + N * rank`` of ``N * world`` processes the sorted image list
sliced ``entries[index::count]``. Overlays and maps are per image, so parts never collide; each
part appends its scores to ``parts/scores.I-of-N.jsonl`` and writes ``parts/run.I-of-N.json``
when it finishes. The merge combines the parts (and an earlier scores.jsonl, when resuming) into
scores.jsonl (sorted, one line per path) and run.json (summed counts, all failures, the slowest
part's timings, every part's device), then removes the merged parts. Under torchrun, rank 0
merges after a barrier; with ``--shard`` alone the last part to finish merges (under a file
lock), and ``xai merge OUT`` does it by hand.

torch.distributed is used only to wait for each other and to share the exit code, over gloo
(CPU and TCP), also on CUDA: no tensor is exchanged, and a gloo barrier neither holds a GPU nor
runs into NCCL's watchdog while the slowest rank is still at work.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .config import SCHEMA_VERSION
from .errors import ConfigError, OutputError
from .outputs import RUN, SCORES, atomic_write, dumps_line, read_scores, write_json

PARTS = "parts"
LOCK = ".xai-merge.lock"
_PART_RE = re.compile(r"^(scores|run)\.(\d+)-of-(\d+)\.(jsonl|json)$")
# How long a rank waits at the final barrier for the slowest one (a long run may be unbalanced).
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True, order=True)
class Part:
    """Part ``index`` of ``count``: the images ``entries[index::count]``."""

    index: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def scores_path(self, out: Path) -> Path:
        return out / PARTS / f"scores.{self.index}-of-{self.count}.jsonl"

    def run_path(self, out: Path) -> Path:
        return out / PARTS / f"run.{self.index}-of-{self.count}.json"


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a torchrun job (only when WORLD_SIZE > 1)."""

    rank: int
    world: int
    local_rank: int


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun (or any env:// launcher) sets them; None alone."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ConfigError(
            f"distributed launch: WORLD_SIZE={env.get('WORLD_SIZE')!r} but RANK={env.get('RANK')!r}",
            "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK",
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"distributed launch: RANK {rank} outside 0..{world - 1}")
    return DistEnv(rank, world, local_rank)


def part_for(shard: tuple[int, int] | None, dist: DistEnv | None) -> Part | None:
    """The slice this process runs: ``--shard I/N`` split again over the ranks, if any.

    ``entries[i::n][r::w] == entries[i + n*r :: n*w]``, so the combination is one part of n*w.
    """
    i, n = shard if shard is not None else (0, 1)
    r, w = (dist.rank, dist.world) if dist is not None else (0, 1)
    if n * w == 1:
        return None
    return Part(i + n * r, n * w)


def _parse(name: str) -> tuple[str, Part] | None:
    m = _PART_RE.match(name)
    if not m:
        return None
    index, count = int(m.group(2)), int(m.group(3))
    if count < 1 or not 0 <= index < count:
        return None
    return m.group(1), Part(index, count)


def list_parts(out: Path) -> tuple[dict[Part, Path], dict[Part, Path]]:
    """(scores parts, run parts) present under ``out/parts``."""
    scores: dict[Part, Path] = {}
    runs: dict[Part, Path] = {}
    d = out / PARTS
    if not d.is_dir():
        return scores, runs
    for p in d.iterdir():
        parsed = _parse(p.name)
        if parsed is None or not p.is_file():
            continue
        kind, part = parsed
        (scores if kind == "scores" else runs)[part] = p
    return scores, runs


def collect_records(out: Path) -> dict[str, dict[str, Any]]:
    """One record per path from scores.jsonl and every scores part: later writes win (the base
    file first, then parts by modification time), so a re-done image replaces its old line."""
    records: dict[str, dict[str, Any]] = {}
    score_parts, _ = list_parts(out)
    sources = [out / SCORES, *sorted(score_parts.values(), key=lambda p: (p.stat().st_mtime_ns, p.name))]
    for src in sources:
        for r in read_scores(src):
            if isinstance(r, dict) and isinstance(r.get("path"), str):
                records[r["path"]] = r
    return records


def done_images(out: Path) -> dict[str, dict[str, Any]]:
    """Records of images already complete in ``out`` (any part): status ok and every file present."""
    done = {}
    for path, r in collect_records(out).items():
        if r.get("status") != "ok":
            continue
        files = [f for e in r.get("explanations", []) for f in (e.get("files") or {}).values() if f]
        if all((out / f).is_file() for f in files):
            done[path] = r
    return done


def write_scores(out: Path, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """scores.jsonl sorted by path, one line per path, written atomically."""
    ordered = [records[k] for k in sorted(records)]
    atomic_write(out / SCORES, "".join(dumps_line(r) + "\n" for r in ordered).encode())
    return ordered


def remove_parts(out: Path, paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (a part that appeared meanwhile) or already gone
        (out / PARTS).rmdir()


def finalize_unsharded(out: Path) -> list[dict[str, Any]]:
    """End of a run without parts: scores.jsonl plus any parts left by an earlier sharded run
    (resumed here in one piece) become one sorted scores.jsonl; those parts are removed."""
    score_parts, run_parts = list_parts(out)
    ordered = write_scores(out, collect_records(out))
    remove_parts(out, [*score_parts.values(), *run_parts.values()])
    return ordered


# --------------------------------------------------------------------------------------------
# Merging run.json


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def part_summary(run: dict[str, Any]) -> dict[str, Any]:
    """What run.json keeps of one part: where and how fast it ran, what it did."""
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


@dataclass
class MergeResult:
    run: dict[str, Any]
    records: int
    ok: int
    failed: int
    exit_code: int
    merged_parts: list[str] = field(default_factory=list)


def _finished(out: Path, run_parts: dict[Part, Path]) -> tuple[set[Part], dict[Part, dict[str, Any]], dict | None]:
    """Parts known to have finished: a run part on disk, or one recorded by an earlier merge."""
    runs = {p: r for p, path in sorted(run_parts.items()) if (r := _read_json(path)) is not None}
    prev = _read_json(out / RUN)
    done = set(runs)
    for s in (prev or {}).get("parts") or []:
        if isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("count"), int):
            done.add(Part(s["index"], s["count"]))
    return done, runs, prev


def missing_parts(finished: set[Part], count: int) -> list[Part]:
    return [Part(i, count) for i in range(count) if Part(i, count) not in finished]


def merge_parts(out: Path, *, layout: int | None = None, partial: bool = False) -> MergeResult | None:
    """Merge ``out/parts`` into scores.jsonl and run.json and remove the merged parts.

    ``layout``: merge only when every part of that many has finished (None is returned
    otherwise); without it (``xai merge``) some layout must be complete unless ``partial``.
    Returns None when there was nothing to merge or the layout is not complete yet.
    """
    from .errors import EXIT_OK, EXIT_PARTIAL
    from .metrics.summary import aggregate

    if not out.is_dir():
        raise OutputError(f"{out}: no such folder", "pass the --out folder of a sharded run")
    score_parts, run_parts = list_parts(out)
    if not score_parts and not run_parts:
        return None
    finished, runs, prev = _finished(out, run_parts)
    layouts = sorted({p.count for p in [*score_parts, *run_parts]})
    if layout is not None:
        if missing_parts(finished, layout):
            return None
    elif not partial and not any(not missing_parts(finished, n) for n in layouts):
        gaps = "; ".join(
            f"{', '.join(p.label for p in missing_parts(finished, n))} not finished" for n in layouts
        )
        raise OutputError(
            f"{out}: the sharded run is incomplete ({gaps})",
            "rerun the missing parts with --resume --shard I/N (the same N), or merge what is there with "
            "`xai merge --partial`",
        )

    records = collect_records(out)
    ordered = write_scores(out, records)
    failures = [{"path": r["path"], "error": r.get("error")} for r in ordered if r.get("status") != "ok"]
    ok = len(ordered) - len(failures)
    exit_code = EXIT_OK if not failures else EXIT_PARTIAL

    new = [runs[p] for p in sorted(runs)]
    base = dict(new[0] if new else (prev or {"schema_version": SCHEMA_VERSION}))
    kept = [s for s in (prev or {}).get("parts") or []
            if isinstance(s, dict) and Part(s.get("index", -1), s.get("count", 0)) not in runs]
    summaries = kept + [part_summary(r) for r in new]

    def total(key: str) -> int:
        return sum(int((r.get("counts") or {}).get(key) or 0) for r in new)

    def most(key: str) -> float | None:
        vals = [float((r.get("timings") or {}).get(key)) for r in new if (r.get("timings") or {}).get(key) is not None]
        return round(max(vals), 3) if vals else None

    processed = total("processed")
    run_s = most("run_s")
    peaks = [float(r["peak_gpu_memory_mb"]) for r in new if r.get("peak_gpu_memory_mb") is not None]
    started = [str(r["started"]) for r in new if r.get("started")]
    ended = [str(r["finished"]) for r in new if r.get("finished")]
    counts = dict(base.get("counts") or {})
    counts.update({
        "shard": None,
        "processed": processed,
        "ok": ok,
        "failed": len(failures),
        "skipped_done": total("skipped_done"),
        "records": len(ordered),
        "parts": len(summaries),
    })
    base.update({
        "started": min(started) if started else base.get("started"),
        "finished": max(ended) if ended else base.get("finished"),
        "counts": counts,
        "shard": None,
        "part": None,
        "timings": {
            "load_s": most("load_s"),
            "run_s": run_s,
            "images_per_s": round(processed / run_s, 3) if run_s else None,
            "images_per_s_by_part": [(r.get("timings") or {}).get("images_per_s") for r in new],
        },
        "peak_gpu_memory_mb": max(peaks) if peaks else base.get("peak_gpu_memory_mb"),
        "devices": [
            {"part": s.get("part"), "host": s.get("host"), **(s.get("device") or {})} for s in summaries
        ],
        "parts": summaries,
        "failures": failures,
        "exit_code": exit_code,
        "aggregates": aggregate(ordered),
    })
    write_json(out / RUN, base)
    merged = [*score_parts.values(), *run_parts.values()]
    remove_parts(out, merged)
    return MergeResult(base, len(ordered), ok, len(failures), exit_code, sorted(p.label for p in {*score_parts, *runs}))


@contextmanager
def merge_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out/.xai-merge.lock``, released if the process dies; a no-op where
    fcntl is missing (Windows). The file stays: unlinking it would let a waiting process and a
    newcomer hold two locks on two inodes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge_if_complete(out: Path, part: Part) -> tuple[MergeResult | None, list[Part]]:
    """After a part finished without torchrun: the last of its layout to finish merges.
    Returns (merge result or None, parts still running)."""
    with merge_lock(out):
        score_parts, run_parts = list_parts(out)
        if not score_parts and not run_parts:
            return None, []  # another part merged everything meanwhile
        finished, _, _ = _finished(out, run_parts)
        missing = missing_parts(finished, part.count)
        if missing:
            return None, missing
        return merge_parts(out, layout=part.count), []


# --------------------------------------------------------------------------------------------
# torchrun coordination


class Group:
    """A gloo process group for one run: barrier and exit-code broadcast, nothing else.

    Joins a group the caller already initialised (and then leaves it alone)."""

    def __init__(self, env: DistEnv) -> None:
        import torch.distributed as dist

        self.env = env
        self.owned = False
        if not dist.is_available():
            raise ConfigError("torchrun launch, but this torch has no torch.distributed")
        if not dist.is_initialized():
            timeout = timedelta(seconds=float(os.environ.get("XAI_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
            try:
                dist.init_process_group(backend="gloo", timeout=timeout)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(
                    f"distributed launch: cannot join the process group ({e})",
                    "launch with torchrun (it sets MASTER_ADDR / MASTER_PORT), or run without it",
                ) from None
            self.owned = True

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.owned = False


def host() -> str:
    return socket.gethostname()
