"""onnxruntime-genai: greedy generation from token ids on an export folder as it is (genai_config.json).

genai is optional (`pip install onnxruntime-genai`, Python >= 3.11 wheels); it uses the installed
onnxruntime's library, so it must never bring a second ORT wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, RuntimeUnavailableError
from moe_export.export.client_files import GENAI_CONFIG, read_genai_model


def import_genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"onnxruntime-genai is not installed ({exc}); pip install onnxruntime-genai (Python >= 3.11)"
        ) from exc
    return onnxruntime_genai


@contextmanager
def genai_model(og: Any, export_dir: Path) -> Iterator[Any]:
    """The export's genai model. One whose genai_config.json names no kernel library (an export written without
    one) gets this machine's native library when it is built or can be built: genai only loads a library from
    inside the model folder (it resolves symbolic links), so the export is mirrored into a temporary folder
    whose config names a hard link to the library. The user's export is never written to."""
    decoder = read_genai_model(export_dir).get("decoder") or {}
    library = None
    if "custom_ops_library" not in (decoder.get("session_options") or {}):
        from moe_export.runtimes.native import session_library

        library = session_library()[0]
    if library is None:
        yield og.Model(og.Config(str(export_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="moe-export-genai-") as mirror_name:
        mirror = Path(mirror_name)
        for entry in export_dir.iterdir():
            (mirror / entry.name).symlink_to(entry.resolve())
        _link_or_copy(library.resolve(), mirror / library.name)
        config = og.Config(str(mirror))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"custom_ops_library": library.name}}}}))
        yield og.Model(config)


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link is the same file to the dynamic loader, so the process maps the library once and its call
    # counter is the cache's; a copy (another filesystem) works the same but is a second mapping.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


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
    with ExitStack() as stack:
        try:
            model = stack.enter_context(genai_model(og, Path(export_dir)))
        except Exception as exc:  # genai raises plain RuntimeError with its own message
            raise FormatError(f"{export_dir}: onnxruntime-genai cannot load the export ({str(exc)[:300]})") from exc
        return _greedy(og, model, input_ids, max_new_tokens, advance)


def _greedy(
    og: Any, model: Any, input_ids: np.ndarray, max_new_tokens: int, advance: Callable[[], None] | None
) -> tuple[np.ndarray, float]:
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
