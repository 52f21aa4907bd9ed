"""Base-model architectures moe-export supports, checked when a base model is resolved.

The reference forward, the MLP layout of MixLoRA blocks (gate/up/down) and the ONNX interface are
verified on these decoders (tests with samples/tiny-llama, tiny-mistral, tiny-qwen2); another
architecture is refused at load with one line instead of failing somewhere inside the export.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_export.errors import FormatError

# model_type in config.json -> the transformers CausalLM class it loads as
SUPPORTED: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def supported_list() -> str:
    return ", ".join(f"{cls} ({model_type})" for model_type, cls in SUPPORTED.items())


def check_architecture(base_dir: Path) -> str:
    """The base model's model_type, or a one-line FormatError naming the architecture and the supported ones."""
    config_path = base_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{config_path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{config_path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type in SUPPORTED:
        return str(model_type)
    names = config.get("architectures") or []
    named = f"{names[0]} (model_type {model_type!r})" if names else f"model_type {model_type!r}"
    raise FormatError(f"{config_path}: base model architecture {named} is not supported; supported: {supported_list()}")
