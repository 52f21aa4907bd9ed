"""MoE-PEFT MoLA on the Llama-3 base: the MoE-PEFT MoLA layout over samples/tiny-llama3 (llama3 rope scaling).

The adapter is the same kind as samples/moe_peft_mola; what differs is the base's rotary embedding, which the
KV-cache decoder must carry into the graph (tests/test_real_configs.py generates with it in every client).
"""

from __future__ import annotations

from pathlib import Path

from samples.writers import moe_peft_mola

BASE = "tiny-llama3"


def write(out_dir: Path, base_dir: Path) -> None:
    moe_peft_mola.write(out_dir, base_dir, seed=604)
