"""Read base-model weights tensor by tensor (safetensors `safe_open`), never the whole model twice.

Opening a directory checks its files the way an adapter's are checked: the shard index is a JSON object
whose `weight_map` maps tensor names to shard names inside the directory, every shard exists and has a
readable header (a truncated file or an absurd header length is refused here, not deep inside transformers),
and every tensor the index places in a shard is in that shard's header.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_export.errors import FormatError
from moe_export.files import name_inside, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors header dtype codes of the float types (the merge writer patches tensors in these in place).
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class BaseWeights:
    """Lazy access to a Hugging Face model directory's safetensors weights by tensor name."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path, single_path = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index_path.is_file():
            self.key_to_file = _read_index(index_path)
        elif single_path.is_file():
            self.key_to_file = {}
        else:
            raise FormatError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; moe-export reads base models in safetensors format"
            )
        # name -> (shape, safetensors dtype code), from the headers only (no tensor data is read)
        self.headers: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in sorted(set(self.key_to_file.values())) or [single_path]:
            held = _read_header(shard)
            self.headers.update(held)
            if not self.key_to_file or shard != single_path:
                missing = sorted(k for k, f in self.key_to_file.items() if f == shard and k not in held)
                if missing:
                    raise FormatError(
                        f"{index_path}: places {missing[0]!r} in {shard.name}, whose header has no such tensor"
                        f"{f' ({len(missing) - 1} more)' if len(missing) > 1 else ''}; the index and shards disagree"
                    )
        if not self.key_to_file:
            self.key_to_file = {k: single_path for k in self.headers}

    def shards(self) -> list[Path]:
        return sorted(set(self.key_to_file.values()))

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.key_to_file:
            raise FormatError(f"{self.directory}: the base model has no tensor {key!r}")
        with safe_open(str(self.key_to_file[key]), framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """A tensor's shape from the safetensors header (no data read), or None if the model lacks it."""
        return self.headers[key][0] if key in self.key_to_file else None

    def stored_dtypes(self) -> set[torch.dtype | str]:
        """The dtypes the weights are stored in, from the headers (no data read); a code without a torch float
        dtype here ("I64", ...) stays its safetensors code."""
        return {FLOAT_DTYPES.get(code, code) for key, (_, code) in self.headers.items() if key in self.key_to_file}

    def linear_weight(self, module: str) -> torch.Tensor:
        """The [D_out, D_in] weight of the nn.Linear at HF module path `module`."""
        return self.get(f"{module}.weight")


def _read_index(index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path from `model.safetensors.index.json`; every shard named exists, inside the directory."""
    weight_map = read_json_object(index_path, "is it a sharded safetensors model?").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(
            f"{index_path}: 'weight_map' is {type(weight_map).__name__}, expected an object of tensor -> shard file"
        )
    key_to_file = {}
    for key, name in weight_map.items():
        shard = name_inside(index_path.parent, name, f"{index_path}: weight_map[{key!r}]")
        if not shard.is_file():
            raise FormatError(f"{index_path}: shard {name!r} (holding {key!r}) is missing from {index_path.parent}")
        key_to_file[key] = shard
    return key_to_file


def _read_header(shard: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype code) of every tensor in one safetensors file; a one-line FormatError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise FormatError(
            f"{shard}: not a readable safetensors file ({str(exc).splitlines()[0][:160]}); is it truncated? "
            "copy the base model again"
        ) from None
