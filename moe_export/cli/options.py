"""Options every command that reads a checkpoint shares, declared once (same flag, same help everywhere)."""

from __future__ import annotations

import typer

CKPT_ARGUMENT = typer.Argument(
    ..., metavar="CKPT", help="Checkpoint directory (the family's own layout, or canonical)."
)
BASE_OPTION = typer.Option(None, "--base", help="Base model directory (default: from the checkpoint).")
FAMILY_OPTION = typer.Option(None, "--family", help="Family name; overrides detection.")
TOP_K_OPTION = typer.Option(None, "--top-k", help="Top-k: K, or K1,K2,... one per decoder layer.")
TASK_ID_OPTION = typer.Option(None, "--task-id", help="Task id (task-gated MOELoRA).")
DEVICE_OPTION = typer.Option(
    "auto", "--device", help="Where calibration and the held-out check run: cpu, cuda[:N], or auto (cuda when present)."
)
FORWARD_OPTION = typer.Option(
    "auto",
    "--forward",
    help="How calibration and the held-out check run the reference: layers (one decoder layer's weights in memory "
    "at a time, in the model's dtype: for models larger than RAM), whole (the whole model in fp32, CPU), or auto: "
    "layers, except whole for a base without safetensors weights and for `onnx` on the CPU (it holds the model).",
)
