"""Hostile or careless configuration, and honest exit codes (issue 16 items 9-14, issue 12 item 5):
every user error is refused with its own message and exit 2 (usage) or 3 (environment), before
the model loads where it can be, and the exit code does not depend on --debug."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_images
from xaicli import errors as errors_mod
from xaicli import run as folder_run
from xaicli.check.rules import expectations_from_dict, load_expectations
from xaicli.cli import app
from xaicli.config import ModelConfig, PreprocessConfig, load_config
from xaicli.errors import ConfigError, quote
from xaicli.models import build_model, resolve_path
from xaicli.run import loader_workers, usable_cpus

# A list of nine levels, each nine aliases of the one before: ~550 bytes, 9^9 values once expanded.
BOMB = "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def xai(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    write_images(d, n=3)
    return d


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------------------
# 9. Alias bombs and huge values


@pytest.mark.parametrize("key", ["method", "methods", "runtime", "target"])
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, folder: Path, key: str) -> None:
    p = _file(tmp_path, "bomb.yaml", f"{key}:\n" + BOMB)  # an error message would quote the whole value
    assert p.stat().st_size < 700
    t0 = time.perf_counter()
    r = xai("explain", folder, "-c", p, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "expands to more than" in r.output
    assert time.perf_counter() - t0 < 30 and len(r.output) < 2000  # seconds, not minutes and gigabytes


def test_an_expectations_bomb_is_refused(tmp_path: Path) -> None:
    p = _file(tmp_path, "expect.yaml", "rules:\n" + BOMB)
    with pytest.raises(ConfigError, match="expands to more than"):
        load_expectations(p)


def test_a_recursive_document_is_refused(tmp_path: Path) -> None:
    p = _file(tmp_path, "loop.yaml", "method: &x [gradcam, *x]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(p)


def test_values_quoted_in_messages_are_bounded() -> None:
    nested = [[list(range(1000))] * 1000] * 1000
    assert len(quote(nested)) <= 200 and len(quote("x" * 10**6)) <= 200
    with pytest.raises(ConfigError) as e:
        expectations_from_dict({"rules": [{"metric": ["x" * 10**5] * 100, "at_least": 1}]})
    assert len(str(e.value)) < 1000


# --------------------------------------------------------------------------------------------
# 10. --workers


def test_workers_are_capped_at_the_cpus_with_a_note(folder: Path, tmp_path: Path, tiny_config) -> None:
    assert loader_workers(1000, 50) == usable_cpus()
    assert loader_workers(2, 1) == 0  # one batch: no process to start
    r = xai("explain", folder, "-c", tiny_config(), "-o", tmp_path / "out", "--workers", "1000", "-b", "1")
    assert r.exit_code == 0, r.output
    assert f"--workers 1000 capped to {usable_cpus()}" in r.output
    r = xai("explain", folder, "-c", tiny_config(), "-o", tmp_path / "o2", "--workers", "100000")
    assert r.exit_code == 2 and "runtime.workers: must be at most" in r.output


# --------------------------------------------------------------------------------------------
# 11. A config is code: what cannot be a model factory is refused before it is called


@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    ("os:system", {"command": "touch {marker}"}, "standard library"),
    ("subprocess:run", {"args": ["touch", "{marker}"]}, "standard library"),
    ("shutil:rmtree", {"path": "{marker}"}, "standard library"),
    ("tests.nets:GapNet.forward", {"x": 1}, "returns Tensor"),
    ("collections:OrderedDict", {}, "standard library"),
    ("tests.nets:nn.Identity.__init__", {}, "not a torch.nn.Module"),
])
def test_factories_that_are_not_models_are_refused_uncalled(tmp_path: Path, factory: str, kwargs: dict,
                                                            message: str) -> None:
    marker = tmp_path / "called"
    kw = json.loads(json.dumps(kwargs).replace("{marker}", str(marker)))
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(source="factory", factory=factory, kwargs=kw), PreprocessConfig())
    assert message in e.value.message and not marker.exists()


def test_pkg_paths_stay_inside_their_package() -> None:
    for spec in ("pkg://xaicli/../../../../../../../../etc/passwd", "pkg://xaicli//etc/passwd",
                 "pkg://xaicli/data/../../../setup.py"):
        with pytest.raises(ConfigError, match="outside the package"):
            resolve_path(spec, "model.labels")
    assert resolve_path("pkg://xaicli/data/imagenet_classes.txt").is_file()


def test_the_help_says_a_config_is_code() -> None:
    r = xai("explain", "--help")
    assert "you trust like code" in " ".join(r.output.replace("│", " ").split())


# --------------------------------------------------------------------------------------------
# 12. Labels files


def test_a_labels_file_with_a_blank_line_is_refused_with_its_line(folder: Path, tmp_path: Path,
                                                                  tiny_config) -> None:
    labels = _file(tmp_path, "labels.txt", "cat\ndog\n\nbird\nfish\nfrog\n")  # 5 names, 6 lines: shifted
    cfg = tiny_config("gradcam", "").read_text().replace("kwargs: {num_classes: 5}",
                                                         f"kwargs: {{num_classes: 5}}\n  labels: {labels}")
    r = xai("explain", folder, "-c", _file(tmp_path, "c.yaml", cfg), "-o", tmp_path / "out")
    assert r.exit_code == 2 and "blank line(s) 3" in r.output


# --------------------------------------------------------------------------------------------
# 13. NaN bounds


@pytest.mark.parametrize("rule", [
    {"metric": "energy", "at_least": float("nan")},
    {"failed_images": {"at_most": float("nan")}},
    {"sanity": {"method": "gradcam", "spearman_at_full_randomization": {"at_most": float("nan")}}},
    {"run": "counts.ok", "at_most": float("nan")},
])
def test_nan_bounds_are_usage_errors(rule: dict) -> None:
    with pytest.raises(ConfigError, match="NaN"):
        expectations_from_dict({"rules": [rule]})


def test_nan_bounds_from_yaml_and_the_command_line(tmp_path: Path, folder: Path, tiny_config) -> None:
    p = _file(tmp_path, "e.yaml", "rules:\n  - metric: energy\n    at_least: .nan\n")
    r = xai("check", "--expect", p, "--run", tmp_path)
    assert r.exit_code == 2 and "NaN" in r.output
    r = xai("sanity", folder, "-c", tiny_config(), "--max-spearman", "nan")
    assert r.exit_code == 2 and "--max-spearman" in r.output
    r = xai("explain", folder, "-c", tiny_config("gradcam", "output: {alpha: .nan}\n"), "-o", tmp_path / "o")
    assert r.exit_code == 2


# --------------------------------------------------------------------------------------------
# 14. User errors get their own message and exit 2 or 3, not "internal error"


def test_a_huge_batch_size_is_a_usage_error(folder: Path, tmp_path: Path, tiny_config) -> None:
    for b in ("99999999999999999999", "100000"):
        r = xai("explain", folder, "-c", tiny_config(), "-o", tmp_path / "out", "-b", b)
        assert r.exit_code == 2 and "runtime.batch_size: must be at most" in r.output, r.output


def test_unknown_factory_kwargs_are_a_usage_error(folder: Path, tmp_path: Path) -> None:
    cfg = _file(tmp_path, "c.yaml", "model:\n  source: factory\n  factory: efficientnet_lite_pytorch:EfficientNet."
                "from_name\n  kwargs: {model_name: efficientnet-lite0, foo: 1}\n")
    r = xai("explain", folder, "-c", cfg, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "model.kwargs" in r.output and "internal error" not in r.output


def test_a_bad_glob_range_is_a_usage_error(tmp_path: Path) -> None:
    p = _file(tmp_path, "e.yaml", "rules:\n  - images: '[z-a]*'\n    failed_images: {at_most: 0}\n")
    r = xai("check", "--expect", p, "--run", tmp_path)
    assert r.exit_code == 2 and "rules[0].images: '[z-a]*' is not a valid glob" in r.output


def test_a_damaged_parts_file_is_merged_around(tmp_path: Path, folder: Path, tiny_config) -> None:
    out = tmp_path / "out"
    r = xai("explain", folder, "-c", tiny_config(), "-o", out, "--shard", "0/2")
    assert r.exit_code == 0, r.output
    part = out / "parts" / "scores.0-of-2.jsonl"
    part.write_bytes(part.read_bytes() + b'{"path": "x\xff\xfe"}\n')  # not UTF-8
    r = xai("merge", out, "--partial")
    assert r.exit_code == 0 and "1 damaged line(s) in parts/scores.0-of-2.jsonl" in r.output, r.output


def test_sanity_out_naming_a_file_is_refused_before_the_test(tmp_path: Path, folder: Path, tiny_config,
                                                            monkeypatch) -> None:
    import xaicli.sanity

    monkeypatch.setattr(xaicli.sanity, "run_sanity", lambda *a, **k: pytest.fail("ran the test"))
    target = _file(tmp_path, "taken", "")
    r = xai("sanity", folder, "-c", tiny_config(), "--out", target)
    assert r.exit_code == 2 and "exists and is not a folder" in r.output


def test_check_junit_naming_a_folder_is_refused_before_the_run(tmp_path: Path, folder: Path) -> None:
    p = _file(tmp_path, "e.yaml", "rules:\n  - failed_images: {at_most: 0}\n")
    r = xai("check", "--expect", p, "--run", tmp_path, "--junit", tmp_path)
    assert r.exit_code == 2 and "--junit" in r.output and "is a folder" in r.output


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A folder on a read-only file system (a read-only tmpfs; needs mount rights)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_read_only_out_is_found_before_the_model_loads(folder: Path, tmp_path: Path, tiny_config,
                                                         readonly_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(folder_run, "setup", lambda *a, **k: pytest.fail("loaded the model"))
    for out in (readonly_dir, readonly_dir / "sub"):
        r = xai("explain", folder, "-c", tiny_config(), "-o", out)
        assert r.exit_code == 3 and "read-only file system" in r.output, r.output


def test_a_full_disk_at_the_start_is_exit_3(folder: Path, tmp_path: Path, tiny_config, monkeypatch) -> None:
    import errno
    import os

    real_open = os.open

    def full(path, flags, mode=0o777, **kw):
        if str(path).endswith(".xai-run.lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(folder_run, "setup", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr("xaicli.lock.os.open", full)
    r = xai("explain", folder, "-c", tiny_config(), "-o", tmp_path / "out")
    assert r.exit_code == 3 and "no space left" in r.output and "internal error" not in r.output


# --------------------------------------------------------------------------------------------
# Issue 12 item 5: the exit code is a contract, with and without --debug


def _error_classes() -> list[type[BaseException]]:
    found, todo = [], [errors_mod.XaiError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize("error", [*_error_classes(), RuntimeError, KeyboardInterrupt])
def test_exit_codes_do_not_depend_on_debug(error: type[BaseException], folder: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    def fail(*a, **k):
        raise error("boom") if issubclass(error, errors_mod.XaiError) or error is RuntimeError else error()

    monkeypatch.setattr(folder_run, "run_explain", fail)
    plain = xai("explain", folder, "-o", tmp_path / "out")
    debug = xai("--debug", "explain", folder, "-o", tmp_path / "out")
    expected = getattr(error, "exit_code", 130 if error is KeyboardInterrupt else 3)
    assert plain.exit_code == debug.exit_code == expected, (plain.output, debug.output)
    assert "Traceback" in debug.output and "Traceback" not in plain.output


def test_a_missing_weights_file_exits_3_with_and_without_debug(folder: Path, tmp_path: Path) -> None:
    cfg = _file(tmp_path, "c.yaml", "model:\n  source: factory\n  factory: tests.nets:gap_net\n"
                "  checkpoint: /nonexistent/w.pth\n")
    for debug in ([], ["--debug"]):
        r = xai(*debug, "explain", folder, "-c", cfg, "-o", tmp_path / "out")
        assert r.exit_code == 3, r.output
