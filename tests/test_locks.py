"""One output folder, several processes (issue 16, items 1 and 2, and the signals): real `xai`
processes on real files, a slow network so that they meet, every wait bounded.

A run holds its --out folder for its whole life (xaicli/lock.py): a second run, a --resume or a
shard of another layout is refused naming the holder; the parts of one sharded run share it; a
merge never touches a part that is still running; SIGTERM and SIGHUP stop a run like Ctrl-C."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_CONFIG, write_images
from xaicli.config import load_config
from xaicli.errors import OutputError
from xaicli.lock import FOLDER_LOCK, FileLock, read_holder
from xaicli.outputs import SCORES
from xaicli.run import merge_run, run_explain

N_IMAGES = 9
TIMEOUT_S = 180  # any one process; they normally take a few seconds


def slow_config(tmp_path: Path, hold: Path | None = None, name: str = "slow") -> Path:
    """The tiny network in batches of one; with ``hold``, its forward waits while that file exists."""
    kwargs = "{num_classes: 5" + (f", hold: '{hold}'" if hold else "") + "}"
    text = TINY_CONFIG.format(method="gradcam").replace(
        "factory: tests.nets:gap_net", "factory: tests.nets:slow_net").replace(
        "kwargs: {num_classes: 5}", f"kwargs: {kwargs}").replace("batch_size: 4", "batch_size: 1")
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


class Hold:
    """A file that keeps the slow network waiting (tests/nets.py::SlowNet) until released."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "hold"
        self.path.touch()
        self.reached = Path(str(self.path) + ".reached")

    def wait_reached(self, proc: subprocess.Popen[str], lock: Path) -> None:
        """Until ``proc`` holds ``lock`` and waits in its model's forward (past setup)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1]}")
            holder = read_holder(lock)
            if holder is not None and holder.pid == proc.pid and self.reached.exists():
                return
            time.sleep(0.05)
        proc.kill()
        raise AssertionError("the run never reached its model")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    write_images(d, n=N_IMAGES)
    return d


def start(*args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "xaicli.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def paths(path: Path) -> list[str]:
    return [json.loads(line)["path"] for line in path.read_text().splitlines()]


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(folder: Path, tmp_path: Path,
                                                                    tiny_config) -> None:
    out = tmp_path / "out"
    hold = Hold(tmp_path)
    first = start("explain", folder, "-c", slow_config(tmp_path, hold.path), "-o", out, "-q")
    hold.wait_reached(first, out / FOLDER_LOCK)
    other = tmp_path / "other"
    write_images(other, n=3, seed=7)
    cfg = load_config(tiny_config())
    for flags in ({}, {"resume": True}, {"overwrite": True}, {"shard": (1, 2)}):
        with pytest.raises(OutputError) as e:
            run_explain(cfg, other, out, **flags)
        assert f"PID {first.pid}" in e.value.message, flags  # the holder is named, with its start time
        assert "started" in e.value.message
    hold.release()
    code, err = finish(first)
    assert code == 0, err
    assert sorted(paths(out / SCORES)) == sorted(p.name for p in folder.iterdir())  # nothing of the other input
    run = json.loads((out / "run.json").read_text())
    assert run["input"] == str(folder) and run["counts"]["ok"] == N_IMAGES
    assert not (out / FOLDER_LOCK).exists()  # a finished run leaves no lock file


def test_parts_share_a_folder_and_a_partial_merge_never_touches_a_running_part(folder: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    hold = Hold(tmp_path)
    part0 = start("explain", folder, "-c", slow_config(tmp_path, hold.path), "-o", out, "--shard", "0/2", "-q")
    hold.wait_reached(part0, out / ".xai-part.0-of-2.lock")
    (out / "parts").mkdir(exist_ok=True)
    cfg = load_config(slow_config(tmp_path, name="fast"))  # the same network and plan, never held
    one = run_explain(cfg, folder, out, shard=(1, 2))  # beside it: allowed
    assert one.exit_code == 0 and one.pending == ["0/2"] and one.merged is None
    with pytest.raises(OutputError, match=f"part 0/2 of .* is already running: PID {part0.pid}"):
        run_explain(cfg, folder, out, shard=(0, 2), resume=True)
    with pytest.raises(OutputError, match=f"in use by a sharded run: PID {part0.pid}"):
        run_explain(cfg, folder, out, resume=True)
    merged = merge_run(out, partial=True)  # `xai merge --partial` while part 0/2 runs
    assert merged is not None and merged.incomplete == ["0/2"] and merged.merged_parts == ["1/2"]
    run = json.loads((out / "run.json").read_text())
    assert run["incomplete_parts"] == ["0/2"]
    hold.release()
    code, err = finish(part0)
    assert code == 0, err
    assert "merged parts 0/2" not in err  # quiet
    assert sorted(paths(out / SCORES)) == sorted(p.name for p in folder.iterdir())  # all 9: nothing lost
    run = json.loads((out / "run.json").read_text())
    assert run["incomplete_parts"] == [] and run["counts"]["ok"] == N_IMAGES and run["exit_code"] == 0
    assert not (out / "parts").exists()


def test_a_run_killed_with_sigkill_leaves_no_stale_lock(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hold = Hold(tmp_path)
    proc = start("explain", folder, "-c", slow_config(tmp_path, hold.path), "-o", out, "-q")
    hold.wait_reached(proc, out / FOLDER_LOCK)
    proc.kill()
    proc.wait(timeout=TIMEOUT_S)
    assert read_holder(out / FOLDER_LOCK).pid == proc.pid  # its record stays, its lock does not
    res = run_explain(load_config(slow_config(tmp_path, name="fast")), folder, out, resume=True)
    assert res.exit_code == 0 and res.ok == N_IMAGES
    assert sorted(paths(out / SCORES)) == sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_like_ctrl_c(folder: Path, tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "out"
    hold = Hold(tmp_path)
    proc = start("explain", folder, "-c", slow_config(tmp_path, hold.path), "-o", out)
    hold.wait_reached(proc, out / FOLDER_LOCK)
    proc.send_signal(sig)
    got, err = finish(proc)
    assert got == code, err
    assert f"interrupted ({signal.Signals(sig).name})" in err and "rerun with --resume" in err
    res = run_explain(load_config(slow_config(tmp_path, name="fast")), folder, out, resume=True)
    assert res.exit_code == 0 and res.ok == N_IMAGES


def _hold_in_child(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    ready.set()
    time.sleep(3)


def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    """A loader worker forked while the run holds its lock closes its copy: the lock ends with the run."""
    path = tmp_path / "x.lock"
    lk = FileLock(path, what="test")
    assert lk.acquire()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_in_child, args=(str(path), ready))
    child.start()
    try:
        assert ready.wait(30)
        assert not FileLock(path).acquire()  # held by us
        lk.release()
        again = FileLock(path)
        assert again.acquire()  # not held by the child any more
        again.release()
    finally:
        child.join(10)
