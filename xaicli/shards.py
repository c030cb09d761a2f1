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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

from .errors import ConfigError, OutputError
from .lock import (
    FOLDER_LOCK,
    FileLock,
    Holder,
    describe_holders,
    held_part_locks,
    part_lock_name,
    read_holder,
)
from .outputs import (
    PARTS,
    PLAN,
    RUN,
    SCORES,
    atomic_write,
    dumps_line,
    holds_run,
    output_error,
    read_scores,
    scan_scores,
    write_json,
)
from .records import merged_manifest, plan_differences, plan_of, read_json, record_files

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

    def lock_path(self, out: Path) -> Path:
        return out / part_lock_name(self.index, self.count)


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


def collect_records(out: Path, parts: Sequence[Path] | None = None,
                    damaged: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """One record per path from scores.jsonl and the scores parts (``parts``; default: every one
    present): later writes win (the base file first, then parts by modification time), so a
    re-done image replaces its old line. ``damaged`` receives file name -> lines skipped."""
    records: dict[str, dict[str, Any]] = {}
    if parts is None:
        parts = list(list_parts(out)[0].values())
    sources = [out / SCORES, *sorted(parts, key=lambda p: (p.stat().st_mtime_ns, p.name))]
    for src in sources:
        recs, bad = scan_scores(src)
        if bad and damaged is not None:
            damaged[src.relative_to(out).as_posix()] = bad
        for r in recs:
            records[r["path"]] = r
    return records


def done_images(out: Path) -> dict[str, dict[str, Any]]:
    """Records of images already complete in ``out`` (any part): status ok and every file present."""
    done = {}
    for path, r in collect_records(out).items():
        if r.get("status") != "ok":
            continue
        if all((out / f).is_file() for f in record_files(r)):
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
    (resumed here in one piece, under the folder's exclusive lock) become one sorted scores.jsonl;
    those parts are removed."""
    score_parts, run_parts = list_parts(out)
    ordered = write_scores(out, collect_records(out, list(score_parts.values())))
    remove_parts(out, [*score_parts.values(), *run_parts.values()])
    return ordered


# --------------------------------------------------------------------------------------------
# Merging run.json


@dataclass
class MergeResult:
    run: dict[str, Any]
    records: int
    ok: int
    failed: int
    exit_code: int
    merged_parts: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # parts not finished (run.json's incomplete_parts)
    notes: list[str] = field(default_factory=list)  # e.g. damaged lines skipped


def _finished(out: Path, run_parts: dict[Part, Path]) -> tuple[set[Part], dict[Part, dict[str, Any]], dict | None]:
    """Parts known to have finished: a run part on disk, or one recorded by an earlier merge."""
    runs = {p: r for p, path in sorted(run_parts.items()) if (r := read_json(path)) is not None}
    prev = read_json(out / RUN)
    done = set(runs)
    for s in (prev or {}).get("parts") or []:
        if isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("count"), int):
            done.add(Part(s["index"], s["count"]))
    return done, runs, prev


def missing_parts(finished: set[Part], count: int) -> list[Part]:
    return [Part(i, count) for i in range(count) if Part(i, count) not in finished]


@contextmanager
def claim_parts(out: Path, parts: Iterable[Part]) -> Iterator[tuple[set[Part], dict[Part, Holder | None]]]:
    """Take the lock of each part to merge (see lock.py), without waiting: (claimed, running). A
    running part's files are never read for the merge, rewritten or removed: it merges itself
    when it finishes. The claims are held until the merge is over."""
    held: list[FileLock] = []
    claimed: set[Part] = set()
    running: dict[Part, Holder | None] = {}
    try:
        for p in sorted(set(parts)):
            lk = FileLock(p.lock_path(out), what=f"xai merge (part {p.label})")
            try:
                got = lk.acquire()
            except OSError as e:
                raise output_error(e, out, "cannot create a lock file") from None
            if got:
                held.append(lk)
                claimed.add(p)
            else:
                running[p] = read_holder(p.lock_path(out))
        yield claimed, running
    finally:
        for lk in held:
            lk.release(unlink=True)  # merged parts need no lock file; a newcomer makes its own


def merge_parts(out: Path, *, layout: int | None = None, partial: bool = False) -> MergeResult | None:
    """Merge ``out/parts`` into scores.jsonl and run.json and remove the merged parts; parts
    another process is running are left alone (claim_parts).

    ``layout``: merge only when every part of that many has finished (None is returned
    otherwise); without it (``xai merge``) some layout must be complete unless ``partial``.
    Returns None when there was nothing to merge or the layout is not complete yet.
    """
    if not out.is_dir():
        raise OutputError(f"{out}: no such folder", "pass the --out folder of a sharded run")
    score_parts, run_parts = list_parts(out)
    if not score_parts and not run_parts:
        return None
    with claim_parts(out, [*score_parts, *run_parts]) as (claimed, running):
        score_parts = {p: f for p, f in score_parts.items() if p in claimed}
        run_parts = {p: f for p, f in run_parts.items() if p in claimed}
        finished, runs, prev = _finished(out, run_parts)
        layouts = sorted({p.count for p in [*claimed, *running]})
        if layout is not None:
            if missing_parts(finished, layout):
                return None
        elif not partial and not any(not missing_parts(finished, n) for n in layouts):
            raise OutputError(f"{out}: the sharded run is incomplete ({_gaps(finished, layouts, running)})",
                              "rerun the missing parts with --resume --shard I/N (the same N), or merge what is "
                              "there with `xai merge --partial` (a running part is never touched)")
        if not score_parts and not run_parts:
            return None
        return _merge_claimed(out, score_parts, run_parts, (finished, runs, prev), layouts, running)


def _gaps(finished: set[Part], layouts: list[int], running: Mapping[Part, Holder | None]) -> str:
    out = []
    for n in layouts:
        labels = [p.label + (f" running: {describe_holders([running[p]])}" if p in running else "")
                  for p in missing_parts(finished, n)]
        out.append(f"{', '.join(labels)} not finished")
    return "; ".join(out)


def _merge_claimed(out: Path, score_parts: dict[Part, Path], run_parts: dict[Part, Path],
                   state: tuple[set[Part], dict[Part, dict[str, Any]], dict | None], layouts: list[int],
                   running: Mapping[Part, Holder | None]) -> MergeResult:
    """The merge proper, over the claimed parts' files."""
    from .metrics.summary import aggregate

    finished, runs, prev = state
    damaged: dict[str, int] = {}
    ordered = write_scores(out, collect_records(out, list(score_parts.values()), damaged))
    new = [runs[p] for p in sorted(runs)]
    kept = [s for s in (prev or {}).get("parts") or []
            if isinstance(s, dict) and Part(s.get("index", -1), s.get("count", 0)) not in runs]
    base = merged_manifest(new, prev, kept, ordered)
    base["aggregates"] = aggregate(ordered)
    complete = [n for n in layouts if not missing_parts(finished, n)]
    incomplete = [] if complete else [p.label for n in layouts for p in missing_parts(finished, n)]
    base["incomplete_parts"] = incomplete
    write_json(out / RUN, base)
    remove_parts(out, [*score_parts.values(), *run_parts.values()])
    if not incomplete and not running:
        (out / PLAN).unlink(missing_ok=True)  # run.json holds the plan now
    failed = len(base["failures"])
    notes = [f"{n} damaged line(s) in {name} skipped: rerun with --resume to redo their images"
             for name, n in damaged.items()]
    notes += [f"part {p.label} is still running ({describe_holders([h])}): it merges itself when it finishes"
              for p, h in sorted(running.items())]
    return MergeResult(base, len(ordered), len(ordered) - failed, failed, base["exit_code"],
                       sorted(p.label for p in {*score_parts, *runs}), incomplete, notes)


@contextmanager
def merge_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out/.xai-merge.lock`` while parts are merged (one merge at a time),
    released if the process dies; a no-op where fcntl is missing (Windows). The file stays:
    unlinking it would let a waiting process and a newcomer hold two locks on two inodes."""
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
    """After a part finished (and let go of its own part lock) without torchrun: the last of its
    layout to finish merges. Returns (merge result or None, parts still running)."""
    with merge_lock(out):
        score_parts, run_parts = list_parts(out)
        if not score_parts and not run_parts:
            return None, []  # another part merged everything meanwhile
        finished, _, _ = _finished(out, run_parts)
        missing = missing_parts(finished, part.count)
        if missing:
            return None, missing
        merged = merge_parts(out, layout=part.count)
        if merged is None:  # a part of the layout is running again (--resume): it merges when done
            return None, [p for p in running_parts(out) if p.count == part.count]
        return merged, []


def running_parts(out: Path) -> list[Part]:
    """Parts whose lock some process holds now."""
    found = []
    for path, _ in held_part_locks(out):
        m = re.match(r"^\.xai-part\.(\d+)-of-(\d+)\.lock$", path.name)
        if m:
            found.append(Part(int(m.group(1)), int(m.group(2))))
    return found


def merge_folder(out: Path, *, partial: bool = False) -> MergeResult | None:
    """`xai merge`: the parts of a sharded run merged by hand, beside running parts (shared folder
    lock; their files are left alone) but never beside an unsharded run of the folder."""
    if not out.is_dir():
        raise OutputError(f"{out}: no such folder", "pass the --out folder of a sharded run")
    folder = FileLock(out / FOLDER_LOCK, shared=True, what="xai merge")
    try:
        got = folder.acquire_or_wait_stale()
    except OSError as e:
        raise output_error(e, out, "cannot create the lock file") from None
    if not got:
        raise OutputError(f"{out} is in use by {describe_holders([read_holder(out / FOLDER_LOCK)])}",
                          "wait for that run to finish; it merges any parts itself")
    try:
        with merge_lock(out):
            return merge_parts(out, partial=partial)
    finally:
        folder.release()


# --------------------------------------------------------------------------------------------
# The layout of one process's share of a run

T = TypeVar("T")


@dataclass
class Finish:
    """How a process's share of a run ended. ``complete``: this process wrote the whole run's
    scores.jsonl and run.json (unsharded, or it merged the parts); ``run`` is then the whole run's
    manifest, else its part's."""

    run: dict[str, Any]
    exit_code: int
    merged: MergeResult | None = None
    pending: list[str] = field(default_factory=list)  # parts of the layout still running
    complete: bool = False


@dataclass
class Layout:
    """Where one process's share of a run goes: the whole run (``Layout(out)``), or one part of a
    run split by ``--shard`` and/or torchrun. The one place that knows the difference: which images
    this process takes, which files it writes, and how the run finishes (merging the parts)."""

    out: Path
    part: Part | None = None
    dist: DistEnv | None = None
    group: Group | None = None
    locks: list[FileLock] = field(default_factory=list)  # held while this process runs its share

    @staticmethod
    def for_process(out: Path, shard: tuple[int, int] | None) -> Layout:
        """The layout of this process: ``--shard I/N`` and the torchrun environment, if any."""
        dist = dist_env()
        return Layout(out, part_for(shard, dist), dist)

    def select(self, entries: Sequence[T]) -> list[T]:
        """This process's share of the sorted image list."""
        return list(entries[self.part.index :: self.part.count]) if self.part is not None else list(entries)

    @contextmanager
    def joined(self) -> Iterator[Layout]:
        """Inside, a torchrun process belongs to the job's process group (barriers, exit codes)."""
        self.group = Group(self.dist) if self.dist is not None else None
        try:
            yield self
        except BaseException:
            self._leave(together=False)
            raise
        self._leave(together=True)

    def _leave(self, together: bool) -> None:
        if self.group is not None:
            self.group.close(together)
        self.group = None

    @contextmanager
    def locked(self, what: str) -> Iterator[Layout]:
        """Inside, this process holds the output folder for its share (see lock.py): the folder
        lock, exclusive for a whole run and shared by the parts, and its part's own lock. Another
        process holding what it needs: OutputError naming that process (exit 2)."""
        folder = FileLock(self.out / FOLDER_LOCK, shared=self.part is not None, what=what)
        try:
            if not folder.acquire_or_wait_stale():
                raise self._busy(folder)
            self.locks.append(folder)
            if self.part is not None:
                own = FileLock(self.part.lock_path(self.out), what=what)
                if not own.acquire_or_wait_stale():
                    raise OutputError(f"part {self.part.label} of {self.out} is already running: "
                                      f"{describe_holders([own.holder()])}",
                                      "a part runs in one process at a time; once it has stopped, "
                                      f"--resume --shard {self.part.label} continues it")
                self.locks.append(own)
        except OSError as e:
            self.release_locks()
            raise output_error(e, self.out, "cannot create the lock file") from None
        except BaseException:
            self.release_locks()
            raise
        try:
            yield self
        except BaseException:
            self.release_locks()
            raise
        self.release_locks(unlink=self.part is None)  # a whole run that finished leaves no lock file

    def _busy(self, folder: FileLock) -> OutputError:
        """The refusal when the folder lock is taken: by an unsharded run, or by running parts."""
        parts = held_part_locks(self.out)
        if parts and self.part is None:
            who = describe_holders([h for _, h in parts])
            return OutputError(f"--out {self.out} is in use by a sharded run: {who}",
                               "a run without --shard cannot share a folder with running parts: wait for them, "
                               "or choose another --out")
        holder = folder.holder()
        return OutputError(f"--out {self.out} is in use by another run: {describe_holders([holder])}",
                           "two runs on one folder would overwrite each other's results: wait for it to finish "
                           "(then --resume continues it), or choose another --out")

    @contextmanager
    def tidy_if_unstarted(self, created: bool) -> Iterator[None]:
        """A run that stops before its first image (a model that does not load, a refused plan,
        Ctrl-C) leaves nothing behind: no empty scores file, no plan, and no folder it created."""
        try:
            yield
        except BaseException:
            self._tidy(created)
            raise

    def _tidy(self, created: bool) -> None:
        try:
            if self.scores_path.stat().st_size > 0:
                return
            self.scores_path.unlink()
        except OSError:
            pass
        if self.part is not None or holds_run(self.out) or list_parts(self.out) != ({}, {}):
            return
        with contextlib.suppress(OSError):
            (self.out / PLAN).unlink(missing_ok=True)
            ours = {FOLDER_LOCK, LOCK}  # held exclusively by this whole run: safe to remove (lock.py)
            if {p.name for p in self.out.iterdir()} <= ours:
                for name in ours:
                    (self.out / name).unlink(missing_ok=True)
                if created:
                    self.out.rmdir()

    def adopt_plan(self, described: dict[str, Any], *, resume: bool) -> None:
        """Compare this process's plan (records.plan_of: model, weights, layer, methods and
        knobs, target, ...) with the run already in the folder, then record it as the folder's
        plan file. A part always compares (the parts of a run must agree), a whole run when it
        resumes; a difference is a ConfigError listing it. Under the merge lock: parts starting
        together see each other's plans."""
        mine = plan_of(described)
        with merge_lock(self.out) if self.part is not None else contextlib.nullcontext():
            if resume or self.part is not None:
                for source, earlier in self._earlier_plans():
                    diffs = plan_differences(earlier, mine)
                    if diffs:
                        raise self._plan_refusal(source, diffs, resume)
            write_json(self.out / PLAN, described)

    def _earlier_plans(self) -> list[tuple[str, dict[str, Any]]]:
        """The plans recorded in the folder, when it holds results or running parts."""
        own_lock = self.part.lock_path(self.out) if self.part is not None else None
        running = [p for p, _ in held_part_locks(self.out) if p != own_lock]
        _, run_parts = list_parts(self.out)
        has_results = holds_run(self.out) or any(list_parts(self.out)) or running
        if not has_results:
            return []
        sources = [self.out / PLAN, self.out / RUN, *sorted(run_parts.values())]
        return [(p.relative_to(self.out).as_posix(), plan_of(r)) for p in sources if (r := read_json(p)) is not None]

    def _plan_refusal(self, source: str, diffs: list[str], resume: bool) -> ConfigError:
        what = "--resume" if resume else f"--shard {self.part.label}" if self.part is not None else "this run"
        shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
        return ConfigError(
            f"{what}: the run in {self.out} was made with another plan ({source}):\n    " + "\n    ".join(shown),
            "resume with the config and flags of that run, or write to another --out (--overwrite starts it again)",
        )

    def release_locks(self, unlink: bool = False) -> None:
        while self.locks:
            self.locks.pop().release(unlink)

    def release_part_lock(self) -> None:
        """A finished part lets go of its own lock before merging, so that the merging process
        (this one or another part) can claim it (see claim_parts)."""
        if self.part is not None and len(self.locks) > 1:
            self.locks.pop().release()

    @property
    def is_main(self) -> bool:
        """The process that clears an --overwrite and merges under torchrun (every process alone)."""
        return self.group is None or self.group.is_main

    def barrier(self) -> None:
        if self.group is not None:
            self.group.barrier()

    def device(self, device: torch.device) -> torch.device:
        """Under torchrun each process takes the GPU of its local rank."""
        import torch

        if self.dist is not None and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        return device

    @property
    def scores_path(self) -> Path:
        return self.part.scores_path(self.out) if self.part is not None else self.out / SCORES

    def own_files(self) -> list[Path]:
        """Files besides the merged ones that mark an earlier run of this part."""
        return [self.part.scores_path(self.out), self.part.run_path(self.out)] if self.part is not None else []

    def done(self) -> dict[str, dict[str, Any]]:
        """Images already complete in the folder (for --resume)."""
        return done_images(self.out)

    def seal(self) -> list[dict[str, Any]]:
        """The records of this process's share once its writing is over: unsharded, scores.jsonl
        sorted (with any parts an earlier sharded run left, which it absorbs); a part, its file."""
        if self.part is not None:
            return read_scores(self.scores_path)
        return finalize_unsharded(self.out)

    def describe(self) -> dict[str, Any] | None:
        """The ``part`` entry of run.json."""
        if self.part is None:
            return None
        return {"label": self.part.label, "index": self.part.index, "count": self.part.count,
                "rank": self.dist.rank if self.dist else None, "world_size": self.dist.world if self.dist else None}

    def finish(self, run: dict[str, Any]) -> Finish:
        """Write this share's run.json; a part then merges the layout if it is the last to finish
        (under torchrun, rank 0 after a barrier, and every rank gets the merged exit code)."""
        if self.part is None:
            write_json(self.out / RUN, run)
            (self.out / PLAN).unlink(missing_ok=True)  # run.json holds the plan now
            return Finish(run, run["exit_code"], complete=True)
        write_json(self.part.run_path(self.out), run)
        self.release_part_lock()
        if self.group is not None:
            self.group.barrier()
            merged, pending = merge_if_complete(self.out, self.part) if self.group.is_main else (None, [])
            code = self.group.broadcast(merged.exit_code if merged is not None else run["exit_code"])
        else:
            merged, pending = merge_if_complete(self.out, self.part)
            code = merged.exit_code if merged is not None else run["exit_code"]
        whole = merged.run if merged is not None else run
        return Finish(whole, code, merged, [p.label for p in pending], complete=merged is not None)


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

    def close(self, together: bool = False) -> None:
        """Leave the group. ``together`` (a run that ended normally): a last barrier first, so no rank
        tears its connections down while another still has work on the group (rank 0 writes the
        merged report after the others are done; gloo can abort a process whose peer has gone)."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            if together:
                with contextlib.suppress(RuntimeError):
                    dist.barrier()
            dist.destroy_process_group()
        self.owned = False
