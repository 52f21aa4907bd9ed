"""Canonical sample: the MoLA sample converted with `Adapter.save` (manifest.json + tensors.safetensors)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from samples.writers import BASE_REL
from samples.writers import mola as mola_writer


def write(out_dir: Path, base_dir: Path) -> None:
    from moe_export.reference.loading import load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "mola"
        mola_writer.write(source, base_dir)
        adapter, _ = load_adapter(source, base_model=base_dir)
    adapter.base_model = BASE_REL  # portable: resolved against the checkpoint directory
    adapter.save(out_dir)
