"""The registry: every module of the registering packages imports, a broken module stops the lookup
with a clear error instead of hiding its entries, and names, aliases and order behave."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import xaicli.methods
import xaicli.metrics
from xaicli.errors import ConfigError
from xaicli.registry import Registry


def _modules() -> list[str]:
    return [f"{pkg.__name__}.{m.name}" for pkg in (xaicli.methods, xaicli.metrics)
            for m in pkgutil.iter_modules(pkg.__path__)]


@pytest.mark.parametrize("module", _modules())
def test_every_module_of_methods_and_metrics_imports(module: str) -> None:
    importlib.import_module(module)


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An importable package of a unique name whose __init__ holds a Registry, and its folder."""
    name = f"regtest_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text(
        "from xaicli.registry import Registry\nREG = Registry('widget', __name__, listed_by='xai widgets')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, folder
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _module(folder: Path, name: str, *entries: str, extra: str = "") -> None:
    lines = [extra, "from . import REG"]
    lines += [f"REG.register({e!r}, {e!r}.upper(), module=__name__)" for e in entries]
    (folder / f"{name}.py").write_text("\n".join(lines) + "\n")


def test_a_broken_module_raises_instead_of_hiding_its_entries(package: tuple[str, Path]) -> None:
    name, folder = package
    _module(folder, "alpha", "a")
    _module(folder, "beta", "b", extra="import no_such_dependency_xyz")
    reg = importlib.import_module(name).REG
    with pytest.raises(ImportError, match=rf"{name}\.beta cannot be imported, so the widgets it registers "
                                          r"are missing: ModuleNotFoundError: .*no_such_dependency_xyz"):
        reg.all()
    # Never a partial table afterwards: the next lookup fails the same way.
    with pytest.raises(ImportError, match="beta cannot be imported"):
        reg.get("a", "widget")


def test_modules_are_found_without_a_list_and_private_ones_skipped(package: tuple[str, Path]) -> None:
    name, folder = package
    _module(folder, "zeta", "z1", "z0")
    _module(folder, "alpha", "a")
    (folder / "_private.py").write_text("raise RuntimeError('a private module is not imported')\n")
    reg = importlib.import_module(name).REG
    importlib.import_module(f"{name}.zeta")  # imported first: the order stays by module name
    assert reg.all() == ["A", "Z1", "Z0"]
    assert reg.modules() == [f"{name}.alpha", f"{name}.zeta"]


def test_names_aliases_duplicates_and_suggestions(package: tuple[str, Path]) -> None:
    reg: Registry[str] = importlib.import_module(package[0]).REG  # a package without modules
    reg.register("grad_cam", "G", aliases=("gc",))
    assert reg.get(" Grad-CAM ", "widget") == "G"
    assert reg.get("GC", "widget") == "G"
    with pytest.raises(RuntimeError, match="widget 'gc' registered twice"):
        reg.register("gc", "X")
    with pytest.raises(RuntimeError, match="widget 'grad_cam' registered twice"):
        reg.register("other", "X", aliases=("grad_cam",))
    with pytest.raises(ConfigError) as e:
        reg.get("grad_cm", "config.widget")
    assert e.value.message == "config.widget: unknown widget 'grad_cm'"
    assert e.value.hint == "did you mean 'grad_cam'? (`xai widgets` lists them)"


def test_method_and_metric_order_and_messages() -> None:
    from xaicli.methods import all_methods, get_method
    from xaicli.metrics import all_metrics, get_metric

    names = [m.name for m in all_methods()]  # modules cam, eigen, gradient, perturbation, transformer
    assert names[:2] == ["cam", "gradcam"]
    assert names.index("eigencam") < names.index("saliency") < names.index("occlusion")
    assert [m.name for m in all_metrics()][:3] == ["deletion", "insertion", "drop_increase"]
    with pytest.raises(ConfigError) as e:
        get_method("gradcamm")
    assert e.value.message == "method: unknown method 'gradcamm'"
    assert e.value.hint.endswith("(`xai methods` lists them)")
    with pytest.raises(ConfigError) as e:
        get_metric("enrgy")
    assert (e.value.message, e.value.hint) == ("metrics: unknown metric 'enrgy'", "did you mean 'energy'?")
