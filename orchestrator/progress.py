"""Progress display on the driver (rich): bars for experts and trials, and messages."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress
from rich.text import Text


class Bar:
    def __init__(self, progress: _RichProgress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._id, n)

    def update(self, description: str | None = None, completed: float | None = None) -> None:
        self._p.update(self._id, description=description, completed=completed)


class Progress:
    """A live progress display; outside a ``with`` block messages still print."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._rich = _RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=self.console, transient=False)

    def __enter__(self) -> "Progress":
        self._rich.start()
        return self

    def __exit__(self, *exc) -> None:
        self._rich.stop()

    def task(self, description: str, total: float, completed: float = 0) -> Bar:
        return Bar(self._rich, self._rich.add_task(description, total=total, completed=completed))

    def info(self, message: str) -> None:
        self.console.print(Text(message))

    def warn(self, message: str) -> None:
        self.console.print(Text.assemble(("warning: ", "yellow"), message))
