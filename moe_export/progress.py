"""Progress on stderr, in one place for every stage: a bar for counted work, a spinner for steps.

Both draw only where they can: rich cannot redraw in CI logs or pipes, and a transient display still leaves an
empty line behind when it ends, so elsewhere they stay silent. Reports and tables never go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr; yields the function that advances it (by one step, or by n)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not enabled or not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


class _Quiet:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def status_spinner(console: Any, enabled: bool, message: str) -> Iterator[Any]:
    """A rich spinner whose message `update(...)` changes, or a no-op when progress is off. Always on stderr:
    the `console` a caller passes gets the reports (tables), which the CLI shows on stdout."""
    from rich.console import Console

    console = Console(stderr=True) if not console.stderr else console
    if not enabled:
        yield _Quiet()
        return
    with console.status(message) as status:
        yield status
