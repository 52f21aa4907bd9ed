"""The Typer app, global options and the error boundary shared by every command."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from moe_export import __version__
from moe_export.errors import MoeExportError, ParityError

app = typer.Typer(
    name="moe-export",
    help="Deploy mixture-of-LoRA-experts checkpoints: inspect, calibrate, merge, export to ONNX/TensorRT, validate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-export {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a command whose MoeExportErrors become one-line messages and exit codes."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except MoeExportError as exc:
                if _state["debug"]:
                    raise
                message = escape(str(exc))  # a message may hold brackets, e.g. pip extras: 'moe-export[gpu]'
                if isinstance(exc, ParityError):
                    err_console.print(f"[bold red]FAILED[/]: {message}", highlight=False)
                else:
                    err_console.print(f"[bold red]error[/]: {message}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None

        app.command(name, **kwargs)(wrapper)
        return func

    return decorate


def print_json(data: Any) -> None:
    """Machine output on stdout: plain JSON, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_int_list(value: str | None, option: str) -> int | list[int] | None:
    """'2' -> 2, '2,2,4' -> [2, 2, 4] (one per layer); anything else is a usage error."""
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MoeExportError(f"{option} {value!r}: expected an integer or a comma-separated list of integers") from None
    if not items:
        raise MoeExportError(f"{option}: empty value")
    return items[0] if len(items) == 1 and "," not in value else items


def main() -> None:
    app()
