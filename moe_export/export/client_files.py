"""The files generation clients read next to a KV-cache decoder: genai_config.json and generation_config.json.

onnxruntime-genai refuses unknown keys anywhere in genai_config.json, so only its own schema goes there
(our metadata stays in export.json). optimum reads config.json (copied from the base) and, optionally,
generation_config.json, which is written from config.json when the base has none.
A sliding-window base needs no window key: genai's `decoder.sliding_window` selects a fixed-size KV cache that genai
slides itself, for graphs that take only the window; our decoder takes the whole past and masks in the graph.

When the native kernel library is given (the API passes the one built for this machine), it is copied into
the export and genai_config.json names it in the decoder's session_options: onnxruntime-genai resolves that
name against the export folder, so the folder stays self-contained. Without it the entry is left out and
genai runs the model's function bodies (same results, slower on CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moe_export.export.interface import GraphInterface

GENAI_CONFIG = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"
GENAI_MODEL_TYPE = "decoder"  # the generic type: accepts any decoder graph that follows the I/O contract
DEFAULT_CONTEXT = 2048


def read_genai_model(export_dir: str | Path) -> dict[str, Any]:
    """The `model` section of an export's genai_config.json, for the clients that read their settings from it
    (eos, pad, the decoder's session options); {} when the file is absent or unreadable: genai's defaults."""
    try:
        data = json.loads((Path(export_dir) / GENAI_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, dict) else {}


def special_ids(config: Any, generation: dict[str, Any]) -> tuple[int | None, int | list[int], int]:
    """(bos, eos, pad) from generation_config first, then config; pad falls back to eos (genai defaults to 0)."""

    def pick(name: str) -> Any:
        value = generation.get(name)
        return value if value is not None else getattr(config, name, None)

    eos = pick("eos_token_id")
    eos = 0 if eos is None else eos
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return pick("bos_token_id"), eos, int(pad)


def genai_config(
    config: Any,
    interface: GraphInterface,
    model_file: str,
    generation: dict[str, Any],
    custom_ops_library: str | None = None,
) -> dict[str, Any]:
    bos, eos, pad = special_ids(config, generation)
    layout = interface.past
    assert layout is not None  # a decoder interface
    context = int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT)
    model: dict[str, Any] = {
        "type": GENAI_MODEL_TYPE,
        "context_length": context,
        "vocab_size": int(config.vocab_size),
        "eos_token_id": eos,
        "pad_token_id": pad,
        "decoder": {
            "filename": model_file,
            "head_size": layout.head_dim,
            "hidden_size": int(config.hidden_size),
            "num_attention_heads": int(config.num_attention_heads),
            "num_hidden_layers": layout.num_layers,
            "num_key_value_heads": layout.kv_heads,
            **interface.genai_names(),
        },
    }
    if bos is not None:
        model["bos_token_id"] = bos
    if custom_ops_library:
        model["decoder"]["session_options"] = {"custom_ops_library": custom_ops_library}
    # Concat-style presents (past + new): the shared-buffer mode expects in-place KV writes and fails.
    search = {"max_length": context, "do_sample": False, "num_beams": 1, "past_present_share_buffer": False}
    return {"model": model, "search": search}


def write_client_files(
    directory: Path, config: Any, interface: GraphInterface, model_file: str, kernel_library: Path | None = None
) -> list[str]:
    """Write genai_config.json (and generation_config.json when absent, and a copy of `kernel_library` when
    given); returns the names written."""
    written = []
    if kernel_library is not None:
        shutil.copyfile(kernel_library, directory / kernel_library.name)
        written.append(kernel_library.name)
    generation_path = directory / GENERATION_CONFIG
    generation: dict[str, Any] = {}
    if generation_path.is_file():
        try:
            generation = json.loads(generation_path.read_text())
        except json.JSONDecodeError:
            generation = {}
    else:
        bos, eos, pad = special_ids(config, {})
        generation = {"eos_token_id": eos, "pad_token_id": pad}
        if bos is not None:
            generation["bos_token_id"] = bos
        generation_path.write_text(json.dumps(generation, indent=2) + "\n")
        written.append(GENERATION_CONFIG)
    library_name = kernel_library.name if kernel_library is not None else None
    genai = genai_config(config, interface, model_file, generation, library_name)
    (directory / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
    written.append(GENAI_CONFIG)
    return written
