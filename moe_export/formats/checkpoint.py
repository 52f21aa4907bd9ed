"""Reading a checkpoint directory safely: its JSON config and its tensors (safetensors or weights-only pickle)."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_export.errors import FormatError
from moe_export.ir import check_weights

CONFIG_NAMES = ("adapter_config.json", "manifest.json")
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "tensors.safetensors")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, or a .bin with weights_only=True (a pickle that runs code is refused)."""
    try:
        if path.stat().st_size == 0:
            raise FormatError(f"{path}: is empty (0 bytes); the checkpoint was not written completely")
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc.strerror or _first_line(exc)})") from exc
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        with warnings.catch_warnings():  # torch warns about the refused pickle too; our one line says it all
            warnings.simplefilter("ignore")
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"it references {found.group(1)}" if found else "it holds more than plain tensors"
        raise FormatError(
            f"{path}: refused to unpickle: {what}, which a weights-only load never runs; re-save the "
            "checkpoint with safetensors if it is yours"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, IndexError) as exc:
        # torch.load raises many types on a damaged archive (zip index, truncated pickle, bad storage)
        raise FormatError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FormatError(f"{path}: expected a flat dict of tensors, found {type(data).__name__}")
    return data


@dataclass
class Checkpoint:
    """A checkpoint directory: its config (if any) and its tensors (loaded once, checked finite)."""

    path: Path
    config: dict[str, Any] | None
    config_path: Path | None
    weights_path: Path | None
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            if self.weights_path is None:
                raise FormatError(f"{self.path}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")
            tensors = read_tensor_file(self.weights_path)
            check_weights(tensors, str(self.weights_path))
            self._tensors = tensors
        return self._tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def has_key(self, pattern: str) -> bool:
        """True if any tensor key matches the regex `pattern` (re.search)."""
        rx = re.compile(pattern)
        return any(rx.search(k) for k in self.tensors)

    def config_value(self, key: str, default: Any = None) -> Any:
        return (self.config or {}).get(key, default)

    def require_config(self, *keys: str) -> dict[str, Any]:
        where = self.config_path or self.path / CONFIG_NAMES[0]
        if self.config is None:
            raise FormatError(f"{where}: missing; this family needs its adapter_config.json")
        missing = [k for k in keys if k not in self.config]
        if missing:
            raise FormatError(f"{where}: missing keys {missing}")
        return self.config


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find the config and weights of a checkpoint directory; nothing is unpickled yet."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise FormatError(f"{path}: is a file; pass the checkpoint directory that holds it")
    config_path = next((path / n for n in CONFIG_NAMES if (path / n).is_file()), None)
    config = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{config_path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: expected a JSON object")
    weights_path = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if config_path is None and weights_path is None:
        raise FormatError(
            f"{path}: neither {' nor '.join(CONFIG_NAMES)} nor a weights file ({', '.join(WEIGHT_NAMES)}); "
            "is this a checkpoint directory?"
        )
    return Checkpoint(path, config, config_path, weights_path)
