"""The Typer app, global options and the error boundary shared by every command."""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from moe_export import __version__
from moe_export.errors import InternalError, MoeExportError, ParityError
from moe_export.files import environment_fault


class _Command(typer.core.TyperCommand):
    """Usage lines in the conventional form (`CKPT`, `[ACTION]`): typer writes a required argument as `{ckpt}`."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


# Plain click help (rich_markup_mode=None): typer's rich panels show flags as `--json <bool>`, which reads
# as if a value were expected (`--json true` is then refused), and wrap into boxes in a CI log.
app = typer.Typer(
    name="moe-export",
    rich_markup_mode=None,
    help="Deploy mixture-of-LoRA-experts checkpoints: inspect, calibrate, merge, export to ONNX/TensorRT, validate.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
# When the output is not a terminal (CI logs, pipes) rich assumes 80 columns and folds or cuts table cells
# (`routed+…`); a log has no width limit, so tables there get as wide as their content needs (up to 200).
LOG_WIDTH = 200


def _make_console(stderr: bool) -> Console:
    """Lines of text are never broken by rich (soft wrap): a terminal wraps them at its own width, and a log
    keeps each message on one line (rich would break it mid-sentence at the console width)."""
    probe = Console(stderr=stderr, soft_wrap=True)
    return probe if probe.is_terminal else Console(stderr=stderr, width=LOG_WIDTH, soft_wrap=True)


console = _make_console(stderr=False)
err_console = _make_console(stderr=True)
_state = {"debug": False}
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by SIGINT

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-export {__version__}")
        raise typer.Exit()


def _quiet_third_party() -> None:
    """Silence known-harmless noise from the libraries we drive; a CLI user should see our output only.

    torch's ONNX exporter logs a warning per missing torchvision op and a LeafSpec deprecation, and
    transformers draws a weight-loading bar for every model load. Library users keep their own settings:
    this runs only for the command line.
    """
    import logging
    import warnings

    # A filter, not a level: torch's logging setup resets levels of its loggers when torch is imported.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(lambda record: "torchvision" not in record.getMessage())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
    warnings.filterwarnings("ignore", message=".*training mode.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.callback(invoke_without_command=True)
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if ctx.invoked_subcommand is None:
        # Bare `moe-export`: the help on stdout and exit 0, as pip does (asking what there is is not an error;
        # click's no_args_is_help prints it on stderr with the usage-error code 2).
        typer.echo(ctx.get_help())
        raise typer.Exit()
    _state["debug"] = debug
    if not debug:
        _quiet_third_party()


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a command behind the error boundary: whose fault an exception is decides the exit code.

    MoeExportError (bad input) -> its one line, exit 2; ParityError -> FAILED line, exit 1; anything else
    (InternalError, a library crash) -> a line saying it is a bug, exit 3. `--debug` adds the traceback and
    never changes the exit code."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
                raise
            except KeyboardInterrupt:
                # Ctrl-C or SIGTERM (see `main`): every writer has removed its temporary files on the way
                # out (they clean up on BaseException), and outputs are renamed into place only when done.
                err_console.print("interrupted: no output was written", highlight=False)
                raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
            except MoeExportError as exc:
                _show_traceback_if_debug()
                message = escape(str(exc))  # a message may hold brackets, e.g. pip extras: 'moe-export[gpu]'
                if isinstance(exc, ParityError):
                    err_console.print(f"[bold red]FAILED[/]: {message}", highlight=False)
                else:
                    err_console.print(f"[bold red]error[/]: {message}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:
                _show_traceback_if_debug()
                fault = environment_fault(exc) if isinstance(exc, OSError) else None
                if fault is not None:  # a full disk, a read-only mount, permissions: the environment's fault
                    err_console.print(f"[bold red]error[/]: {escape(str(fault))}", highlight=False, soft_wrap=True)
                    raise typer.Exit(fault.exit_code) from None
                first = (str(exc).splitlines() or [""])[0][:300]
                hint = "" if _state["debug"] else "; rerun with --debug for the traceback"
                err_console.print(
                    f"[bold red]internal error[/] (a bug in moe-export or a library it drives, not your input): "
                    f"{escape(type(exc).__name__)}: {escape(first)}{hint}; please report it",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(InternalError.exit_code) from None

        app.command(name, cls=_Command, **kwargs)(wrapper)
        return func

    return decorate


def _show_traceback_if_debug() -> None:
    if _state["debug"]:
        traceback.print_exc(file=sys.stderr)


def report_console(min_width: int = 120) -> Console:
    """Where every command's tables and reports go: stdout (results on stdout, progress and notes on stderr,
    as git and pip do), at least `min_width` columns in a terminal so that no cell is cut at 80."""
    if not console.is_terminal:
        return console
    return Console(width=max(console.width, min_width), soft_wrap=True)


def finish_report(report: Any, as_json: bool, files: list[tuple[Path | None, Callable[[Path], Any]]]) -> None:
    """Write the files asked for (path, writer), show the report, then `report.check()` (exit 1 on a failure).

    Shown as JSON on stdout, or as rich tables on the report console.
    """
    written = []
    for path, write in files:
        if path is not None:
            write(path)
            written.append(path)
    if as_json:
        print_json(report.to_dict())
    else:
        report.render(report_console())
    for path in written:  # with --json on stderr: stdout holds the JSON alone
        (err_console if as_json else console).print(f"wrote {path}", highlight=False, markup=False)
    report.check()


def print_json(data: Any) -> None:
    """Machine output on stdout: plain JSON, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def shell_command(*words: object) -> str:
    """A command line to suggest, quoted for a POSIX shell (a path with spaces stays one word)."""
    return " ".join(shlex.quote(str(word)) for word in words)


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


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so the same cleanup runs on SIGTERM (CI timeouts, kill)


class _ClosedPipeSafeStdout:
    """sys.stdout that survives its reader going away (`moe-export inspect CKPT | head -n1`).

    Once a write or flush meets a closed pipe, stdout is pointed at /dev/null and the command runs on to its
    real exit code, printing nothing more, as `cat` and `git` end quietly; without this the BrokenPipeError
    surfaced as a crash (exit 3) or, at interpreter exit, as exit 1, the parity-failed code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # later writes and the flush at exit go nowhere, silently
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    sys.stdout = _ClosedPipeSafeStdout(sys.stdout)  # type: ignore[assignment]
    app()
