"""onnxruntime-genai: greedy generation from token ids on an export folder as it is (genai_config.json).

genai is optional (`pip install onnxruntime-genai`, Python >= 3.11 wheels); it uses the installed
onnxruntime's library, so it must never bring a second ORT wheel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, RuntimeUnavailableError

GENAI_CONFIG = "genai_config.json"


def import_genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"onnxruntime-genai is not installed ({exc}); pip install onnxruntime-genai (Python >= 3.11)"
        ) from exc
    return onnxruntime_genai


def genai_model_config(og: Any, export_dir: Path) -> Any:
    """The export's genai config; one whose genai_config.json names no kernel library (an export written
    without one) gets this machine's native library through an overlay, when it is built or can be built."""
    import json

    from moe_export.runtimes.native import session_library

    config = og.Config(str(export_dir))
    decoder = json.loads((export_dir / GENAI_CONFIG).read_text()).get("model", {}).get("decoder", {})
    if "custom_ops_library" not in decoder.get("session_options", {}):
        library = session_library()[0]
        if library is not None:
            overlay = {"model": {"decoder": {"session_options": {"custom_ops_library": str(library)}}}}
            config.overlay(json.dumps(overlay))
    return config


def genai_generate(
    export_dir: Any, input_ids: np.ndarray, max_new_tokens: int, advance: Callable[[], None] | None = None
) -> tuple[np.ndarray, float]:
    """Greedy tokens [B, <= max_new_tokens] (rows that ended early hold genai's padding) and the seconds taken;
    `advance` is called once per generated token (a progress bar).

    Right-padded rows must use the export's pad_token_id: genai masks by it.
    """
    og = import_genai()
    if not (Path(export_dir) / GENAI_CONFIG).is_file():
        raise FormatError(f"{export_dir}: no {GENAI_CONFIG}; export with the KV cache (the default of moe-export onnx)")
    try:
        model = og.Model(genai_model_config(og, Path(export_dir)))
    except Exception as exc:  # genai raises plain RuntimeError with its own message
        raise FormatError(f"{export_dir}: onnxruntime-genai cannot load the export ({str(exc)[:300]})") from exc
    batch, width = input_ids.shape
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + max_new_tokens, do_sample=False, batch_size=batch)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
        if advance is not None:
            advance()
    seconds = time.perf_counter() - start
    rows = [np.asarray(generator.get_sequence(r), dtype=np.int64)[width:] for r in range(batch)]
    length = max(len(r) for r in rows)
    tokens = np.stack([np.pad(r, (0, length - len(r))) for r in rows])
    return tokens, seconds
