"""xaicli: explain image classifiers from the command line and from Python.

The Python API (docs/api.md), imported on first use so that ``xai --help`` stays fast:

* ``xaicli.explain(model, images, method=..., layer=..., target=..., preprocess=...)``: maps,
  targets, scores and overlays of images in memory or on disk (:func:`xaicli.api.explain`);
* ``xaicli.load_config(path)``, ``xaicli.load_model(config)``;
* ``xaicli.run(config, images, out)``: the folder run of ``xai explain`` (:func:`xaicli.run.run_folder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Explained, Model, explain, load_model
    from .config import load_config
    from .run import run_folder as run

_API = {"explain": "api", "Explained": "api", "Model": "api", "load_model": "api", "load_config": "config"}

__all__ = ["Explained", "Model", "__version__", "explain", "load_config", "load_model", "run"]


def __getattr__(name: str) -> Any:
    import importlib

    if name == "run":  # the module xaicli/run.py, callable as run_folder
        return importlib.import_module(".run", __name__)
    if name in _API:
        return getattr(importlib.import_module("." + _API[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
