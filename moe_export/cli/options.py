"""Options that commands share, declared once (same flag, same help everywhere): those of every command that reads
a checkpoint, and the calibration set of `calibrate` and `merge`."""

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
DATA_OPTION = typer.Option(None, "--data", help="Calibration text, one sample per line (default: built-in text).")
SAMPLES_OPTION = typer.Option(
    32, "--samples", help="Calibration samples (merge: and as many held-out ones for the merge check)."
)
SEQ_LEN_OPTION = typer.Option(64, "--seq-len", help="Max tokens per sample.")
SEED_OPTION = typer.Option(0, "--seed", help="Seed of the sample order (and of random tokens without a tokenizer).")
