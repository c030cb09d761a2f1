"""Pictures of a whole run: ``report.html`` (`xai report`, `xai explain --report`, `xai compare
--report`) and the contact sheet ``grid.png`` (`--grid`).

The report is one HTML file (Jinja2 template, a small inline script, the data as embedded JSON)
beside a ``report/`` folder of JPEG thumbnails and matplotlib SVG plots, all referenced by relative
paths: it opens from the file system or a CI artefact and requests nothing else. It shows the run's
summary (model, layer, methods, counts, failures with their reasons, time, device, speed), each
metric's distribution per method and the mean deletion/insertion curves, the results of `xai check`
and `xai sanity` found in the run folder, and every image with its original, one overlay per method,
its top-k, the explained class and every score, with filters, sorting, search and paging.

Runs are read only through :func:`xaicli.records.read_run`. A run writes its report and grid once,
when the whole run is on disk (:func:`finish_pictures`, a step of ``run.finish_run``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_RUNTIME, OutputError

REPORT_HTML = "report.html"


class ReportError(OutputError):
    """A report or contact sheet cannot be written (the run's own results are not affected)."""

    exit_code = EXIT_RUNTIME


def finish_pictures(out: Path, run: Mapping[str, Any]) -> None:
    """The finish step of a run: its grid and report when its config asks for them."""
    o = (run.get("config") or {}).get("output") or {}
    if o.get("grid"):
        write_grid(out)
    if o.get("report"):
        write_report(out)


def write_report(run_dir: Path, *, images: Path | None = None, progress: Any = None) -> Path:
    """``run_dir/report.html`` of one run (``images``: where its originals are, when they moved;
    ``progress``: a run.ProgressHook for the thumbnails)."""
    from ..records import read_run
    from .build import build_report

    folder = read_run(run_dir)
    return _guarded(lambda: build_report([folder], run_dir, images=images, progress=progress), run_dir)


def write_compare_report(run_dirs: Sequence[Path], out: Path, *, images: Path | None = None,
                         progress: Any = None) -> Path:
    """``out/report.html`` comparing runs side by side on the images they share."""
    from ..records import read_run
    from .build import build_report

    folders = [read_run(d) for d in run_dirs]
    return _guarded(lambda: build_report(folders, out, images=images, progress=progress), out)


def write_grid(run_dir: Path, *, images: Path | None = None) -> list[Path]:
    """The contact sheet(s) of a run: ``grid.png``, or ``grid-001.png``... when it has many images."""
    from ..records import read_run
    from .grid import write_grid_pages

    folder = read_run(run_dir)
    return _guarded(lambda: write_grid_pages(folder, images=images), run_dir)


def _guarded(make: Any, where: Path) -> Any:
    """Run ``make``; a failure to write becomes a ReportError that says the run itself is intact."""
    try:
        return make()
    except OSError as e:
        raise ReportError(
            f"cannot write the report or grid in {where}: {e.strerror or e} "
            f"({getattr(e, 'filename', None) or where}); the run's results are complete",
            f"fix the problem, then run `xai report {where}`",
        ) from None
