"""Everything written under --out: the folder's layout (names below), atomic files (temporary
name, then ``os.replace``), a thread pool that encodes and writes while the next batch computes,
and scores.jsonl whose line for an image is appended only after all of that image's files exist.

Layout of a run folder::

    scores.jsonl        one record per image (xaicli/records.py), sorted by path at the end
    run.json            the run's manifest
    overlays/<stem>.<method>[.topK].<png|jpg>
    maps/<stem>.<method>[.topK].npy       (--save-maps)
    parts/scores.I-of-N.jsonl, parts/run.I-of-N.json   (a sharded run until it is merged)
    .xai-run.lock, .xai-part.I-of-N.lock, .xai-merge.lock   (advisory locks, lock.py)
    .xai-plan.json      the run's plan, compared by --resume and by the other parts
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError, StorageError, XaiError
from .lock import FOLDER_LOCK

SCORES = "scores.jsonl"
RUN = "run.json"
OVERLAYS = "overlays"
MAPS = "maps"
PARTS = "parts"
PLAN = ".xai-plan.json"  # the plan of the run in this folder, written at its start (see run.py)


def overlay_file(stem: str, suffix: str, fmt: str) -> str:
    """Where an overlay goes, relative to the run folder."""
    return f"{OVERLAYS}/{stem}{suffix}.{fmt}"


def map_file(stem: str, suffix: str) -> str:
    return f"{MAPS}/{stem}{suffix}.npy"


def output_error(e: OSError, out: Path, doing: str) -> XaiError:
    """An OSError met while writing under --out, as a message and an exit code: no permission is a
    usage error (2: choose another folder); a read-only file system, a full disk and I/O errors are
    the environment's (3: fix it, then --resume)."""
    what = f"--out {out}: {doing}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"{what}: permission denied", "choose a folder you can write to")
    if e.errno == errno.EROFS:
        return StorageError(f"{what}: read-only file system", "write to a folder on a writable file system")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{what}: no space left on the device (or quota exceeded)",
                            "free some space, then rerun with --resume: finished images are kept")
    if e.errno == errno.ENAMETOOLONG:
        return OutputError(f"{what}: name too long ({e.strerror})", "choose a shorter --out path")
    return StorageError(f"{what}: {e.strerror or e}", "check the file system, then rerun with --resume")


def check_out_dir(out: Path, input_path: Path) -> None:
    """What can be said of --out before anything is loaded or written: it is a folder (or will be),
    it does not hold the input, and the nearest existing folder on its path can be written to."""
    inp = input_path.resolve()
    o = out.resolve()
    if o == inp or o in inp.parents:
        raise OutputError(
            f"--out {out} contains the input {input_path}", "write results to a folder beside or inside the input"
        )
    check_writable(out, "--out", folder=True)


def check_writable(path: Path, flag: str, *, folder: bool) -> None:
    """``path`` (a folder, or a file when not ``folder``) can be created or replaced: checked
    before a command does its work, so that a bad --out is not found only at the end."""
    p = path.resolve()
    if p.exists() and p.is_dir() != folder:
        raise OutputError(f"{flag} {path} exists and is {'not ' if folder else ''}a folder",
                          "give a folder" if folder else "give a file name")
    existing = next((q for q in (p if folder else p.parent, *p.parents) if q.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise StorageError(f"{flag} {path}: {existing} is on a read-only file system",
                               "write to a folder on a writable file system")
        raise OutputError(f"{flag} {path}: {existing} is not writable (permission denied)",
                          "choose a folder you can write to")


def make_out_dir(out: Path) -> bool:
    """Create --out (and its parents); True when this call created it."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as e:
        raise output_error(e, out, "cannot create the folder") from None
    return True


def holds_run(out: Path, own: Sequence[Path] = ()) -> bool:
    """An earlier run's results are in ``out``: a scores.jsonl with a line, a run.json, or one of
    ``own`` (a part's files). An empty scores.jsonl (a run stopped before its first image) is none."""
    def has_content(p: Path) -> bool:
        try:
            return p.stat().st_size > 0
        except OSError:
            return False

    return has_content(out / SCORES) or (out / RUN).exists() or any(has_content(p) for p in own)


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool, own: Sequence[Path] = (), clear: bool = True) -> None:
    """Refuse to mix with an earlier run in --out unless --resume or --overwrite is given; clear
    it for --overwrite. Called with the folder's lock held (see lock.py). ``own``: the files that
    mark an earlier run of this process besides the merged ones (a part's own files; the other
    parts may be running). ``clear`` False leaves the deleting of --overwrite to another process
    (torchrun's rank 0)."""
    if holds_run(out, own) and not (resume or overwrite):
        raise OutputError(
            f"--out {out} already holds a run (scores.jsonl / run.json)",
            "add --resume to continue it, --overwrite to replace it, or choose another folder",
        )
    if overwrite and not resume and clear:
        try:
            for name in (SCORES, RUN, PLAN):
                (out / name).unlink(missing_ok=True)
            for sub in (OVERLAYS, MAPS, PARTS):
                if (out / sub).is_dir():
                    shutil.rmtree(out / sub)
        except OSError as e:
            raise output_error(e, out, "cannot clear the earlier run (--overwrite)") from None


def is_output_folder(path: Path) -> bool:
    """A folder written by xaicli: it holds a scores.jsonl, a run.json, a run's lock file or the
    part files of a sharded run (never read back as input)."""
    try:
        if (path / SCORES).is_file() or (path / RUN).is_file() or (path / FOLDER_LOCK).is_file():
            return True
        parts = path / PARTS
        return parts.is_dir() and any(_PART_FILE.match(p.name) for p in parts.iterdir())
    except OSError:
        return False


_PART_FILE = re.compile(r"^(scores|run)\.\d+-of-\d+\.(jsonl|json)$")


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # read once, single-threaded; os.umask would race with the writer threads
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def file_mode() -> int:
    """The permissions open() gives a new file under the process umask (read from /proc where it
    is, without changing it; else as it was at import)."""
    mask = _UMASK_AT_IMPORT
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    return 0o666 & ~mask
# A temporary name is the final name's start plus a random part: kept short enough for any final
# name the file system takes (255 bytes).
_TMP_NAME_BYTES = 120


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one. The file
    gets the permissions the process umask gives (mkstemp's own are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = os.fsencode(path.name)[:_TMP_NAME_BYTES]
    fd, tmp = tempfile.mkstemp(prefix=b"." + stem + b".", suffix=b".tmp", dir=os.fsencode(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps_line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default, allow_nan=False)


def encode_image(rgb: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG or JPEG bytes."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"cannot encode {fmt}")
    return buf.tobytes()


def encode_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ScoresFile:
    """Appends one JSON line per image: a line is written whole or not at all (a failed write is
    cut off again, so the file never holds half a line).
    Lines go straight to the file (no buffer). The file is created at the first line: a run that
    stops before its first image leaves none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.lines = 0  # appended by this object

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record``; OSError when it cannot be written whole (the file is left as before)."""
        line = (dumps_line(record) + "\n").encode()
        with self._lock:
            fd = self._fd if self._fd is not None else self._open()
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no torn line left behind
                raise
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def drop_torn_tail(path: Path) -> int:
    """Cut a last line left without its newline by a killed run, so the next appended record
    starts on a line of its own (glued to the fragment it would be lost). Returns bytes cut."""
    try:
        f = open(path, "rb+")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return 0
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            block = f.read(step)
            if pos == end and block.endswith(b"\n"):
                return 0
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                f.truncate(keep)
                return end - keep
            pos -= step
        f.truncate(0)
        return end


def scan_scores(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, damaged lines) of a scores.jsonl. A line that is not a JSON object with a
    ``path`` (a torn last line of a killed run, bytes that are not UTF-8, a damaged file) is
    skipped and counted: its image has no record, so ``--resume`` redoes it."""
    out: list[dict[str, Any]] = []
    damaged = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return out, 0
    with f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                damaged += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                out.append(rec)
            else:
                damaged += 1
    return out, damaged


def read_scores(path: Path) -> list[dict[str, Any]]:
    """Records of a scores.jsonl; torn or damaged lines are dropped (see scan_scores)."""
    return scan_scores(path)[0]


FileJob = tuple[Path, Callable[[], bytes]]


class Writer:
    """Encodes and writes an image's files on worker threads, then appends its record.

    At most ``max_pending`` images are in flight, so a slow disk slows the run rather than
    filling memory. A file that cannot be written turns the image's record into an error record
    (type ``write``); when even the scores line cannot be appended, the writer stops: ``failure``
    holds the error, ``submit`` and ``check`` raise it as a StorageError, and the images without a
    line are the ones ``--resume`` redoes. ``on_done`` sees exactly the records that were appended.
    """

    def __init__(self, scores: ScoresFile, threads: int = 4, max_pending: int = 64,
                 on_done: Callable[[dict[str, Any]], None] | None = None, out: Path | None = None) -> None:
        self.scores = scores
        self.out = out or scores.path.parent
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="xai-write")
        self.slots = threading.BoundedSemaphore(max(1, max_pending))
        self.on_done = on_done
        self.futures: list[Future[None]] = []
        self.failure: OSError | None = None

    def submit(self, record: dict[str, Any], jobs: list[FileJob]) -> None:
        self.check()
        self.slots.acquire()
        try:
            fut = self.pool.submit(self._run, record, jobs)
        except BaseException:
            self.slots.release()
            raise
        self.futures.append(fut)
        done = [f for f in self.futures if f.done()]
        self.futures = [f for f in self.futures if not f.done()]
        for f in done:
            f.result()  # an unexpected error on a writer thread is not lost

    def _run(self, record: dict[str, Any], jobs: list[FileJob]) -> None:
        try:
            if self.failure is not None:
                return  # the run is stopping: this image gets no line, and --resume redoes it
            try:
                for path, produce in jobs:
                    atomic_write(path, produce())
            except Exception as e:
                record = {**record, "status": "error",
                          "error": {"type": "write", "message": f"{type(e).__name__}: {e}"}}
            self._append(record)
        finally:
            self.slots.release()

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self.scores.append(record)
        except OSError as e:
            if record.get("status") == "ok":  # the line may fit as a short error line
                self._append_error(record, e)
                return
            self.failure = self.failure or e
            return
        if self.on_done is not None:
            self.on_done(record)

    def _append_error(self, record: dict[str, Any], e: OSError) -> None:
        err = {"path": record["path"], "status": "error",
               "error": {"type": "write", "message": f"cannot append to {SCORES}: {type(e).__name__}: {e}"}}
        try:
            self.scores.append(err)
        except OSError as e2:
            self.failure = self.failure or e2
            return
        if self.on_done is not None:
            self.on_done(err)

    def check(self) -> None:
        """Raise the write failure that stopped the writer, if any."""
        if self.failure is not None:
            raise output_error(self.failure, self.out, f"cannot append to {self.scores.path.name}")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        futures, self.futures = self.futures, []
        for f in futures:
            f.result()
