"""Everything written under --out: the folder's layout (names below), atomic files (temporary
name, then ``os.replace``), a thread pool that encodes and writes while the next batch computes,
and scores.jsonl whose line for an image is appended only after all of that image's files exist.

Layout of a run folder::

    scores.jsonl        one record per image (xaicli/records.py), sorted by path at the end
    run.json            the run's manifest
    overlays/<stem>.<method>[.topK].<png|jpg>
    maps/<stem>.<method>[.topK].npy       (--save-maps)
    parts/scores.I-of-N.jsonl, parts/run.I-of-N.json   (a sharded run until it is merged)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError

SCORES = "scores.jsonl"
RUN = "run.json"
OVERLAYS = "overlays"
MAPS = "maps"
PARTS = "parts"


def overlay_file(stem: str, suffix: str, fmt: str) -> str:
    """Where an overlay goes, relative to the run folder."""
    return f"{OVERLAYS}/{stem}{suffix}.{fmt}"


def map_file(stem: str, suffix: str) -> str:
    return f"{MAPS}/{stem}{suffix}.npy"


def prepare_out_dir(out: Path, input_path: Path, *, resume: bool, overwrite: bool, own: Sequence[Path] = (),
                    clear: bool = True) -> None:
    """Create --out; refuse to mix with an earlier run unless --resume or --overwrite is given.
    The input is never modified: --out may not be the input folder or lie above it. ``own``: the
    files that mark an earlier run of this process besides the merged ones (a part's own files;
    the other parts may be running). ``clear`` False leaves the deleting of --overwrite to another
    process (torchrun's rank 0)."""
    inp = input_path.resolve()
    o = out.resolve()
    if o == inp or o in inp.parents:
        raise OutputError(
            f"--out {out} contains the input {input_path}", "write results to a folder beside or inside the input"
        )
    if o.exists() and not o.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    existing = (o / SCORES).exists() or (o / RUN).exists() or any(p.exists() for p in own)
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
        for sub in (OVERLAYS, MAPS, PARTS):
            if (o / sub).is_dir():
                shutil.rmtree(o / sub)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
    """Appends one JSON line per image; a line is written whole and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def append(self, record: dict[str, Any]) -> None:
        line = dumps_line(record) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


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


def read_scores(path: Path) -> list[dict[str, Any]]:
    """Records of a scores.jsonl; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


FileJob = tuple[Path, Callable[[], bytes]]


class Writer:
    """Encodes and writes an image's files on worker threads, then appends its record.

    At most ``max_pending`` images are in flight, so a slow disk slows the run rather than
    filling memory. A failed write turns the record into an error; it never stops the run.
    """

    def __init__(self, scores: ScoresFile, threads: int = 4, max_pending: int = 64,
                 on_done: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.scores = scores
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="xai-write")
        self.slots = threading.BoundedSemaphore(max(1, max_pending))
        self.on_done = on_done
        self.futures: list[Future[None]] = []

    def submit(self, record: dict[str, Any], jobs: list[FileJob]) -> None:
        self.slots.acquire()
        try:
            fut = self.pool.submit(self._run, record, jobs)
        except BaseException:
            self.slots.release()
            raise
        self.futures.append(fut)
        self.futures = [f for f in self.futures if not f.done()]

    def _run(self, record: dict[str, Any], jobs: list[FileJob]) -> None:
        try:
            for path, produce in jobs:
                atomic_write(path, produce())
        except Exception as e:
            record = {**record, "status": "error",
                      "error": {"type": "write", "message": f"{type(e).__name__}: {e}"}}
        finally:
            self.slots.release()
        self.scores.append(record)
        if self.on_done is not None:
            self.on_done(record)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()
