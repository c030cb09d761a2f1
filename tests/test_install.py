"""What a new user installs (issue 12, item 7): the Quick start installs runtime dependencies only
and the test command the test extras; CPU-only wheels are documented; the CI example installs from
the repository; the shipped configs are package data, named by `--config NAME`; `.ci/run` runs the
README's commands as written."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xaicli.config import SHIPPED_CONFIGS, load_config, shipped_configs
from xaicli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def quick_start_blocks() -> list[str]:
    quick = README.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, re.S)]


def test_packaged_configs_are_the_repositorys():
    repo = {p.relative_to(ROOT / "configs").as_posix(): p.read_bytes() for p in (ROOT / "configs").rglob("*.yaml")}
    packaged = {p.relative_to(SHIPPED_CONFIGS).as_posix(): p.read_bytes() for p in SHIPPED_CONFIGS.rglob("*.yaml")}
    assert sorted(repo) == sorted(packaged), "copy configs/*.yaml into xaicli/configs/ (package data)"
    for name in repo:
        assert repo[name] == packaged[name], f"configs/{name} and xaicli/configs/{name} differ"
    assert "resnet50" in shipped_configs() and "default" in shipped_configs()
    assert {"train/resnet18", "train/efficientnet_lite0"} <= set(shipped_configs())


def test_config_by_shipped_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("resnet50")
    assert dataclasses.replace(cfg, source_path=None) == dataclasses.replace(
        load_config(ROOT / "configs" / "resnet50.yaml"), source_path=None)
    assert cfg.model.name == "resnet50" and cfg.target_layer == "layer4"
    assert load_config("vgg16.yaml").model.name == "vgg16"
    assert load_config("train/resnet18").head is not None  # the training configs, by name too
    with pytest.raises(ConfigError) as e:
        load_config("resnet5")
    assert "'resnet5' is neither a file nor a shipped config" in e.value.message
    assert e.value.hint is not None and e.value.hint.startswith("did you mean 'resnet50'")
    assert "convnext_tiny, default, densenet121, mobilenet_v3_large, resnet50, swin_t, vgg16, vit_b_16" in e.value.hint
    (tmp_path / "resnet50").write_text("method: eigencam\n")  # a file of that name here wins
    assert load_config("resnet50").method == ("eigencam",)
    with pytest.raises(ConfigError, match="config file not found: nope/x.yaml"):
        load_config("nope/x.yaml")


def test_quick_start_installs_runtime_dependencies_only_and_tests_install_the_test_extras():
    install, tests, *rest = quick_start_blocks()
    assert "pip install -e . &&" in install and "[test]" not in install
    assert install.endswith("xai explain sample_images --out runs/demo")
    assert tests == 'pip install -e ".[test]" && python -m pytest -q'
    assert any("--index-url https://download.pytorch.org/whl/cpu" in b for b in rest)  # CPU-only wheels


def test_ci_example_installs_from_the_repository():
    workflow = README.split("### A complete GitHub Actions job", 1)[1].split("\n## ", 1)[0]
    installs = [ln.strip() for ln in workflow.splitlines() if "pip install" in ln]
    assert not any(re.fullmatch(r"pip install xaicli\b.*", ln) for ln in installs)  # not on PyPI
    assert any('"xaicli @ git+https://' in ln for ln in installs)


def test_ci_script_runs_the_readme_commands_as_written():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    code = script.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF\n", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == quick_start_blocks()[:2]
    assert 'bash -euo pipefail -c "${COMMANDS[0]}"' in script and 'bash -euo pipefail -c "${COMMANDS[1]}"' in script


def test_wheel_carries_the_shipped_configs(tmp_path: Path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "xaicli", src / "xaicli", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not installed in this environment")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("xaicli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"xaicli/configs/{n}.yaml" for n in shipped_configs()} <= names
    assert "xaicli/data/imagenet_classes.txt" in names
    assert "xaicli/py.typed" in names  # type checkers read the API's annotations
