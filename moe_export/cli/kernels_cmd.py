"""`moe-export kernels [status|build]`: the native ONNX Runtime kernel library, its path and status."""

from __future__ import annotations

import json

import typer

from moe_export.cli.app import command, console, print_json
from moe_export.errors import MoeExportError

ACTIONS = ("status", "build")


@command("kernels")
def kernels_command(
    action: str = typer.Argument(
        "status", metavar="ACTION", help="status (default): print the library path and state; build: build it."
    ),
    fetch_headers: bool = typer.Option(
        False, "--fetch-headers", help="build: fetch the ONNX Runtime headers (Debian libonnxruntime-dev) if missing."
    ),
    force: bool = typer.Option(False, "--force", help="build: recompile even when the library is already built."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """The native GroupedLoRA kernels for ONNX Runtime CPU: where the library is, and how to use it elsewhere.

    moe-export's own ORT sessions register the library by themselves (building it on first use when a
    compiler and the headers are here); other programs register the printed path.
    """
    from moe_export.runtimes import native

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True, markup=False)  # paths stay whole, copy-pastable

    if action not in ACTIONS:
        raise MoeExportError(f"kernels {action!r}: choose from {', '.join(ACTIONS)}")
    if action == "build":
        path = native.build(fetch=fetch_headers, force=force)
        if not as_json:
            say(f"built {path}")
    state = native.status()
    if as_json:
        print_json({**state.__dict__, "library": state.library and str(state.library)})
        return
    if state.library is None:
        say(f"native kernels: not available ({state.reason})")
        say("ONNX Runtime runs the exported function bodies (same results, slower on CPU).")
        return
    say(f"library: {state.library}")
    say(
        f"status: {'off (' + state.reason + ')' if state.reason else 'on'}; instruction set {state.isa}; "
        f"ORT API {state.api_version} (works with onnxruntime >= 1.{state.api_version}); "
        f"compiler {state.compiler_version}"
    )
    say("use it in your own sessions:")
    say(f"  python: options.register_custom_ops_library({str(state.library)!r})")
    genai = {"session_options": {"custom_ops_library": str(state.library)}}
    say(f"  onnxruntime-genai (genai_config.json, model.decoder): {json.dumps(genai)}")
    say("  (KV-cache exports made here ship a copy and name it in their genai_config.json already)")
