"""What `xai train` shows while it runs, on stderr: a bar per epoch with the running loss,
accuracy and images/s, then one line per epoch (also readable in a CI log, where the bar is not
drawn)."""

from __future__ import annotations

from typing import Any


class RichTrainProgress:
    """A rich progress bar per epoch and a summary line per epoch; silent when ``quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True)
        self._p: Any = None
        self._task: Any = None

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    def start(self, total: int, description: str) -> None:
        if self.quiet or not self.console.is_terminal:  # a log gets the epoch lines only
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                           transient=True)
        self._p.start()
        self._task = self._p.add_task(description, total=total, info="")

    def update(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, info=f"loss {loss:.4f}  acc {acc:.3f}  {images_per_s:.1f} img/s")

    def finish(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def epoch(self, record: dict[str, Any], best: bool) -> None:
        if self.quiet:
            return
        rate = record.get("images_per_s")
        self.console.print(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f}, "
            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f}"
            + (f", {rate:.1f} img/s" if rate else "") + (" [green](best, saved)[/]" if best else ""),
            highlight=False, soft_wrap=True,
        )
