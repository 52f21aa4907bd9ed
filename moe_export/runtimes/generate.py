"""`moe-export generate`: greedy generation on an export with one runtime, to see it work without code."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.client_files import read_genai_model
from moe_export.export.manifest import Artifact
from moe_export.progress import progress_bar
from moe_export.reference.tokenizer import load_tokenizer
from moe_export.runtimes.decoding import Prompts, greedy_decode, torch_greedy
from moe_export.runtimes.registry import RunnerOptions, make_runner

RUNTIMES = ("onnxruntime", "onnxruntime-genai", "torch")


@dataclass
class GenerateResult:
    """The prompt, the new tokens (up to and including an EOS) and how fast they came."""

    runtime: str
    prompt_ids: list[int]
    tokens: list[int]
    seconds: float  # prefill + every decode step, model loading excluded
    text: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2)}


def eos_ids(export_dir: Path) -> set[int]:
    """The ids that end a generation (genai_config.json's eos_token_id); none without the file."""
    eos = read_genai_model(export_dir).get("eos_token_id")
    try:
        return {int(e) for e in eos} if isinstance(eos, list) else ({int(eos)} if eos is not None else set())
    except (TypeError, ValueError):
        return set()


def check_fits_context(artifact: Artifact, prompt_length: int, max_new_tokens: int) -> None:
    """Prompt plus new tokens within the model's context (max_position_embeddings), refused before any model
    loads: beyond it the rotary positions were never trained, and the decoder's buffers grow without bound."""
    context = artifact.model_config("max_position_embeddings")
    if context is not None and prompt_length + max_new_tokens > context:
        raise MoeExportError(
            f"{artifact.path}: the prompt's {prompt_length} tokens + --max-new-tokens {max_new_tokens} = "
            f"{prompt_length + max_new_tokens} exceed the model's context of {context} tokens "
            f"(max_position_embeddings); shorten the prompt or pass --max-new-tokens {max(context - prompt_length, 0)}"
        )


def generate(
    export_dir: str | Path, prompt: list[int] | str, max_new_tokens: int = 32, runtime: str = "onnxruntime",
    threads: int | None = None, progress: bool = False,
) -> GenerateResult:  # fmt: skip
    """Greedy decoding of `max_new_tokens` (fewer at an EOS) after `prompt` on a KV-cache export: token ids, or
    text for the export's tokenizer (the result then has the new tokens' text too). `progress` shows a bar on
    stderr (one step per new token)."""
    if runtime not in RUNTIMES:
        raise MoeExportError(f"--runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    tokenizer = None
    if isinstance(prompt, str):
        tokenizer = load_tokenizer(export_dir, "pass token ids (--prompt-ids) instead of text")
        prompt = list(tokenizer.encode(prompt))
    prompt_ids = list(prompt)
    if not prompt_ids:
        raise MoeExportError("--prompt-ids: empty prompt; give at least one token id")
    if max_new_tokens < 1:
        raise MoeExportError(f"--max-new-tokens {max_new_tokens}: expected >= 1")
    if threads is not None and threads < 1:
        raise MoeExportError(f"--threads {threads}: must be >= 1")
    artifact = Artifact.open(export_dir)
    if not artifact.manifest.kv_cache:
        raise MoeExportError(f"{artifact.path}: a scoring export (--no-kv-cache) cannot generate; re-export without it")
    vocab = artifact.vocab_size()
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise MoeExportError(f"--prompt-ids: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    check_fits_context(artifact, len(prompt_ids), max_new_tokens)
    with progress_bar(progress, "generating", max_new_tokens) as advance:
        new, seconds = _decode(artifact, prompt_ids, max_new_tokens, runtime, threads, advance)
    stop = eos_ids(artifact.path)
    end = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
    text = tokenizer.decode(new[:end]) if tokenizer is not None else None
    return GenerateResult(runtime, prompt_ids, new[:end], seconds, text)


def _decode(
    artifact: Artifact, prompt_ids: list[int], max_new_tokens: int, runtime: str, threads: int | None,
    advance: Callable[[], None],
) -> tuple[list[int], float]:  # fmt: skip
    """(new tokens, seconds of prefill and decoding) with one runtime."""
    ids = np.asarray([prompt_ids], dtype=np.int64)
    stop = eos_ids(artifact.path)
    if runtime == "onnxruntime-genai":
        from moe_export.runtimes.genai import genai_generate

        tokens, seconds = genai_generate(artifact.path, ids, max_new_tokens, advance)
        return tokens[0].tolist(), seconds
    prompts = Prompts("prompt", ids, np.ones_like(ids))
    if runtime == "torch":
        from moe_export.runtimes.torch_runner import reference_model_loader

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        model = reference_model_loader(artifact)().eval()
        start = time.perf_counter()
        new = torch_greedy(model, prompts, max_new_tokens, stop, advance).tokens[0].tolist()
    else:
        with make_runner("onnxruntime", artifact, RunnerOptions(threads=threads)) as runner:
            start = time.perf_counter()
            decoded = greedy_decode(runner, artifact.manifest, prompts, max_new_tokens, stop, advance=advance)
            new = decoded.tokens[0].tolist()
    return new, time.perf_counter() - start
