"""`moe-export generate EXPORT_DIR`: greedy generation on a KV-cache export, printing tokens and tokens/s.

Exit 0: generated; 2: bad input (not a decoder export, bad ids, no tokenizer for --prompt, missing runtime).
"""

from __future__ import annotations

from pathlib import Path

import typer

from moe_export.cli import checks
from moe_export.cli.app import command, console, parse_int_list, print_json
from moe_export.errors import MoeExportError


@command("generate")
def generate_command(
    export_dir: Path = typer.Argument(
        ..., metavar="EXPORT_DIR", help="KV-cache export directory (model.onnx + genai_config.json)."
    ),
    prompt_ids: str | None = typer.Option(
        None, "--prompt-ids", help="Prompt token ids, e.g. 1,2,3 (give this or --prompt, not both)."
    ),
    prompt: str | None = typer.Option(
        None, "--prompt", help="Prompt text; needs tokenizer files in the export (give this or --prompt-ids)."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="New tokens at most (an EOS stops earlier)."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime, onnxruntime-genai or torch."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (onnxruntime, torch)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (on stdout)."),
) -> None:
    """Generate greedily from a prompt and print the new tokens and tokens/s.

    The prompt is exactly one of --prompt-ids or --prompt."""
    from moe_export.runtimes.generate import generate

    if (prompt_ids is None) == (prompt is None):
        raise MoeExportError("give exactly one of --prompt-ids 1,2,3 or --prompt TEXT")
    checks.at_least(threads, 1, "--threads")
    checks.input_dir(export_dir, "export directory")
    ids = parse_int_list(prompt_ids, "--prompt-ids") if prompt is None else None
    source = prompt if prompt is not None else (ids if isinstance(ids, list) else [ids])  # text: the API tokenizes it
    result = generate(export_dir, source, max_new_tokens, runtime, threads, progress=not as_json)  # type: ignore[arg-type]
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"prompt ids: {result.prompt_ids}", highlight=False)
    console.print(f"new tokens: {result.tokens}", highlight=False)
    if result.text is not None:
        console.print(f"text: {result.text!r}", highlight=False)
    console.print(
        f"{len(result.tokens)} tokens in {result.seconds * 1000:.1f} ms ({result.tokens_per_second:.1f} tokens/s, "
        f"{result.runtime}, greedy)",
        highlight=False,
    )
