"""The base model's config.json against its weights, from the safetensors headers, before any model is built.

transformers builds a model from config.json and then fills it from the weight files: a tensor the config asks
for and the files lack is silently random-initialised, and a shape that differs fails deep inside loading with
a message pointing at a report it never shows. Checked here first, a lying base is one line and exit 2: the
layer count, every tensor's shape (a model built on the meta device from the same config says what they must
be: no weights are allocated), tied embeddings (the output head may be absent when tied) and the biases the
architecture needs (Qwen2's q/k/v) all follow from that one comparison.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moe_export.errors import FormatError
from moe_export.formats.base_weights import FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, BaseWeights

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Saved by older transformers versions and recomputed at load: never a reason to refuse a base.
ALWAYS_IGNORED = (re.compile(r"rotary_emb\.inv_freq$"),)


def check_base_model(path: Path) -> None:
    """Refuse (FormatError, one line naming the file and the tensor) a base whose config and weights disagree.

    A directory without safetensors weights is left to transformers, whose load report `load_base_model` reads."""
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file():
        return
    weights = BaseWeights(path)
    config_path = path / "config.json"
    _check_layer_count(config_path, weights)
    expected, aliases, ignored = _expected_tensors(path)
    for key, shape in expected.items():
        found = next((a for a in aliases[key] if a in weights), None)
        if found is None:
            raise FormatError(
                f"{path}: config.json builds tensor {key!r} {list(shape)}, which no weight file holds; config.json "
                "and the weights are from different models"
            )
        stored, code = weights.headers[found]
        if stored != shape:
            raise FormatError(
                f"{weights.key_to_file[found]}: {found} is {list(stored)}, config.json builds it as {list(shape)}; "
                "config.json and the weights are from different models"
            )
        if code not in FLOAT_DTYPES:
            raise FormatError(
                f"{weights.key_to_file[found]}: {found} is stored as {code}; moe-export reads float base weights "
                "(F32, F16, BF16), not quantised ones"
            )
        _check_tied(weights, [a for a in aliases[key] if a in weights])
    known = {a for names in aliases.values() for a in names}
    extra = sorted(k for k in weights.key_to_file if k not in known and not any(p.search(k) for p in ignored))
    if extra:
        raise FormatError(
            f"{weights.key_to_file[extra[0]]}: holds {extra[0]!r}, which a model built from config.json has no place for"
            f"{f' ({len(extra) - 1} more)' if len(extra) > 1 else ''}; config.json and the weights are from different models"
        )


def _check_tied(weights: BaseWeights, held: list[str]) -> None:
    """A config that ties two names to one tensor (tie_word_embeddings) over files that hold two different
    tensors: transformers would keep one and silently drop the other."""
    if len(held) < 2:
        return
    first = weights.get(held[0])
    for other in held[1:]:
        if not torch.equal(first, weights.get(other)):
            raise FormatError(
                f"{weights.key_to_file[other]}: config.json ties {other} to {held[0]} (tie_word_embeddings), but the "
                "weights hold two different tensors; set tie_word_embeddings to false in config.json"
            )


def _check_layer_count(config_path: Path, weights: BaseWeights) -> None:
    """num_hidden_layers against the layers the weights hold: said plainly, and before a model of a config's
    (possibly absurd) size is built even on the meta device."""
    import json

    declared = json.loads(config_path.read_text()).get("num_hidden_layers")
    held = sorted({int(m.group(1)) for k in weights.key_to_file if (m := LAYER_KEY.match(k))})
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise FormatError(f"{config_path}: num_hidden_layers is {declared!r}, expected a positive integer")
    if held and (declared != len(held) or held[-1] != len(held) - 1):
        raise FormatError(
            f"{config_path}: num_hidden_layers is {declared}, the weights in {weights.directory} hold "
            f"{len(held)} layers (model.layers.{held[0]}..{held[-1]}); config.json and the weights are from "
            "different models"
        )


def _expected_tensors(
    path: Path,
) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]], tuple[re.Pattern[str], ...]]:
    """(name -> shape of every tensor the model built from config.json loads, name -> the names that may hold it
    (tied weights share one tensor), patterns of names transformers ignores when found in the files)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a config transformers cannot build raises anything from KeyError to IndexError
        first = (str(exc).splitlines() or [""])[0][:200]
        raise FormatError(
            f"{path / 'config.json'}: transformers cannot build a model from it ({type(exc).__name__}: {first})"
        ) from None
    saved = set(model.state_dict())  # parameters and persistent buffers: what a checkpoint holds
    names_of: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in saved:
            names_of.setdefault(id(tensor), []).append(name)
            shapes[id(tensor)] = tuple(tensor.shape)
    expected = {names[0]: shapes[i] for i, names in names_of.items()}
    aliases = {names[0]: names for names in names_of.values()}
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    return expected, aliases, (*ALWAYS_IGNORED, *ignore)
