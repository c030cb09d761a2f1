"""An adversarial probe of `xai explain` and friends: the faults of docs/reliability.md, each
tried on real processes and real files, with the lines lost counted.

    python tools/probe_reliability.py [--skip NAME,...] [--only NAME,...]

The xaicli on sys.path (PYTHONPATH) is probed, so the same script measures an older checkout:
``PYTHONPATH=/path/to/old python tools/probe_reliability.py``. It prints one row per case (issue
item, name, PASS/FAIL, lines lost, what happened) and the totals: cases tried, faults injected,
lines lost. Cases that need root (tmpfs mounts) are skipped without it. ``workers_1000`` forks a
thousand processes on a version without the cap: skip it there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TIMEOUT_S = 300

NETS = '''
import time
from pathlib import Path
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=5, hold=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.hold = hold

    def forward(self, x):
        if self.hold and x.abs().sum() > 0 and Path(self.hold).exists():
            Path(self.hold + ".reached").touch()
            t = time.monotonic()
            while Path(self.hold).exists() and time.monotonic() - t < 120:
                time.sleep(0.05)
        return self.fc(self.features(x).mean((2, 3)))


def net(num_classes=5, hold=None, seed=0):
    return Net(num_classes, hold, seed)
'''

CONFIG = """model:
  source: factory
  factory: probe_nets:net
  kwargs: {{num_classes: 5{extra_kwargs}}}
preprocess: {{resize: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
target_layer: features
method: {method}
runtime: {{device: cpu, batch_size: {batch}, workers: 0}}
"""


@dataclass
class Outcome:
    ok: bool
    detail: str
    lost: int = 0  # images that should have a line (ok or error) and have none, or lost a line
    faults: int = 1  # faults injected by the case


class Probe:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "probe_nets.py").write_text(NETS)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        self.env.pop("WORLD_SIZE", None)
        self.n = 0

    def dir(self, name: str) -> Path:
        self.n += 1
        d = self.root / f"{self.n:02d}-{name}"
        d.mkdir()
        return d

    def images(self, d: Path, n: int = 8, size: tuple[int, int] = (48, 64)) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(str(d)))
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
        return d

    def config(self, d: Path, method: str = "gradcam", batch: int = 4, extra: str = "", hold: Path | None = None,
               kwargs: str = "") -> Path:
        extra_kwargs = (f", hold: '{hold}'" if hold else "") + kwargs
        p = d / f"cfg-{method.replace(',', '_')}-{batch}-{abs(hash((extra, str(hold), kwargs))) % 10**6}.yaml"
        p.write_text(CONFIG.format(method=method, batch=batch, extra_kwargs=extra_kwargs) + extra)
        return p

    def cmd(self, *args: object) -> list[str]:
        return [sys.executable, "-c", "from xaicli.cli import main; main()", *map(str, args)]

    def xai(self, *args: object, timeout: float = TIMEOUT_S, memory_gb: float | None = None,
            wrap: list[str] | None = None) -> tuple[int, str]:
        """Run `xai ARGS` in its own session (killed whole on timeout), optionally under an
        address-space limit, optionally behind a ``wrap`` command."""
        def limit() -> None:
            if memory_gb:
                cap = int(memory_gb * 2**30)
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        proc = subprocess.Popen([*(wrap or []), *self.cmd(*args)], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.root, start_new_session=True,
                                preexec_fn=limit)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return -9, "timed out"
        return proc.returncode, out + err

    def start(self, *args: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.root)

    @staticmethod
    def wait_file(p: Path, proc: subprocess.Popen[str] | None = None, timeout: float = TIMEOUT_S) -> bool:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if p.exists():
                return True
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    @staticmethod
    def lines(out: Path, name: str = "scores.jsonl") -> list[dict]:
        p = out / name
        if not p.is_file():
            return []
        return [json.loads(x) for x in p.read_bytes().decode("utf-8", "replace").splitlines() if x.strip()]

    def lost(self, out: Path, images: Path) -> int:
        want = {p.name for p in images.iterdir() if p.is_file()}
        have = {r.get("path") for r in self.lines(out)}
        return len(want - have)


def mount(d: Path, opts: str) -> bool:
    d.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True).returncode == 0


def umount(d: Path) -> None:
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


# --------------------------------------------------------------------------------------------
# Cases: (issue item, name, function)


def two_runs(p: Probe) -> Outcome:
    d = p.dir("two-runs")
    a_in, b_in = p.images(d / "a"), p.images(d / "b", n=3)
    hold = d / "hold"
    hold.touch()
    out = d / "out"
    a = p.start("explain", a_in, "-c", p.config(d, batch=1, hold=hold), "-o", out, "-q")
    if not p.wait_file(Path(str(hold) + ".reached"), a):
        return Outcome(False, "first run never started: " + a.communicate()[1][-300:])
    rb, _text = p.xai("explain", b_in, "-c", p.config(d), "-o", out, "-q", "--resume")
    hold.unlink()
    ra = a.wait(TIMEOUT_S)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    lost = p.lost(out, a_in)
    ok = rb == 2 and ra == 0 and lost == 0 and run.get("input") == str(a_in)
    return Outcome(ok, f"second run exit {rb}, first exit {ra}, run.json input {'A' if run.get('input') == str(a_in) else 'B'}",
                   lost)


def merge_partial(p: Probe) -> Outcome:
    d = p.dir("merge-partial")
    images = p.images(d / "in", n=12)
    hold = d / "hold"
    hold.touch()
    out = d / "out"
    a = p.start("explain", images, "-c", p.config(d, batch=1, hold=hold), "-o", out, "--shard", "0/2", "-q")
    if not p.wait_file(Path(str(hold) + ".reached"), a):
        return Outcome(False, "part 0 never started")
    r1, _ = p.xai("explain", images, "-c", p.config(d, batch=1), "-o", out, "--shard", "1/2", "-q")
    rm, _ = p.xai("merge", out, "--partial", "-q")
    hold.unlink()
    ra = a.wait(TIMEOUT_S)
    p.xai("merge", out, "-q")  # whatever is left, by hand
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    lost = p.lost(out, images)
    ok = lost == 0 and r1 == ra == rm == 0 and run.get("counts", {}).get("ok") == 12
    return Outcome(ok, f"exits {r1}/{rm}/{ra}, {len(p.lines(out))} of 12 lines", lost)


def disk_full(p: Probe) -> Outcome:
    d = p.dir("disk-full")
    images = p.images(d / "in", n=30, size=(120, 160))
    mnt = d / "mnt"
    if not mount(mnt, "size=2m"):
        return Outcome(True, "skipped: cannot mount a tmpfs", faults=0)
    try:
        (mnt / "filler").write_bytes(b"\0" * (1850 * 1024))
        out = mnt / "out"
        cfg = p.config(d)
        r1, text = p.xai("explain", images, "-c", cfg, "-o", out)
        recs = p.lines(out)
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None
        honest = run is None or (run["counts"]["ok"] == sum(r["status"] == "ok" for r in recs)
                                 and run["counts"]["failed"] == sum(r["status"] != "ok" for r in recs))
        silent = 30 - len({r["path"] for r in recs}) if r1 in (0, 1) else 0  # missing lines, exit 0/1
        (mnt / "filler").unlink()
        r2, _ = p.xai("explain", images, "-c", cfg, "-o", out, "--resume")
        lost = p.lost(out, images) + silent
        ok = r1 in (1, 3) and "internal error" not in text and honest and r2 == 0 and lost == 0
        return Outcome(ok, f"full: exit {r1}, {len(recs)} lines, counts {'match' if honest else 'DO NOT match'}; "
                           f"resume exit {r2}", lost)
    finally:
        umount(mnt)


def resume_changed(p: Probe) -> Outcome:
    d = p.dir("resume-changed")
    images = p.images(d / "in", n=6)
    out = d / "out"
    p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    r, text = p.xai("explain", images, "-c", p.config(d), "-o", out, "-m", "eigencam", "--resume")
    methods = {e["method"] for rec in p.lines(out) for e in rec.get("explanations", [])}
    ok = r == 2 and "eigencam" in text and methods == {"gradcam"}
    return Outcome(ok, f"exit {r}: {text.strip().splitlines()[0][:90] if text.strip() else ''}")


def non_utf8(p: Probe) -> Outcome:
    d = p.dir("non-utf8")
    images = p.images(d / "in", n=8)
    os.rename(images / "img03.png", os.path.join(os.fsencode(images), b"bad\xffname.png"))
    out = d / "out"
    r, _text = p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    ok_lines = sum(x["status"] == "ok" for x in p.lines(out))
    return Outcome(r == 0 and ok_lines == 8, f"exit {r}, {ok_lines} of 8 ok")


def long_names(p: Probe) -> Outcome:
    d = p.dir("long-names")
    images = p.images(d / "in", n=4)
    os.rename(images / "img01.png", images / ("L" * 240 + ".png"))
    os.rename(images / "img02.png", images / ("é" * 120 + ".png"))
    out = d / "out"
    r, _ = p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    ok_lines = sum(x["status"] == "ok" for x in p.lines(out))
    return Outcome(r == 0 and ok_lines == 4, f"exit {r}, {ok_lines} of 4 ok")


def brackets(p: Probe) -> Outcome:
    d = p.dir("brackets")
    images = p.images(d / "in", n=3)
    (images / "x[").mkdir()
    (images / "x[" / "]bad\x1b[2J.png").write_bytes(b"broken")
    os.rename(images / "img00.png", images / "[bold magenta]name.png")
    r, text = p.xai("explain", images, "-c", p.config(d), "-o", d / "out[/]")
    ok = r == 1 and "\x1b" not in text and "[bold magenta]name" not in text.replace("[bold magenta]name.png", "x") \
        and "Traceback" not in text
    return Outcome(ok, f"exit {r}, raw escape {'shown' if chr(27) in text else 'escaped'}")


def out_inside_input(p: Probe) -> Outcome:
    d = p.dir("out-inside")
    images = p.images(d / "in", n=5)
    p.xai("explain", images, "-c", p.config(d), "-o", images / "xai-out", "-q")
    r, text = p.xai("explain", images, "-c", p.config(d), "-o", images / "second")
    n = len(p.lines(images / "second"))
    return Outcome(r == 0 and n == 5 and "skipped" in text, f"second run explained {n} images (5 inputs)")


def yaml_bomb(p: Probe) -> Outcome:
    d = p.dir("yaml-bomb")
    images = p.images(d / "in", n=2)
    levels = ["  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"] + [
        f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    cfg = d / "bomb.yaml"
    cfg.write_text("method:\n" + "".join(levels))  # ~550 bytes, 9^9 values once expanded
    t = time.perf_counter()
    r, text = p.xai("explain", images, "-c", cfg, "-o", d / "out", timeout=60, memory_gb=4)
    s = time.perf_counter() - t
    return Outcome(r == 2 and s < 60 and len(text) < 5000,
                   f"{cfg.stat().st_size} bytes: exit {r} after {s:.1f} s (cap 60 s, 4 GB), message {len(text)} chars")


def workers_1000(p: Probe) -> Outcome:
    d = p.dir("workers")
    images = p.images(d / "in", n=8)
    r, text = p.xai("explain", images, "-c", p.config(d, batch=1), "-o", d / "out", "--workers", "1000", timeout=120)
    return Outcome(r == 0 and "capped" in text, f"exit {r}")


def factory_code(p: Probe) -> Outcome:
    d = p.dir("factory")
    images = p.images(d / "in", n=2)
    marker = d / "pwned"
    cfg = d / "c.yaml"
    cfg.write_text(f"model:\n  source: factory\n  factory: os:system\n  kwargs: {{command: 'touch {marker}'}}\n")
    r, _ = p.xai("explain", images, "-c", cfg, "-o", d / "out")
    return Outcome(r == 2 and not marker.exists(), f"exit {r}, command {'RAN' if marker.exists() else 'not run'}")


def pkg_escape(p: Probe) -> Outcome:
    d = p.dir("pkg-escape")
    images = p.images(d / "in", n=2)
    cfg = p.config(d, extra="")
    cfg.write_text(cfg.read_text().replace("kwargs: {num_classes: 5}",
                                           "kwargs: {num_classes: 5}\n  labels: pkg://xaicli/../../../../../../../etc/hostname"))
    r, text = p.xai("explain", images, "-c", cfg, "-o", d / "out")
    return Outcome(r == 2 and "outside" in text, f"exit {r}")


def labels_blank(p: Probe) -> Outcome:
    d = p.dir("labels")
    images = p.images(d / "in", n=2)
    labels = d / "labels.txt"
    labels.write_text("a\nb\n\nc\nd\ne\n")
    cfg = p.config(d)
    cfg.write_text(cfg.read_text().replace("kwargs: {num_classes: 5}", f"kwargs: {{num_classes: 5}}\n  labels: {labels}"))
    r, text = p.xai("explain", images, "-c", cfg, "-o", d / "out")
    return Outcome(r == 2 and "3" in text, f"exit {r}")


def nan_bounds(p: Probe) -> Outcome:
    d = p.dir("nan")
    images = p.images(d / "in", n=2)
    exp = d / "e.yaml"
    exp.write_text("rules:\n  - failed_images: {at_most: .nan}\n")
    p.xai("explain", images, "-c", p.config(d), "-o", d / "run", "-q")
    r1, _ = p.xai("check", "--expect", exp, "--run", d / "run")
    r2, _ = p.xai("sanity", images, "-c", p.config(d), "--max-spearman", "nan")
    return Outcome(r1 == 2 and r2 == 2, f"exits {r1}, {r2}", faults=2)


def user_errors(p: Probe) -> Outcome:
    d = p.dir("user-errors")
    images = p.images(d / "in", n=2)
    results = []
    results.append(("batch 1e20", p.xai("explain", images, "-c", p.config(d), "-o", d / "o1", "-b",
                                        "99999999999999999999")[0], 2))
    cfg = d / "fk.yaml"
    cfg.write_text("model:\n  source: factory\n  factory: efficientnet_lite_pytorch:EfficientNet.from_name\n"
                   "  kwargs: {model_name: efficientnet-lite0, foo: 1}\n")
    results.append(("factory kwargs", p.xai("explain", images, "-c", cfg, "-o", d / "o2")[0], 2))
    p.xai("explain", images, "-c", p.config(d), "-o", d / "run", "-q")
    exp = d / "e.yaml"
    exp.write_text("rules:\n  - images: '[z-a]*'\n    failed_images: {at_most: 0}\n")
    results.append(("[z-a] glob", p.xai("check", "--expect", exp, "--run", d / "run")[0], 2))
    taken = d / "taken"
    taken.write_text("")
    results.append(("sanity --out file", p.xai("sanity", images, "-c", p.config(d), "--out", taken)[0], 2))
    p.xai("explain", images, "-c", p.config(d), "-o", d / "sh", "--shard", "0/2", "-q")
    part = d / "sh" / "parts" / "scores.0-of-2.jsonl"
    if part.exists():
        part.write_bytes(part.read_bytes() + b'{"path": "\xff"}\n')
    results.append(("non-UTF-8 part", p.xai("merge", d / "sh", "--partial")[0], 0))
    bad = [f"{n}: {got} (want {want})" for n, got, want in results if got != want]
    return Outcome(not bad, "; ".join(bad) or "all as documented", faults=len(results))


def readonly_and_full_at_start(p: Probe) -> Outcome:
    d = p.dir("ro-full")
    images = p.images(d / "in", n=2)
    ro, full = d / "ro", d / "full"
    if not (mount(ro, "size=1m,ro") and mount(full, "size=64k")):
        return Outcome(True, "skipped: cannot mount a tmpfs", faults=0)
    try:
        filler = full / "filler"
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * (128 * 1024))
            except OSError:
                pass
        (full / "out").mkdir(exist_ok=True) if os.access(full, os.W_OK) else None
        r1, t1 = p.xai("explain", images, "-c", p.config(d), "-o", ro / "out")
        r2, t2 = p.xai("explain", images, "-c", p.config(d), "-o", full / "out")
        ok = r1 == 3 and r2 == 3 and "internal error" not in t1 + t2
        return Outcome(ok, f"read-only: exit {r1}; full: exit {r2}", faults=2)
    finally:
        umount(ro)
        umount(full)


def nothing_left(p: Probe) -> Outcome:
    d = p.dir("nothing-left")
    images = p.images(d / "in", n=2)
    out = d / "out"
    r1, _ = p.xai("explain", images, "-c", p.config(d, kwargs=", no_such_kwarg: 1"), "-o", out)
    gone = not out.exists()
    hold = d / "hold"
    hold.touch()
    proc = p.start("explain", images, "-c", p.config(d, batch=1, hold=hold), "-o", out)
    if not p.wait_file(Path(str(hold) + ".reached"), proc):
        return Outcome(False, "never started")
    proc.send_signal(signal.SIGINT)  # before its first image
    proc.communicate(timeout=TIMEOUT_S)
    hold.unlink()
    left = sorted(x.name for x in out.iterdir()) if out.exists() else []
    r2, _text = p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    return Outcome(r1 == 2 and gone and r2 == 0, f"failing run exit {r1} (folder {'gone' if gone else 'left'}); "
                   f"stopped before its first image, it left {left or 'nothing'}; plain rerun exit {r2}", faults=2)


def file_modes(p: Probe) -> Outcome:
    d = p.dir("modes")
    images = p.images(d / "in", n=2)
    out = d / "out"
    old = os.umask(0o022)
    try:
        p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    finally:
        os.umask(old)
    modes = {oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file() and not f.name.startswith(".")}
    return Outcome(modes == {"0o644"}, f"modes {sorted(modes)} under umask 022")


def big_photo(p: Probe) -> Outcome:
    d = p.dir("big-photo")
    images = d / "in"
    images.mkdir()
    h, w = 9000, 12000  # 108 MP
    yy, xx = np.mgrid[0:h, 0:w].astype(np.uint16)
    Image.fromarray(np.stack([xx // 48, yy // 36, (xx + yy) // 84], -1).astype(np.uint8)).save(images / "big.jpg",
                                                                                           quality=80)
    del yy, xx
    cfg = p.config(d, extra="input: {max_pixels: 200000000}\n")
    r, _text = p.xai("explain", images, "-c", cfg, "-o", d / "out")
    recs = p.lines(d / "out")
    ok = r == 0 and recs and recs[0]["status"] == "ok"
    return Outcome(bool(ok), f"exit {r}: {recs[0]['status'] if recs else 'no line'}")


def batch_memory(p: Probe) -> Outcome:
    d = p.dir("batch-memory")
    images = d / "in"
    images.mkdir()
    h, w = 4000, 6000  # 24 MP
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(base).save(images / "p00.jpg", quality=85)
    del yy, xx, base
    for i in range(1, 32):
        shutil.copy(images / "p00.jpg", images / f"p{i:02d}.jpg")
    cfg = p.config(d, batch=16)
    cfg.write_text(cfg.read_text().replace("workers: 0", "workers: 2"))
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, time.perf_counter() - t)")
    rc, text = p.xai("explain", images, "-c", cfg, "-o", d / "out", "-q", timeout=1800,
                     wrap=[sys.executable, "-c", code])
    if rc == -9:
        return Outcome(False, "timed out after 1800 s")
    peak_kb, rc, secs = text.split()[-3:]
    peak = int(peak_kb) / 2**20
    return Outcome(rc == "0" and peak < 3, f"exit {rc}, {float(secs):.0f} s, peak of one process {peak:.2f} GB "
                                           "(32 photos of 24 MP, batch 16, 2 workers)")


def signals(p: Probe) -> Outcome:
    d = p.dir("signals")
    images = p.images(d / "in", n=6)
    bad = []
    for sig, want in ((signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)):
        hold = d / f"hold{sig}"
        hold.touch()
        out = d / f"out{sig}"
        proc = p.start("explain", images, "-c", p.config(d, batch=1, hold=hold), "-o", out)
        if not p.wait_file(Path(str(hold) + ".reached"), proc):
            bad.append(f"{sig}: never started")
            continue
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        hold.unlink()
        if proc.returncode != want or "--resume" not in err:
            bad.append(f"{signal.Signals(sig).name}: exit {proc.returncode}")
        r, _ = p.xai("explain", images, "-c", p.config(d, batch=1), "-o", out, "--resume", "-q")
        if r != 0 or p.lost(out, images):
            bad.append(f"{signal.Signals(sig).name}: resume exit {r}")
    return Outcome(not bad, "; ".join(bad) or "143 / 129 / 130, each with the resume hint", faults=3)


def kill9_resume(p: Probe) -> Outcome:
    d = p.dir("kill9")
    images = p.images(d / "in", n=6)
    hold = d / "hold"
    hold.touch()
    out = d / "out"
    proc = p.start("explain", images, "-c", p.config(d, batch=1, hold=hold), "-o", out)
    if not p.wait_file(Path(str(hold) + ".reached"), proc):
        return Outcome(False, "never started")
    proc.kill()
    proc.wait()
    hold.unlink()
    r, _ = p.xai("explain", images, "-c", p.config(d, batch=1), "-o", out, "--resume", "-q")
    lost = p.lost(out, images)
    return Outcome(r == 0 and lost == 0, f"resume exit {r}", lost)


def corrupt_images(p: Probe) -> Outcome:
    d = p.dir("corrupt")
    images = p.images(d / "in", n=6)
    (images / "empty.jpg").write_bytes(b"")
    (images / "trunc.png").write_bytes((images / "img00.png").read_bytes()[:100])
    (images / "text.png").write_text("hello")
    out = d / "out"
    r, _ = p.xai("explain", images, "-c", p.config(d), "-o", out, "-q")
    recs = p.lines(out)
    lost = p.lost(out, images)
    return Outcome(r == 1 and lost == 0 and sum(x["status"] != "ok" for x in recs) == 3, f"exit {r}", lost, faults=3)


CASES: list[tuple[str, str, Callable[[Probe], Outcome]]] = [
    ("16.1", "two_runs", two_runs),
    ("16.2", "merge_partial", merge_partial),
    ("16.3", "disk_full", disk_full),
    ("16.4", "resume_changed", resume_changed),
    ("16.5", "non_utf8", non_utf8),
    ("16.6", "long_names", long_names),
    ("16.7", "brackets", brackets),
    ("16.8", "out_inside_input", out_inside_input),
    ("16.9", "yaml_bomb", yaml_bomb),
    ("16.10", "workers_1000", workers_1000),
    ("16.11", "factory_code", factory_code),
    ("16.11", "pkg_escape", pkg_escape),
    ("16.12", "labels_blank", labels_blank),
    ("16.13", "nan_bounds", nan_bounds),
    ("16.14", "user_errors", user_errors),
    ("16.14", "readonly_and_full_at_start", readonly_and_full_at_start),
    ("16.15", "nothing_left", nothing_left),
    ("16.16", "file_modes", file_modes),
    ("16.17", "big_photo", big_photo),
    ("16.17", "batch_memory", batch_memory),
    ("signals", "signals", signals),
    ("-", "kill9_resume", kill9_resume),
    ("-", "corrupt_images", corrupt_images),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", default="", help="case names to skip, comma-separated")
    ap.add_argument("--only", default="", help="run only these cases")
    a = ap.parse_args()
    skip, only = set(filter(None, a.skip.split(","))), set(filter(None, a.only.split(",")))
    failed = lost = faults = tried = 0
    with tempfile.TemporaryDirectory(prefix="xai-probe-") as tmp:
        probe = Probe(Path(tmp))
        for item, name, fn in CASES:
            if name in skip or (only and name not in only):
                print(f"{item:8} {name:28} SKIP")
                continue
            t = time.perf_counter()
            try:
                o = fn(probe)
            except Exception as e:  # a probe that crashes is a failed case
                o = Outcome(False, f"probe error: {type(e).__name__}: {e}")
            tried += 1
            failed += not o.ok
            lost += o.lost
            faults += o.faults
            print(f"{item:8} {name:28} {'PASS' if o.ok else 'FAIL'}  lost {o.lost:3d}  {time.perf_counter() - t:5.1f} s  "
                  f"{o.detail}", flush=True)
    print(f"\n{tried} cases, {faults} faults injected, {failed} failed, lines lost: {lost}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
