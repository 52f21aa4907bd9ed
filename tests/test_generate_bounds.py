"""Issue 23 item 5: generation is bounded by the model's context (prompt + new tokens, refused with exit 2
naming both numbers, before any model loads) and long generations report progress, for every runtime."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.runtimes import generate as generate_run
from tests.artifacts import sample_export
from tests.conftest import SAMPLES

RUNTIMES = ["onnxruntime", "torch", "onnxruntime-genai"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # goat keeps routed GroupedLoRA units, so its export ships the kernel library genai loads from the folder
    return sample_export(tmp_path_factory, SAMPLES / "goat").out_dir


def _context(export_dir: Path) -> int:
    return json.loads((export_dir / "config.json").read_text())["max_position_embeddings"]


def _skip_without(runtime: str) -> None:
    if runtime == "onnxruntime-genai":
        pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("prompt", "new"), [(3, 100_000), ("context+1", 1), ("context", 1)])
def test_prompt_plus_new_tokens_beyond_the_context_is_refused(
    export_dir: Path, runtime: str, prompt: int | str, new: int
) -> None:
    """`--max-new-tokens 100000` on a 256-token model ran 5 minutes; a longer prompt crashed genai (exit 3)."""
    context = _context(export_dir)
    length = {"context+1": context + 1, "context": context}.get(str(prompt), prompt)
    ids = ",".join(["5"] * int(length))
    args = ["generate", str(export_dir), "--prompt-ids", ids, "--max-new-tokens", str(new), "--runtime", runtime]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert f"{length} tokens" in line and f"--max-new-tokens {new}" in line and f"context of {context}" in line


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_generation_up_to_the_context_runs_and_reports_progress(
    export_dir: Path, runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last allowed length runs, and the progress bar advances once per new token."""
    _skip_without(runtime)
    seen: dict[str, int] = {"total": -1, "steps": 0}

    @contextmanager
    def counting_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
        seen["total"] = total

        def advance() -> None:
            seen["steps"] += 1

        yield advance

    monkeypatch.setattr(generate_run, "progress_bar", counting_bar)
    context = _context(export_dir)
    prompt, new = [5] * (context - 8), 8
    result = generate_run.generate(export_dir, prompt, new, runtime, progress=True)
    assert seen["total"] == new
    assert 1 <= seen["steps"] <= new and len(result.tokens) <= seen["steps"]


def test_text_prompt_is_tokenized_by_the_api(export_dir: Path) -> None:
    """`generate` takes text as well as ids (what `--prompt` passes on): tokenized with the export's copy of the
    base's tokenizer, and the new tokens come back as text; checked against the base's own tokenizer."""
    from transformers import AutoTokenizer

    base_tokenizer = AutoTokenizer.from_pretrained(str(SAMPLES / "tiny-llama"), local_files_only=True)
    result = generate_run.generate(export_dir, "the cat sat", max_new_tokens=3, runtime="torch")
    assert result.prompt_ids == list(base_tokenizer.encode("the cat sat"))
    assert result.text == base_tokenizer.decode(result.tokens)


def test_text_prompt_without_tokenizer_files_is_bad_input(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    from moe_export.reference.tokenizer import TOKENIZER_FILES

    bare = Path(shutil.copytree(export_dir, tmp_path / "bare", symlinks=True))
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["generate", str(bare), "--prompt", "the cat", "--runtime", "torch"])
    assert result.exit_code == 2 and "no tokenizer files" in result.output and "--prompt-ids" in result.output
