"""`moe-export generate`: greedy generation on an export with one runtime, to see it work without code."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.manifest import Artifact
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
    try:
        eos = json.loads((export_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    except (OSError, KeyError, TypeError, ValueError):
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def generate(
    export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int = 32, runtime: str = "onnxruntime",
    threads: int | None = None,
) -> GenerateResult:  # fmt: skip
    """Greedy decoding of `max_new_tokens` (fewer at an EOS) after `prompt_ids` on a KV-cache export."""
    if runtime not in RUNTIMES:
        raise MoeExportError(f"--runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    if not prompt_ids:
        raise MoeExportError("--prompt-ids: empty prompt; give at least one token id")
    if max_new_tokens < 1:
        raise MoeExportError(f"--max-new-tokens {max_new_tokens}: expected >= 1")
    artifact = Artifact.open(export_dir)
    if not artifact.manifest.kv_cache:
        raise MoeExportError(f"{artifact.path}: a scoring export (--no-kv-cache) cannot generate; re-export without it")
    vocab = artifact.vocab_size()
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise MoeExportError(f"--prompt-ids: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    ids = np.asarray([prompt_ids], dtype=np.int64)
    stop = eos_ids(artifact.path)
    if runtime == "onnxruntime-genai":
        from moe_export.runtimes.genai import genai_generate

        tokens, seconds = genai_generate(artifact.path, ids, max_new_tokens)
        new = tokens[0].tolist()
    else:
        prompts = Prompts("prompt", ids, np.ones_like(ids))
        if runtime == "torch":
            from moe_export.runtimes.torch_runner import reference_model_loader

            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            model = reference_model_loader(artifact)().eval()
            start = time.perf_counter()
            new = torch_greedy(model, prompts, max_new_tokens, stop).tokens[0].tolist()
        else:
            with make_runner("onnxruntime", artifact, RunnerOptions(threads=threads)) as runner:
                start = time.perf_counter()
                new = greedy_decode(runner, artifact.manifest, prompts, max_new_tokens, stop).tokens[0].tolist()
        seconds = time.perf_counter() - start
    end = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
    return GenerateResult(runtime, list(prompt_ids), new[:end], seconds)
