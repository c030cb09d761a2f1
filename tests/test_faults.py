"""Nothing lost (issue 16): write errors, a resume with another plan, hostile file names, earlier
results in the input, runs that stop before their first image, file modes and large photos."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_images
from xaicli import outputs
from xaicli import run as folder_run
from xaicli.cli import app
from xaicli.config import apply_overrides, load_config
from xaicli.errors import ConfigError, StorageError
from xaicli.outputs import SCORES
from xaicli.run import run_explain

N_IMAGES = 6


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    write_images(d, n=N_IMAGES)
    return d


@pytest.fixture
def cfg(tiny_config):
    return load_config(tiny_config())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def xai(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_counts_match_scores(out: Path) -> None:
    """run.json's counts and failures are those of scores.jsonl, exactly."""
    recs = lines(out / SCORES)
    run = json.loads((out / "run.json").read_text())
    failed = sorted(r["path"] for r in recs if r["status"] != "ok")
    assert run["counts"]["ok"] == len(recs) - len(failed)
    assert run["counts"]["failed"] == len(failed) == len(run["failures"])
    assert sorted(f["path"] for f in run["failures"]) == failed
    assert len({r["path"] for r in recs}) == len(recs)


# --------------------------------------------------------------------------------------------
# 3. Write errors surface


class Disk:
    """Injected write faults: file writes (overlays) fail while ``files_full``, and scores lines
    fail after ``lines_left`` more (None: never)."""

    def __init__(self, monkeypatch) -> None:
        self.files_full = False
        self.lines_left: int | None = None
        real_atomic, real_write = outputs.atomic_write, os.write

        def atomic_write(path: Path, data: bytes) -> None:
            if self.files_full and {"overlays", "maps"} & set(path.parts):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_atomic(path, data)

        def write(fd: int, data) -> int:
            if self.lines_left is not None and os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
                if self.lines_left <= 0:
                    n = real_write(fd, bytes(data)[: len(data) // 2])  # half a line, then the disk is full
                    assert n >= 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.lines_left -= 1
            return real_write(fd, data)

        monkeypatch.setattr(outputs, "atomic_write", atomic_write)
        monkeypatch.setattr(outputs.os, "write", write)

    def heal(self) -> None:
        self.files_full, self.lines_left = False, None


def test_failed_file_writes_become_error_lines_and_resume_completes(cfg, folder: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    disk = Disk(monkeypatch)
    disk.files_full = True
    out = tmp_path / "out"
    res = run_explain(cfg, folder, out)
    recs = lines(out / SCORES)
    assert len(recs) == N_IMAGES and all(r["error"]["type"] == "write" for r in recs)
    assert res.exit_code == 1 and res.failed == N_IMAGES
    assert_counts_match_scores(out)
    disk.heal()
    res = run_explain(cfg, folder, out, resume=True)
    assert res.exit_code == 0 and res.ok == N_IMAGES
    assert_counts_match_scores(out)


def test_a_scores_line_that_cannot_be_written_stops_the_run_with_exit_3(cfg, folder: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    disk = Disk(monkeypatch)
    disk.lines_left = 2
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="no space left") as e:
        run_explain(cfg, folder, out)
    assert e.value.exit_code == 3 and "--resume" in (e.value.hint or "")
    written = (out / SCORES).read_bytes()
    assert written.endswith(b"\n") and len(written.splitlines()) == 2  # no torn line left behind
    disk.heal()
    res = run_explain(cfg, folder, out, resume=True)
    assert res.exit_code == 0 and res.skipped == 2 and res.ok == N_IMAGES
    assert sorted(r["path"] for r in lines(out / SCORES)) == sorted(p.name for p in folder.iterdir())
    assert_counts_match_scores(out)


def test_a_full_disk_through_the_cli(folder: Path, tmp_path: Path, tiny_config, monkeypatch) -> None:
    disk = Disk(monkeypatch)
    disk.lines_left = 1
    r = xai("explain", folder, "-c", tiny_config(), "-o", tmp_path / "out")
    assert r.exit_code == 3 and "no space left" in r.output and "internal error" not in r.output


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real 1 MiB file system (needs root and mount rights: skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk_loses_nothing(tmp_path: Path, tiny_config, tmpfs: Path) -> None:
    images = tmp_path / "many"
    write_images(images, n=80, sizes=[(24, 32)])
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (2**20 - 3 * 4096))  # three pages left: a few files, then not even a line
    out = tmpfs / "out"
    cfg = tiny_config()
    r = xai("explain", images, "-c", cfg, "-o", out)
    assert r.exit_code == 3 and "no space left" in r.output and "internal error" not in r.output, r.output
    recs = lines(out / SCORES) if (out / SCORES).exists() else []
    assert all(r["status"] == "ok" or r["error"]["type"] == "write" for r in recs)  # whole lines only
    filler.unlink()  # space is back
    r = xai("explain", images, "-c", cfg, "-o", out, "--resume")
    assert r.exit_code == 0, r.output
    assert sorted(r["path"] for r in lines(out / SCORES)) == sorted(p.name for p in images.iterdir())
    assert_counts_match_scores(out)


# --------------------------------------------------------------------------------------------
# 4. --resume with another plan


def _killed_run(cfg, folder: Path, out: Path, monkeypatch, after: int = 2) -> None:
    """A run stopped (as by kill -9) after ``after`` batches: lines, the plan file, no run.json."""
    real = folder_run._explain_batch
    calls = {"n": 0}

    def stop(ctx, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return real(ctx, batch)

    monkeypatch.setattr(folder_run, "_explain_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_explain(apply_overrides(cfg, batch_size=1), folder, out)
    monkeypatch.setattr(folder_run, "_explain_batch", real)
    assert not (out / "run.json").exists() and len(lines(out / SCORES)) == after


@pytest.mark.parametrize("killed", [False, True])
def test_resume_refuses_another_plan_and_shows_the_difference(cfg, folder: Path, tmp_path: Path, tiny_config,
                                                              monkeypatch, killed: bool) -> None:
    out = tmp_path / "out"
    if killed:
        _killed_run(cfg, folder, out, monkeypatch)
    else:
        run_explain(cfg, folder, out)
    changes = [
        (apply_overrides(cfg, method="eigencam"), "methods: gradcam before, eigencam now"),
        (apply_overrides(cfg, method="gradcam,eigencam"), "methods: gradcam before, gradcam, eigencam now"),
        (load_config(tiny_config("gradcam", "methods: {gradcam: {relu: false}}\n")),
         "methods.gradcam.relu: True before, False now"),
        (apply_overrides(cfg, target="2"), "target: 'predicted' before, '2' now"),
        (apply_overrides(cfg, layer="features.0"), "layer: 'features' before, 'features.0' now"),
        (load_config(tiny_config("gradcam", "output: {format: jpg}\n")), "output.format: 'png' before, 'jpg' now"),
        (load_config(tiny_config().read_text().replace("num_classes: 5", "num_classes: 5, seed: 1")
                     and _config(tmp_path, tiny_config().read_text().replace("num_classes: 5}",
                                                                              "num_classes: 5, seed: 1}"))),
         "weights_digest"),
    ]
    for changed, shown in changes:
        with pytest.raises(ConfigError) as e:
            run_explain(changed, folder, out, resume=True)
        assert "--resume" in e.value.message and shown in e.value.message, e.value.message
    lines_before = (out / SCORES).read_bytes()
    res = run_explain(apply_overrides(cfg, batch_size=3, workers=1), folder, out, resume=True)  # not the plan
    assert res.exit_code == 0 and res.ok == N_IMAGES
    kept = (out / SCORES).read_bytes().splitlines()
    assert all(line in kept for line in lines_before.splitlines())  # the earlier lines, verbatim (order may differ)
    run = json.loads((out / "run.json").read_text())
    assert run["methods"][0]["name"] == "gradcam" and len(run["weights_digest"]) == 32
    assert not (out / ".xai-plan.json").exists()  # run.json holds the plan once the run is done


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "other.yaml"
    p.write_text(text)
    return p


def test_shards_of_one_run_must_share_its_plan(cfg, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_explain(cfg, folder, out, shard=(0, 2))
    with pytest.raises(ConfigError, match="(?s)--shard 1/2: .* another plan .*methods: gradcam before, eigencam now"):
        run_explain(apply_overrides(cfg, method="eigencam"), folder, out, shard=(1, 2))
    assert run_explain(cfg, folder, out, shard=(1, 2)).merged is not None


# --------------------------------------------------------------------------------------------
# 5-7. Any file name


def _copy_as(folder: Path, names: list[bytes]) -> None:
    srcs = sorted(folder.iterdir())
    for src, name in zip(srcs, names, strict=False):
        os.rename(src, os.path.join(os.fsencode(folder), name))


def test_a_name_that_is_not_utf8_fails_nothing(cfg, folder: Path, tmp_path: Path) -> None:
    _copy_as(folder, [b"bad\xffname.png", b"caf\xe9.jpg"])  # Latin-1 bytes, not UTF-8
    out = tmp_path / "out"
    res = run_explain(cfg, folder, out)  # one batch of 4 with both names in it
    assert res.exit_code == 0 and res.ok == N_IMAGES
    recs = {r["path"]: r for r in lines(out / SCORES)}
    bad = recs["bad\udcffname.png"]  # the bytes, as Python keeps them (os.fsencode gives them back)
    overlay = out / bad["explanations"][0]["files"]["overlay"]
    assert os.fsencode(overlay).endswith(b"bad\xffname.gradcam.png") and overlay.is_file()
    assert run_explain(cfg, folder, out, resume=True).skipped == N_IMAGES  # found again by --resume


def test_a_name_too_long_once_suffixed_is_shortened_with_a_hash(cfg, folder: Path, tmp_path: Path) -> None:
    long_names = ["L" * 250 + ".png", "é" * 120 + ".jpg"]  # 254 and 244 bytes: fine as input names
    _copy_as(folder, [n.encode() for n in long_names])
    out = tmp_path / "out"
    res = run_explain(cfg, folder, out)
    assert res.exit_code == 0 and res.ok == N_IMAGES
    recs = {r["path"]: r for r in lines(out / SCORES)}
    for name in long_names:
        f = recs[name]["explanations"][0]["files"]["overlay"]
        assert (out / f).is_file() and len(os.fsencode(Path(f).name)) <= 255
        assert "~" in f  # shortened, with a hash of the whole name
    again = tmp_path / "again"
    run_explain(cfg, folder, again)
    assert {r["path"]: r["explanations"][0]["files"] for r in lines(again / SCORES)} == {
        p: r["explanations"][0]["files"] for p, r in recs.items()}  # the same names every time


def test_brackets_and_escapes_in_names_are_shown_as_they_are(tiny_config, folder: Path, tmp_path: Path) -> None:
    (folder / "x[").mkdir()
    (folder / "x[" / "]bad\x1b[2J.png").write_bytes(b"not an image")  # the path holds "[/]" and an escape
    (folder / "img00.png").rename(folder / "[bold magenta]named.png")
    out = tmp_path / "out[/]"
    r = xai("explain", folder, "-c", tiny_config(), "-o", out)
    assert r.exit_code == 1, r.output  # one image failed, the run did not
    assert "x[/]bad\\x1b[2J.png" in r.output and "\x1b" not in r.output  # escaped, never sent raw
    assert "out[/]" in r.output
    assert len(lines(out / SCORES)) == N_IMAGES + 1
    assert any(x["path"] == "[bold magenta]named.png" for x in lines(out / SCORES))


# --------------------------------------------------------------------------------------------
# 8 (and 12.1). Earlier results are never read as input


def test_output_folders_under_the_input_are_skipped_and_counted(cfg, folder: Path) -> None:
    first = run_explain(cfg, folder, folder / "xai-out")
    assert first.total == N_IMAGES
    second = run_explain(apply_overrides(cfg, method="eigencam"), folder, folder / "second")
    assert second.total == N_IMAGES  # not the N overlays of the first run
    assert second.run["counts"]["skipped_output_files"] == N_IMAGES
    assert any("skipped 6 images under xaicli output folders (xai-out)" in n for n in second.notes)
    # A run folder moved elsewhere under the input is recognised by its files, not its name.
    (folder / "xai-out").rename(folder / "renamed")
    third = run_explain(cfg, folder, folder / "third")
    assert third.total == N_IMAGES and third.run["counts"]["skipped_output_files"] == 2 * N_IMAGES


def test_the_summary_says_what_was_skipped(tiny_config, folder: Path) -> None:
    assert xai("explain", folder, "-c", tiny_config(), "-o", folder / "xai-out").exit_code == 0
    r = xai("explain", folder, "-c", tiny_config(), "-o", folder / "second")
    assert r.exit_code == 0 and "6 ok" in r.output
    assert "skipped 6 images under xaicli output folders (xai-out)" in r.output


# --------------------------------------------------------------------------------------------
# 15. A run that stops before its first image leaves nothing behind


def test_a_run_that_fails_before_its_first_image_leaves_nothing(folder: Path, tmp_path: Path, tiny_config) -> None:
    broken = tiny_config("gradcam", "").read_text().replace("tests.nets:gap_net", "tests.nets:gap_net_missing")
    bad = _config(tmp_path, broken)
    out = tmp_path / "out"
    r = xai("explain", folder, "-c", bad, "-o", out)
    assert r.exit_code == 2 and not out.exists()  # the folder it created is gone again
    out.mkdir()
    r = xai("explain", folder, "-c", bad, "-o", out)
    assert r.exit_code == 2 and list(out.iterdir()) == []  # an existing folder is left empty
    r = xai("explain", folder, "-c", tiny_config(), "-o", out)  # the plain rerun proceeds
    assert r.exit_code == 0, r.output


def test_an_empty_scores_file_is_no_earlier_run(cfg, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / SCORES).write_bytes(b"")  # left by a run killed before its first image
    assert run_explain(cfg, folder, out).ok == N_IMAGES


# --------------------------------------------------------------------------------------------
# 16. File modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_get_the_umask_permissions(cfg, folder: Path, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        run_explain(apply_overrides(cfg, save_maps=True), folder, out)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 2 + 2 * N_IMAGES
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}


# --------------------------------------------------------------------------------------------
# 17. Large photos


def _photo(path: Path, w: int, h: int) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(path, quality=85)


def test_max_pixels_is_a_setting_and_large_photos_are_decoded_reduced(tiny_config, tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    _photo(d / "wide.jpg", 3000, 2000)  # 6 MP
    _photo(d / "small.png", 64, 48)
    out = tmp_path / "out"
    limits = "input: {max_pixels: 5000000}\n"
    r = xai("explain", d, "-c", tiny_config("gradcam", limits), "-o", out)
    assert r.exit_code == 1 and "above input.max_pixels" in r.output
    rec = {x["path"]: x for x in lines(out / SCORES)}["wide.jpg"]
    assert rec["error"]["type"] == "too_large"
    r = xai("explain", d, "-c", tiny_config("gradcam", "input: {decode_pixels: 1000000}\n"), "-o", out, "--resume")
    assert r.exit_code == 0, r.output
    recs = {x["path"]: x for x in lines(out / SCORES)}
    wide, small = recs["wide.jpg"], recs["small.png"]
    assert (wide["width"], wide["height"]) == (3000, 2000)  # the photo's own size
    dw, dh = wide["decoded"]["width"], wide["decoded"]["height"]
    assert dw * dh <= 1_000_000 and abs(dw / dh - 1.5) < 0.01  # explained at about 1 MP
    ow, oh = Image.open(out / wide["explanations"][0]["files"]["overlay"]).size
    assert ow == dw and oh >= dh  # the decoded size (the caption strip, when on, goes below)
    px, py = wide["explanations"][0]["map"]["peak"]
    assert 0 <= px < 3000 and 0 <= py < 2000  # in the photo's own pixels
    assert "decoded" not in small  # small images: records as before
