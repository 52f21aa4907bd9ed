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
# calibrate runs calibration only; merge and onnx also run the held-out check: each help names what it runs.
_FORWARD_HELP = (
    "How {what} run{s} the reference: layers (one decoder layer's weights in memory at a time, in the model's "
    "dtype: for models larger than RAM), whole (the whole model in fp32, CPU), or auto: {auto}."
)
_AUTO_LAYERS = "layers, except whole for a base without safetensors weights"
CALIBRATE_DEVICE_OPTION = typer.Option(
    "auto", "--device", help="Where calibration runs: cpu, cuda[:N], or auto (cuda when present)."
)
DEVICE_OPTION = typer.Option(
    "auto", "--device", help="Where calibration and the held-out check run: cpu, cuda[:N], or auto (cuda when present)."
)
CALIBRATE_FORWARD_OPTION = typer.Option(
    "auto", "--forward", help=_FORWARD_HELP.format(what="calibration", s="s", auto=_AUTO_LAYERS)
)
MERGE_FORWARD_OPTION = typer.Option(
    "auto", "--forward", help=_FORWARD_HELP.format(what="calibration and the held-out check", s="", auto=_AUTO_LAYERS)
)
ONNX_FORWARD_OPTION = typer.Option(
    "auto",
    "--forward",
    help=_FORWARD_HELP.format(
        what="calibration and the held-out check",
        s="",
        auto="whole on the CPU (the export holds that model anyway), layers on a GPU; whole for a base without "
        "safetensors weights",
    ),
)
MERGE_THRESHOLD_OPTION = typer.Option(
    None,
    "--merge-threshold",
    metavar="T",
    help="Merge units whose dominant expert's mean gate is >= T, with 0 < T <= 1 (e.g. 0.9).",
)
MERGE_BUDGET_OPTION = typer.Option(
    None,
    "--merge-budget",
    metavar="B",
    help="Merge the lowest-error units while their predicted total error stays <= B (B >= 0).",
)
DATA_OPTION = typer.Option(None, "--data", help="Calibration text, one sample per line (default: built-in text).")
SAMPLES_OPTION = typer.Option(32, "--samples", help="Calibration samples (lines of --data, or built-in text).")
MERGE_SAMPLES_OPTION = typer.Option(
    32, "--samples", help="Calibration samples, and as many held-out ones for the merge check."
)
SEQ_LEN_OPTION = typer.Option(64, "--seq-len", help="Max tokens per sample.")
SEED_OPTION = typer.Option(0, "--seed", help="Seed of the sample order (and of random tokens without a tokenizer).")
