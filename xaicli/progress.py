"""Progress of a long run on stderr, for people at a terminal and for CI logs.

What a run tells it (the hooks of :class:`xaicli.run.ProgressHook`): the images in all
(``start``), the passes each method plans per image (``plan``), a batch starting (``batch``), a
method starting on it (``method``), inputs that went through the model (``passes``, from the
engine's :class:`~xaicli.methods.batch.Runner`) and images finished (``advance``). From these
:class:`ProgressState` estimates the fraction done *inside* a batch, so a slow method shows
movement, a rate and an ETA from its first seconds instead of sitting at 0/N.

* At a terminal, :class:`TerminalProgress` redraws one line a few times a second;
  :func:`progress_line` fits it to the terminal's width by dropping the least useful parts first
  (the bar, the elapsed time, the pass counts), so 80 columns keep counts, method, rate and ETA.
* Elsewhere (a pipe, a CI log), :class:`LogProgress` prints a plain line at the start, then at most
  one every ``XAI_PROGRESS_INTERVAL`` seconds (default 10), and one at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INTERVAL_S = 10.0


def rate_text(per_s: float, unit: str = "images") -> str:
    """Throughput as people read it: images per second, or seconds per image below one."""
    short = "img" if unit == "images" else unit
    return f"{per_s:.1f} {short}/s" if per_s >= 1 else f"{1 / per_s:.1f} s/{short}"


def duration_text(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class ProgressState:
    """Counts and estimates; no output. Each method of a batch weighs ``max(1, passes per
    image)``; the fraction done counts the finished images plus the part of the batch in flight
    that its finished methods and the current method's passes stand for."""

    total: int = 0
    description: str = ""
    unit: str = "images"
    done: int = 0
    t0: float = 0.0
    per_image: dict[str, float] = field(default_factory=dict)  # method -> runner passes per image and target
    estimated: set[str] = field(default_factory=set)  # methods whose per_image is an estimate
    ranks: int = 1  # targets per image (top-k, predicted beside the true class)
    batch_size: int = 0  # images of the batch in flight (0: none)
    batch_done: float = 0.0  # weight of the batch's finished method steps
    current: str | None = None
    current_passes: int = 0
    counted: dict[str, int] = field(default_factory=dict)  # passes per method in the batch in flight
    t_work: float | None = None  # when the first batch started: rates leave out the time to get there

    def start(self, total: int, description: str, unit: str = "images", now: float | None = None) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.t0 = time.perf_counter() if now is None else now

    def plan(self, steps: list[tuple[str, int | None, bool]], ranks: int = 1) -> None:
        """(method, passes per image and target or None when unknown, exact?) in run order."""
        self.ranks = max(1, ranks)
        for name, passes, exact in steps:
            self.per_image[name] = float(passes or 0)
            if not exact or passes is None:
                self.estimated.add(name)

    def _weight(self, name: str) -> float:
        return self.batch_size * max(1.0, self.per_image.get(name, 0.0))

    def batch(self, size: int, now: float | None = None) -> None:
        if self.t_work is None:
            self.t_work = time.perf_counter() if now is None else now
        self.batch_size, self.batch_done, self.current, self.current_passes = size, 0.0, None, 0
        self.counted = {}

    def method(self, name: str) -> None:
        self._close_step()
        self.current, self.current_passes = name, 0

    def _close_step(self) -> None:
        if self.current is not None:
            self.batch_done += self._weight(self.current)
            self.counted[self.current] = self.counted.get(self.current, 0) + self.current_passes
        self.current, self.current_passes = None, 0

    def passes(self, n: int) -> None:
        self.current_passes += n

    def advance(self, n: int) -> None:
        """``n`` more images finished; a batch in flight is over: what its methods really took per
        image replaces the estimates."""
        self.done += n
        if self.batch_size:
            self._close_step()
            for name, count in self.counted.items():
                if count:
                    self.per_image[name] = count / (self.batch_size * self.ranks)
                    self.estimated.discard(name)
            self.batch_size = 0

    def _batch_weight(self) -> float:
        return self.ranks * sum(self._weight(n) for n in self.per_image) if self.per_image else 0.0

    def fraction(self) -> float:
        if self.total <= 0:
            return 1.0
        partial = 0.0
        whole = self._batch_weight()
        if self.batch_size and whole > 0:
            now = self.batch_done
            if self.current is not None:
                now += min(float(self.current_passes), self._weight(self.current))
            partial = self.batch_size * min(1.0, now / whole)
        return min(1.0, (self.done + partial) / self.total)

    def rate(self, now: float) -> float | None:
        """Images (units) per second since the first batch started (loading the first images is
        a one-off), the batch in flight counted by its fraction done."""
        elapsed = now - (self.t0 if self.t_work is None else self.t_work)
        work = self.fraction() * self.total
        return work / elapsed if elapsed > 0.5 and work > 0 else None

    def eta(self, now: float) -> float | None:
        if self.fraction() >= 1.0:
            return 0.0
        rate = self.rate(now)
        return (1 - self.fraction()) * self.total / rate if rate else None

    def method_text(self) -> str | None:
        """``occlusion 412/1600`` (passes of the batch in flight; ``~`` for an estimated plan)."""
        if self.current is None:
            return None
        planned = self.per_image.get(self.current, 0.0) * self.batch_size
        if planned < 1:
            return self.current
        if self.current in self.estimated:
            return f"{self.current} {self.current_passes}/~{round(planned)}"
        return f"{self.current} {min(self.current_passes, round(planned))}/{round(planned)}"


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def progress_parts(st: ProgressState, now: float) -> dict[str, str]:
    """The pieces of a progress line, by name."""
    rate, eta = st.rate(now), st.eta(now)
    parts = {
        "what": st.method_text() or ("" if st.done >= st.total else _short(st.description)),
        "count": f"{st.done}/{st.total}",
        "pct": f"{100 * st.fraction():.0f}%",
        "rate": rate_text(rate, st.unit) if rate else "",
        "elapsed": duration_text(now - st.t0),
        "eta": f"eta {duration_text(eta)}" if eta is not None else "eta …",
    }
    return {k: v for k, v in parts.items() if v}


# Display order; the bar comes only when the rest leaves room for it, and the other optional parts
# go in this order when the line is too long (counts and ETA always stay).
_ORDER = ("what", "bar", "count", "pct", "rate", "elapsed", "eta")
_DROP = ("elapsed", "pct", "rate", "what")
_BAR_MIN, _BAR_MAX = 10, 30


def progress_line(st: ProgressState, width: int, now: float | None = None) -> str:
    """One line of at most ``width - 1`` characters: counts and ETA always; the method, rate,
    percentage, elapsed time and a bar as room allows."""
    now = time.perf_counter() if now is None else now
    parts = progress_parts(st, now)
    limit = max(20, width - 1)
    names = [n for n in _ORDER if n in parts]
    for drop in _DROP:
        if len("  ".join(parts[n] for n in names)) <= limit:
            break
        if drop in names:
            names.remove(drop)
    room = limit - len("  ".join(parts[n] for n in names)) - 2
    if room >= _BAR_MIN:
        bar = min(_BAR_MAX, room)
        filled = round(bar * st.fraction())
        parts["bar"] = "━" * filled + "─" * (bar - filled)
        names.insert(1 if names and names[0] == "what" else 0, "bar")
    return "  ".join(parts[n] for n in names)[:limit]


def log_line(st: ProgressState, now: float | None = None) -> str:
    """A plain line for logs: every part, spelt out."""
    now = time.perf_counter() if now is None else now
    p = progress_parts(st, now)
    bits = [f"{p['count']} {st.unit} ({p['pct']})"]
    if st.current is not None:
        bits.append(p["what"] + (" passes" if "/" in p["what"] else ""))
    if "rate" in p:
        bits.append(p["rate"])
    bits.append(f"elapsed {p['elapsed']}")
    bits.append(p["eta"])
    return "progress: " + ", ".join(bits)


class _Hooks:
    """The hooks a run calls, kept in a :class:`ProgressState`; subclasses decide what is shown."""

    def __init__(self, quiet: bool = False, warn: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.quiet = quiet
        self.state = ProgressState()
        self._warn = warn
        self.clock = clock

    def warn(self, message: str) -> None:
        """Something the user should know before trusting the maps: shown even when quiet."""
        if self._warn is not None:
            self._warn(message)

    def start(self, total: int, description: str, unit: str = "images") -> None:
        self.state.start(total, description, unit, now=self.clock())
        self._started()

    def plan(self, steps: list[tuple[str, int | None, bool]], ranks: int = 1) -> None:
        self.state.plan(steps, ranks)

    def batch(self, size: int) -> None:
        self.state.batch(size, now=self.clock())

    def method(self, name: str) -> None:
        self.state.method(name)
        self._changed()

    def passes(self, n: int) -> None:
        self.state.passes(n)
        self._changed()

    def advance(self, n: int) -> None:
        self.state.advance(n)
        self._changed()

    def finish(self) -> None:
        pass

    def _started(self) -> None:
        pass

    def _changed(self) -> None:
        pass


class LogProgress(_Hooks):
    """Plain lines for logs: one at the start, at most one per ``interval`` seconds, one at the end."""

    def __init__(self, write: Callable[[str], None], quiet: bool = False, interval: float | None = None,
                 warn: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(quiet, warn, clock)
        self.write = write
        self.interval = interval if interval is not None else _interval_from_env()
        self._last = 0.0
        self._active = False

    def _started(self) -> None:
        if self.quiet:
            return
        self._active = True
        self._last = self.clock()
        self.write(f"started: {self.state.description}")

    def _changed(self) -> None:
        if self._active and self.clock() - self._last >= self.interval:
            self._last = self.clock()
            self.write(log_line(self.state, self._last))

    def finish(self) -> None:
        if self._active:
            self._active = False
            now = self.clock()
            self.write(f"finished: {self.state.done}/{self.state.total} {self.state.unit} in "
                       f"{duration_text(now - self.state.t0)}")


def _interval_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get("XAI_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class TerminalProgress(_Hooks):
    """One line redrawn in place (rich Live, a few times a second), fitted to the terminal width."""

    def __init__(self, console: Any, quiet: bool = False, warn: Callable[[str], None] | None = None) -> None:
        super().__init__(quiet, warn)
        self.console = console
        self._live: Any = None

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(progress_line(self.state, self.console.width), no_wrap=True, overflow="ellipsis")

    def _started(self) -> None:
        if self.quiet:
            return
        from rich.live import Live

        self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def finish(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def console_progress(console: Any, quiet: bool = False) -> _Hooks:
    """The progress display for ``console`` (stderr): a live line at a terminal, log lines elsewhere."""

    def warn(message: str) -> None:
        from rich.markup import escape

        console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    if console.is_terminal:
        return TerminalProgress(console, quiet, warn)
    return LogProgress(lambda line: console.print(line, highlight=False, soft_wrap=True, markup=False), quiet,
                       warn=warn)
