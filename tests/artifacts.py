"""Tiny ONNX export directories for the validate / bench / runtime tests, shared by the test modules.

Exports are slow next to everything else (~15 s each on 2 cores), so each kind is made once per session.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny import random_adapter


def save_tiny_checkpoint(directory: Path, base: Path, seed: int = 0) -> Path:
    """A canonical-layout checkpoint over the tiny Llama at `base`."""
    adapter = random_adapter(seed=seed)
    adapter.base_model = str(base)
    return adapter.save(directory)


def export_tiny(ckpt: Path, base: Path, out: Path, base_only: bool = False, dtype: str = "fp32") -> Path:
    """`moe_export.export_onnx` of the checkpoint (validation off: the tests run it themselves)."""
    import moe_export

    loaded = moe_export.load(ckpt, base_model=base)
    moe_export.export_onnx(loaded, out, dtype=dtype, base_only=base_only, validate=False, progress=False)
    return out


_CACHE: dict[tuple[str, str], Path] = {}


def shared_export(tmp_path_factory: object, base: Path, kind: str = "adapter") -> Path:
    """One export per kind ('adapter' or 'base') per test session; callers must not modify it (copy first)."""
    key = (str(base), kind)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"export-{kind}")  # type: ignore[attr-defined]
        ckpt = save_tiny_checkpoint(root / "ckpt", base)
        _CACHE[key] = export_tiny(ckpt, base, root / "onnx", base_only=kind == "base")
    return _CACHE[key]


# Task-routed samples (MOELoRA) need a task id to load; the others take none.
SAMPLE_TASK_IDS = {"mmoelora": 0}
_SAMPLE_CACHE: dict[str, object] = {}


def sample_export(tmp_path_factory: object, sample: Path) -> object:
    """`moe_export.export_onnx` of a shipped sample, no merge, once per session (an ExportResult); read only."""
    import moe_export

    if sample.name not in _SAMPLE_CACHE:
        out = tmp_path_factory.mktemp(f"sample-{sample.name}") / "onnx"  # type: ignore[attr-defined]
        loaded = moe_export.load(sample, task_id=SAMPLE_TASK_IDS.get(sample.name))
        _SAMPLE_CACHE[sample.name] = moe_export.export_onnx(loaded, out, validate=False, progress=False)
    return _SAMPLE_CACHE[sample.name]
