"""The `xai` command: one short function per command. Library code raises XaiError; only this
module prints it (rich, one line plus a hint) and exits with its code; --debug adds the traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_RUNTIME, XaiError, printable

app = typer.Typer(
    name="xai",
    help="Explain image classifiers: heatmaps, scores and checks from the command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True)
console = Console()

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"xaicli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def say(*parts: str | tuple[str, str], console_: Console | None = None) -> None:
    """Print one message on stderr: plain strings are user text (shown as is: no rich markup, no
    terminal control characters, see errors.printable), ``(text, style)`` pairs are ours."""
    from rich.text import Text

    text = Text.assemble(*[(p[0], p[1]) if isinstance(p, tuple) else printable(p) for p in parts])
    (console_ or err_console).print(text, highlight=False, soft_wrap=True)


def say_warning(message: str) -> None:
    """``warning: message`` on stderr, as a run's start says them."""
    say(("warning:", "bold yellow"), " ", message)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the run is, so it stops as on Ctrl-C (finished images kept)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop a command like Ctrl-C does (exit 128 + the signal's number)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), handler) for n in names}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(getattr(signal, n), h)


def exit_code_of(e: BaseException) -> int:
    """The exit code of an error, the same with and without --debug: an XaiError's own code,
    128 + the signal for an interruption (130 for Ctrl-C), 3 for anything unexpected."""
    if isinstance(e, XaiError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return 128 + getattr(e, "signum", 2)
    return EXIT_RUNTIME


@contextmanager
def user_errors() -> Iterator[None]:
    """XaiError -> one red line, a hint and its exit code; anything else -> exit 3 with a short
    line; an interruption (Ctrl-C, SIGTERM, SIGHUP) -> the resume hint and 128 + the signal.
    --debug adds the traceback and keeps the exit code."""
    try:
        with _signals_interrupt():
            yield
    except (typer.Exit, typer.Abort):
        raise
    except XaiError as e:
        _traceback_if_debug()
        say(("error: ", "bold red"), e.message)
        if e.hint:
            say(("  hint: ", "yellow"), e.hint)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        _traceback_if_debug()
        import signal

        name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
        say(("interrupted", "bold red"), f" ({name}): finished images are kept; rerun with --resume to continue")
        raise typer.Exit(exit_code_of(e)) from None
    except Exception as e:
        _traceback_if_debug()
        say(("internal error: ", "bold red"), f"{type(e).__name__}: {e}")
        if not _state["debug"]:
            say(("  hint: ", "yellow"), "rerun with `xai --debug ...` for the traceback")
        raise typer.Exit(EXIT_RUNTIME) from None


def _traceback_if_debug() -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exc(file=sys.stderr)


def _progress(quiet: bool = False) -> Any:
    """Progress on stderr (xaicli/progress.py): a live line fitted to the terminal, plain
    rate-limited lines in a CI log or pipe; warnings even when ``quiet``."""
    from .progress import console_progress

    return console_progress(err_console, quiet)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from .errors import ConfigError

    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected I/N such as 0/4, got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard: need 0 <= I < N, got {value!r}")
    return i, n


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file, or a shipped config by name (resnet50, vgg16, densenet121, "
                 "mobilenet_v3_large, convnext_tiny); the embedded default (EfficientNet-Lite0, ImageNet) if omitted. "
                 "A config is code (model.factory imports and calls it): use only configs you trust like code."),
]
TrainConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file, or a shipped training config by name (train/resnet18, "
                 "train/efficientnet_lite0); the embedded default (EfficientNet-Lite0, ImageNet) if omitted."),
]


@app.command()
def explain(
    images: Annotated[Path, typer.Argument(help="Folder of images (walked recursively) or one image file.")],
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("xai-out"),
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Method name(s), comma-separated (see `xai methods`).")
    ] = None,
    layer: Annotated[str | None, typer.Option("--layer", "-l", help="Target layer, e.g. layer4 or NAME:input.")] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="predicted (default), a class index or name, topK; per image: folder "
                     "(the parent folder names the class) or a CSV/JSON file (path,target); predicted,folder or "
                     "predicted,FILE for both maps."),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Loader worker processes (at most the CPUs available).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast).")] = None,
    save_maps: Annotated[
        bool | None, typer.Option("--save-maps/--no-save-maps", help="Also write raw maps as .npy.")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Overlay format: png or jpg.")] = None,
    metrics: Annotated[
        str | None, typer.Option("--metrics", help="Metrics to compute, comma-separated (see `xai metrics`).")
    ] = None,
    ground_truth: Annotated[
        Path | None,
        typer.Option("--ground-truth", help="Masks folder mirroring the input tree, or a CSV/JSON file of boxes."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip images already complete in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in --out.")] = False,
    shard: Annotated[str | None, typer.Option("--shard", help="Process only part I of N of the sorted list: I/N.")] = None,
    annotate: Annotated[
        bool | None,
        typer.Option("--annotate/--no-annotate", help="Caption under each overlay: method, class, probability, "
                     "rank, colour bar (default on; --no-annotate: bare overlays)."),
    ] = None,
    grid: Annotated[
        bool | None, typer.Option("--grid", help="Also write grid.png: a contact sheet of the run.", show_default=False)
    ] = None,
    report: Annotated[
        bool | None,
        typer.Option("--report", help="Also write report.html: summary, plots and every image (offline HTML).",
                     show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Explain every image in a folder: overlays, optional raw maps, scores.jsonl and run.json.

    Exit codes: 0 all images succeeded, 1 some failed (the rest completed), 2 usage or config error
    (another run holds --out), 3 the run could not proceed (model, disk full, read-only file system);
    128 + N when stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: rerun with --resume).

    A config is code: model.factory imports and calls Python code, so use only configs you trust
    like code.
    """
    with user_errors():
        from .config import apply_overrides, load_config
        from .run import run_explain
        from .shards import dist_env

        dist = dist_env()
        quiet = quiet or (dist is not None and dist.rank != 0)  # one progress bar per torchrun job

        cfg = load_config(config)
        cfg = apply_overrides(
            cfg, method=method, layer=layer, target=target, device=device, batch_size=batch_size,
            workers=workers, precision=precision, save_maps=save_maps, fmt=fmt, metrics=metrics,
            ground_truth=str(ground_truth) if ground_truth is not None else None, annotate=annotate,
            grid=grid or None, report=report or None,
        )
        result = run_explain(
            cfg, images, out, progress=_progress(quiet), resume=resume, overwrite=overwrite,
            shard=_parse_shard(shard), argv=sys.argv,
        )
        if not quiet:
            _summary(result)
            if result.run.get("metrics") and result.ok:
                _print_comparison([result.out], as_json=False)
            _pictures_written(result.out, result.pending)
        raise typer.Exit(result.exit_code)


def _pictures_written(out: Path, pending: list[str]) -> None:
    """Say where the report and the contact sheet are (once the run has finished them)."""
    if pending:
        return
    found = [p for p in (out / "report.html", out / "grid.png") if p.is_file()]
    found += sorted(out.glob("grid-[0-9][0-9][0-9].png"))
    for p in found:
        err_console.print(f"  wrote {p}", highlight=False, soft_wrap=True)


def _summary(result: Any) -> None:
    from .progress import rate_text

    run = result.run
    t = run["timings"]
    rate = f", {rate_text(t['images_per_s'])}" if t.get("images_per_s") else ""
    merged = result.merged
    ok, failed = (merged.ok, merged.failed) if merged is not None else (result.ok, result.failed)
    say(("done", "bold green"),
        f": {ok} ok, {failed} failed" + (f", {result.skipped} already done" if result.skipped and merged is None else "")
        + f" -> {result.out}/ ({run['model']}, layer {_layer_text(run)}, {run['device']['type']}{rate})")
    if result.pending:
        say(f"  part {run['part']['label']} done; waiting for {', '.join(result.pending)}: the last part to finish "
            f"merges them (or run `xai merge {result.out}`)")
    elif merged is not None:
        say(f"  merged parts {', '.join(merged.merged_parts)} into scores.jsonl and run.json")
    for note in [*getattr(result, "notes", []), *(merged.notes if merged is not None else [])]:
        say(("  note: ", "yellow"), note)
    for f in run["failures"][:10]:
        say(("  failed ", "red"), f"{f['path']}: {(f.get('error') or {}).get('message')}")
    if len(run["failures"]) > 10:
        say(f"  ... and {len(run['failures']) - 10} more (see run.json)")


def _layout_or_none(shape: tuple[int, ...], size: tuple[int, int], cfg: Any) -> Any:
    from .errors import LayerError
    from .layers import detect_layout

    try:
        return detect_layout(shape, size, cfg.layer_layout, cfg.prefix_tokens)
    except LayerError:
        return None  # `xai explain` says why; the table is still worth printing


def _layer_text(run: dict[str, Any]) -> str:
    """The target layer as the summary names it: automatic or not, and its layout when not (B, C, h, w)."""
    notes = ["automatic"] if run.get("layer_auto") else []
    layout = run.get("layer_layout") or {}
    if layout.get("layout") == "tokens":
        grid = "x".join(map(str, layout["grid"]))
        notes.append(f"tokens: {layout['prefix_tokens']} prefix + {grid} grid")
    elif layout.get("layout") == "nhwc":
        notes.append("channels-last")
    return f"{run['layer']}" + (f" ({'; '.join(notes)})" if notes else "")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `xai explain --out`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    report: Annotated[
        bool, typer.Option("--report", help="Write OUT/report.html: the runs side by side on the images they share.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the --report.")] = Path("xai-compare"),
    images: Annotated[
        Path | None, typer.Option("--images", help="Where the originals are, if they moved since the runs.")
    ] = None,
) -> None:
    """Compare methods on the same images: metric means ± std per run and method (and, with
    --report, an HTML page with the runs' overlays side by side)."""
    with user_errors():
        _print_comparison(runs, as_json)
        if report:
            from .report import write_compare_report

            path = write_compare_report(runs, out, images=images, progress=_progress(as_json))
            err_console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command(name="report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `xai explain --out`.")],
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png, the contact sheet.")] = False,
    images: Annotated[
        Path | None, typer.Option("--images", help="Where the originals are, if they moved since the run.")
    ] = None,
) -> None:
    """Write RUN_DIR/report.html: the run's summary, metric plots, check and sanity results, and
    every image with its overlays, top-k and scores (filter, sort, search). Offline, self-contained
    (thumbnails under RUN_DIR/report/); rerun after `xai check --out RUN_DIR` to include its results.

    Exit codes: 0 written, 2 not a run folder, 3 cannot write.
    """
    with user_errors():
        from .report import write_grid, write_report

        paths = [write_report(run_dir, images=images, progress=_progress())]
        if grid:
            paths += write_grid(run_dir, images=images)
        for p in paths:
            err_console.print(f"wrote {p}", highlight=False, soft_wrap=True)


def _print_comparison(runs: list[Path], as_json: bool) -> None:
    import json

    from .metrics.compare import compare_runs, comparison_table
    from .records import read_run

    result = compare_runs([read_run(r) for r in runs])
    if as_json:
        console.print_json(json.dumps(result))
        return
    _print_wide(comparison_table(result))
    for note in result["notes"]:
        say(("note: ", "yellow"), note)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The --out folder of a sharded run (holding parts/).")],
    partial: Annotated[bool, typer.Option("--partial", help="Merge even if some parts have not finished.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Merge the parts of a sharded run (--shard I/N or torchrun) into scores.jsonl and run.json.

    Exit codes: 0 all images succeeded, 1 some failed, 2 nothing to merge or parts missing.
    """
    with user_errors():
        from .errors import OutputError
        from .run import merge_run

        result = merge_run(out, partial=partial)
        if result is None:
            raise OutputError(f"{out}: no parts to merge (no {out}/parts/scores.*-of-*.jsonl)",
                              "parts are merged automatically when the last one finishes")
        if not quiet:
            say(("merged", "bold green"), f" {len(result.merged_parts)} parts -> {out}/scores.jsonl: "
                f"{result.records} images, {result.ok} ok, {result.failed} failed"
                + (f"; incomplete: {', '.join(result.incomplete)}" if result.incomplete else ""))
            for note in result.notes:
                say(("  note: ", "yellow"), note)
        raise typer.Exit(result.exit_code)


@app.command()
def methods(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every method: family, gradients, cost in passes per image for the configured knobs.

    With --config the model is built (on the CPU) so that costs that depend on the target layer's
    channels (Score-CAM) are counted for it.
    """
    with user_errors():
        import json

        from .config import Config, load_config
        from .listing import method_rows, methods_table
        from .plan import resolve_plan

        cfg = resolve_plan(load_config(config) if config else Config()).cfg
        channels = _layer_channels(cfg) if config else None
        rows = method_rows(cfg, channels)
        if as_json:
            console.print_json(json.dumps(rows))
            return
        _print_wide(methods_table(rows, "xai methods" + (f" (target layer: {channels} channels)" if channels else "")))


@app.command()
def metrics(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every metric: what it measures, the keys it writes to scores.jsonl, its cost in
    forward passes per image and method, and its knobs (as the config sets them)."""
    with user_errors():
        import json

        from .config import Config, load_config
        from .listing import metric_rows, metrics_table
        from .plan import resolve_plan

        rows = metric_rows(resolve_plan(load_config(config) if config else Config()).cfg)
        if as_json:
            console.print_json(json.dumps(rows))
            return
        _print_wide(metrics_table(rows))


def _print_wide(table: Any) -> None:
    """Print a table; into a pipe or a CI log (no terminal width) at its natural width, never
    squeezing names and numbers into folded cells."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, Measurement.get(console, console.options.update_width(10_000), table).maximum)
    try:
        console.print(table)
    finally:
        console.width = width


def _layer_channels(cfg: Any) -> int | None:
    """Channels of the config's target layer (the model built on the CPU, one dummy forward)."""
    import dataclasses

    import torch

    from .config import apply_overrides
    from .engine import setup

    st = setup(apply_overrides(dataclasses.replace(cfg, metrics={}), method="gradcam"), torch.device("cpu"),
               architecture_only=True)
    for note in st.loaded.notes if st.loaded.sources["weights"].startswith("not loaded") else ():
        say_warning(note)
    return int(st.layer_shape[0]) if st.layer_shape else None


@app.command()
def layers(
    config: ConfigOpt = None,
    all_layers: Annotated[bool, typer.Option("--all", help="Also list modules that did not run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print the model's module tree with each module's output shape for one dummy image."""
    with user_errors():
        import json

        from rich.table import Table

        from .config import load_config
        from .layers import auto_layer, layer_table, parse_layer_spec, trace_modules
        from .models import build_model

        cfg = load_config(config)
        loaded = build_model(cfg.model, cfg.preprocess, architecture_only=True)
        if loaded.sources["weights"].startswith("not loaded"):
            for note in loaded.notes:
                say_warning(note)
        size = loaded.preprocess.input_size
        seen = trace_modules(loaded.module, size)  # one dummy forward for the table and the automatic layer
        rows = layer_table(loaded.module, size, seen=seen)
        auto = auto_layer(loaded.module, size, seen=seen).spec
        chosen = cfg.target_layer or auto
        base, use_input = parse_layer_spec(chosen)
        row = next((r for r in rows if r.name == base), None)
        shape = (row.input_shape if use_input else row.output_shape) if row else None
        layout = _layout_or_none(shape, size, cfg) if shape else None
        if as_json:
            console.print_json(json.dumps({
                "model": loaded.description, "input_size": list(size), "auto_layer": auto, "target_layer": chosen,
                "layer_layout": layout.describe() if layout else None,
                "layers": [r.__dict__ for r in rows if all_layers or r.calls],
            }))
            return
        from rich.markup import escape

        table = Table(title=escape(printable(f"{loaded.description}, input 1x3x{size[0]}x{size[1]}")))
        for col in ("layer", "type", "output shape", "calls"):
            table.add_column(col)
        auto_base = auto.split(":")[0]
        for r in rows:
            if not all_layers and not r.calls:
                continue
            mark = " [bold green]<- target[/]" if r.name == base else ""
            mark += " [cyan](auto)[/]" if r.name == auto_base else ""
            table.add_row("  " * r.depth + escape(printable(r.name)) + mark, escape(printable(r.type)),
                          "x".join(map(str, r.output_shape)) if r.output_shape else "-", str(r.calls))
        console.print(table)
        say("target layer: ", (printable(chosen), "bold"), f" (automatic choice: {auto})"
            + (f"; layout: {layout.text()}" if layout else ""), console_=console)


@app.command()
def sanity(
    images: Annotated[Path, typer.Argument(help="Folder of images (walked recursively) or one image file.")],
    config: ConfigOpt = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method(s) to test; default: the config's.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Group the blocks into N steps (default: one step per block).")
    ] = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Use the first N images (sorted).")] = 32,
    max_spearman: Annotated[
        float, typer.Option("--max-spearman", help="FAIL a method whose Spearman |map| at full randomization is above.")
    ] = 0.5,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the re-initialisation (default runtime.seed).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write sanity.json into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Model-parameter randomization test (Adebayo et al. 2018): re-initialise the layers from the
    logits down, recompute the maps, report Spearman and SSIM against the original maps.

    Exit codes: 0 every method's maps change, 1 some method FAILS, 2 usage error, 3 runtime error.
    """
    with user_errors():
        import json

        from .config import apply_overrides, load_config
        from .outputs import check_writable, write_json
        from .sanity import run_sanity, table, verdict_lines

        cfg = apply_overrides(load_config(config), method=method, device=device, batch_size=batch_size, seed=seed)
        if out is not None:
            check_writable(out, "--out", folder=True)  # before the test runs, not after
        res = run_sanity(cfg, images, steps=steps, max_images=max_images, max_spearman=max_spearman,
                         progress=_progress(quiet or as_json))
        if out is not None:
            write_json(out / "sanity.json", res.report)
        if as_json:
            console.print_json(json.dumps(res.report))
        else:
            _print_wide(table(res.report))
            for line in verdict_lines(res.report):
                console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit(1 if res.failed_methods else 0)


@app.command()
def check(
    expect: Annotated[Path, typer.Option("--expect", "-e", help="Expectations YAML (rules).")],
    images: Annotated[Path | None, typer.Argument(help="Images to explain (not needed with --run).")] = None,
    config: ConfigOpt = None,
    run: Annotated[Path | None, typer.Option("--run", help="Check this existing run folder instead of explaining.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Keep the run (and check.json) here.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML: one test case per rule.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in --out.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="Metrics to compute, comma-separated.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Check a run against expectations (for CI): a table of rules with pass/fail and the measured value.

    Exit codes: 0 every rule passes, 1 a rule fails, 2 usage error (bad expectations file), 3 runtime error.
    """
    with user_errors():
        from .check import junit_xml, run_check, table
        from .config import apply_overrides, load_config
        from .outputs import atomic_write, check_writable

        cfg = apply_overrides(load_config(config), device=device, batch_size=batch_size, metrics=metrics)
        if junit is not None:
            check_writable(junit, "--junit", folder=False)  # before the run, not after
        res = run_check(expect, cfg=cfg, images=images, out=out, run_dir=run, overwrite=overwrite,
                        progress=_progress(quiet), sanity_progress=lambda: _progress(quiet), argv=sys.argv)
        if junit is not None:
            atomic_write(junit, junit_xml(res.outcomes, time_s=res.seconds))
        if out is not None and (out / "report.html").is_file():
            from .report import write_report

            write_report(out)  # the report of this run now shows the check (and sanity) results
        _print_wide(table(res.outcomes, title=f"xai check: {expect.name}"))
        n_fail = sum(1 for o in res.outcomes if not o.passed)
        console.print(f"[bold {'red' if n_fail else 'green'}]{len(res.outcomes) - n_fail} of {len(res.outcomes)} "
                      "rules passed[/]", highlight=False)
        raise typer.Exit(1 if n_fail else 0)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Images: DIR/train/<class>/* (+ DIR/val/<class>/*) "
                                       "or DIR/<class>/* (a seeded split).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: model.pth, config.yaml, train.json, last.pth.")],
    config: TrainConfigOpt = None,
    head: Annotated[str | None, typer.Option("--head", help="cam or acol (default: the config's head:, else cam).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (train.epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per step (train.batch_size).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (train.lr).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the split, order and augmentation (train.seed).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Loader worker processes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or epoch lines.")] = False,
) -> None:
    """Fine-tune a backbone with a CAM head (GAP + linear) or an ACoL head for localization.

    Writes RUN/model.pth (best validation accuracy), RUN/config.yaml for `xai explain --config`,
    RUN/train.json (curves) and RUN/last.pth (resumable with --resume; Ctrl-C saves it too).
    Exit codes: 0 trained, 2 usage or config error, 3 runtime error, 128 + N stopped by signal N
    (130 Ctrl-C, 143 SIGTERM).
    """
    with user_errors():
        from .config import apply_overrides, load_config
        from .train import run_train
        from .train.progress import RichTrainProgress

        cfg = apply_overrides(load_config(config), head=head, epochs=epochs, train_batch_size=batch_size, lr=lr,
                              train_seed=seed, device=device, workers=workers)
        try:
            res = run_train(cfg, data, out, resume=resume, overwrite=overwrite, progress=RichTrainProgress(quiet),
                            argv=sys.argv)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: 128 + the signal
            say(("interrupted", "bold red"), f": the training state is saved in {out}/last.pth and the model in "
                f"{out}/model.pth; rerun with --resume to continue")
            raise typer.Exit(exit_code_of(e)) from None
        if not quiet:
            err_console.print(f"[bold green]done[/]: {res.epochs_done} epochs, best validation accuracy "
                              f"{res.best_val_acc:.4f} (epoch {res.best_epoch}) -> {out}/model.pth\n"
                              f"  explain it: xai explain IMAGES --config {out}/config.yaml", highlight=False,
                              soft_wrap=True)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write train/, val/, ground_truth/ and synth.json into.")],
    classes: Annotated[str, typer.Option("--classes", help="How many classes (the first N of disc, stripes, checker, "
                                         "triangle, dots, star, square, cross), or their names: disc,star.")] = "4",
    per_class: Annotated[int, typer.Option("--per-class", help="Training images per class.")] = 50,
    val_per_class: Annotated[int, typer.Option("--val-per-class", help="Validation images per class.")] = 20,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (square images).")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same files for the same arguments.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a data set already in the folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Generate a labelled data set whose object boxes and masks are known: shapes and textures at
    random places, scales and rotations on crops of scikit-image's photos. For `xai train --data
    DIR` and `xai explain DIR/val --ground-truth DIR/ground_truth/val/masks` (or .../boxes.csv)."""
    with user_errors():
        from .synth import SynthSpec, generate, parse_classes

        spec = SynthSpec(classes=parse_classes(classes), per_class=per_class, val_per_class=val_per_class, size=size, seed=seed)
        res = generate(out, spec, overwrite=overwrite, progress=_progress(quiet))
        if not quiet:
            err_console.print(f"[bold green]done[/]: {res.counts['train']} training and {res.counts['val']} validation "
                              f"images of {len(spec.names)} classes -> {out}/ (ground truth in {out}/ground_truth/)",
                              highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    # OpenMP threads that spin while they wait take the cores the loader workers, the writer
    # threads and other processes need (about 2x slower end to end on a busy 2-core machine; no
    # difference in memory on a quiet one: docs/performance.md). Set before torch loads OpenMP;
    # the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except SystemExit as e:
        raise SystemExit(e.code if e.code is not None else 0) from None


if __name__ == "__main__":
    main()

