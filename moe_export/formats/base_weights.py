"""Read base-model weights tensor by tensor (safetensors `safe_open`), never the whole model twice."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_export.errors import FormatError

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
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise FormatError(f"{index_path}: not a safetensors index (no 'weight_map')") from exc
            self.key_to_file = {k: self.directory / f for k, f in weight_map.items()}
        elif single_path.is_file():
            from safetensors import safe_open

            with safe_open(str(single_path), framework="pt") as f:
                self.key_to_file = {k: single_path for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        else:
            raise FormatError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; moe-export reads base models in safetensors format"
            )

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
        from safetensors import safe_open

        if key not in self.key_to_file:
            return None
        with safe_open(str(self.key_to_file[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def stored_dtypes(self) -> set[torch.dtype | str]:
        """The dtypes the weights are stored in, from the headers (no data read); a code without a torch float
        dtype here ("I64", ...) stays its safetensors code."""
        from safetensors import safe_open

        codes: set[str] = set()
        for shard in self.shards():
            with safe_open(str(shard), framework="pt") as f:
                codes.update(f.get_slice(key).get_dtype() for key in f.keys())  # noqa: SIM118
        return {FLOAT_DTYPES.get(code, code) for code in codes}

    def linear_weight(self, module: str) -> torch.Tensor:
        """The [D_out, D_in] weight of the nn.Linear at HF module path `module`."""
        return self.get(f"{module}.weight")
