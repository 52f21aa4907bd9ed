"""Inputs of triton_check.sh, in the project's venv and one process (each CLI call would re-import torch).

Exports the GOAT sample twice (scoring graph, KV-cache decoder), writes the Triton repositories with the
same function `moe-export triton` calls, and the PyTorch reference's greedy tokens for a few prompts.
    python benchmarks/triton_prepare.py WORK
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import moe_export
from moe_export.export.tensorrt import ENGINE_INFO_NAME, ENGINE_NAME
from moe_export.runtimes.generate import generate
from moe_export.serving.repository import TritonOptions, write_repository

PROMPTS = [[5, 17, 42, 9, 100], [1, 2, 3], [200, 7, 7, 7, 31, 64, 12, 90]]
NEW_TOKENS = 12


def main(work: Path) -> None:
    loaded = moe_export.load(Path("samples/goat"))
    score, kv = work / "goat-score", work / "goat-kv"
    moe_export.export_onnx(loaded, score, validate=False, progress=False, kv_cache=False)
    moe_export.export_onnx(loaded, kv, validate=False, progress=False)
    write_repository(score, work / "repo-score", TritonOptions(name="goat_score", backend="python"))
    write_repository(kv, work / "repo-kv", TritonOptions(name="goat", backend="python", instances=2))
    # Configs this server cannot load (no onnxruntime backend, no GPU) are still parsed and checked.
    write_repository(score, work / "repo-ort", TritonOptions(name="goat_ort"))
    write_repository(kv, work / "repo-ort-kv", TritonOptions(name="goat_kv_ort", device="gpu"))
    fake = work / "goat-trt"
    shutil.rmtree(fake, ignore_errors=True)
    shutil.copytree(kv, fake)
    (fake / ENGINE_NAME).write_text("not a real engine: only its config is checked\n")
    (fake / ENGINE_INFO_NAME).write_text(json.dumps({"engine": ENGINE_NAME}) + "\n")
    write_repository(fake, work / "repo-trt", TritonOptions(name="goat_t", device="gpu"))
    expected = [
        {"prompt": p, "tokens": generate(kv, p, NEW_TOKENS, runtime="torch").tokens, "max_new_tokens": NEW_TOKENS}
        for p in PROMPTS
    ]
    (work / "expected.json").write_text(json.dumps(expected) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
