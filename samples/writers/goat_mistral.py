"""GOAT on the Mistral base: the GOAT layout (fp32 this time) over samples/tiny-mistral.

Mistral's decoder uses the same module paths as Llama, so the same writer serves; what differs is
the base (its weights feed GOAT's SVD base correction) and the architecture the export traces.
"""

from __future__ import annotations

from pathlib import Path

from samples.writers import goat

BASE = "tiny-mistral"


def write(out_dir: Path, base_dir: Path) -> None:
    goat.write(out_dir, base_dir, dtype=None, seed=111, collapsed=())
