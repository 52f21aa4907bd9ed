"""`moe_export.validate()`: run an export on several runtimes, compare each with the reference, build the report.

The first runtime is the reference (normally `torch`, the faithful PyTorch forward); every other runtime
is compared with it on every input. When the reference is torch and a candidate is onnxruntime, routing
is also captured on both sides and compared per unit (validation/units.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.interface import GraphInterface
from moe_export.export.manifest import Artifact
from moe_export.runtimes.base import Feeds
from moe_export.runtimes.registry import RunnerOptions, make_runner
from moe_export.validation.feeds import DEFAULT_SHAPES, load_npz_feeds, random_feeds, shape_label
from moe_export.validation.generation import DEFAULT_NEW_TOKENS, pad_token_id
from moe_export.validation.generation_units import check_generation
from moe_export.validation.parity import Tolerance, compare_func
from moe_export.validation.quantized import exact_arithmetic_artifact, quantization_cost
from moe_export.validation.report import RunComparison, ValidationReport
from moe_export.validation.routing_capture import UnitCapture, match_unit, record_torch_routing, run_onnxruntime_debug
from moe_export.validation.units import UnitComparison

# The reference is the torch model in fp32 whatever the export's dtype: a fp16/bf16 export is judged by how
# far it is from the model that was trained (the fp32 math), not from a second low-precision run. A torch
# model cast with .half() rounds differently from ONNX Runtime at every op, so comparing the two adds both
# sides' rounding and flips near-tie routing decisions on either side: on samples/mola the .half() torch
# model is 0.128 (max abs) off its own fp32 self while the fp16 ONNX export is 0.006 off it.
# Default tolerances per export dtype, as (atol, rtol) with rtol relative to max|reference| (parity.py).
# fp32: both sides compute in fp32 and differ only in summation order; 1e-4 of the logit scale leaves
#   room for deep models while catching any real difference (a wrong weight moves logits by >1e-2).
# fp16: 11-bit mantissa (unit roundoff 4.9e-4); the hidden states are rounded after every op and the
#   errors compound over layers: 1e-2 of the logit scale, ~20x the roundoff (measured on the samples:
#   <= 2e-3, see the README's fp16/bf16 policy).
# bf16: 8-bit mantissa (roundoff 3.9e-3, 8x fp16), same reasoning: 5e-2.
REFERENCE_DTYPE = "fp32"
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-6, rtol=1e-4),
    "fp16": Tolerance(atol=1e-3, rtol=1e-2),
    "bf16": Tolerance(atol=1e-2, rtol=5e-2),
}
# A routing flip is a near-tie when the reference's top-k margin (a probability difference) is below this.
# Routers run in fp32 on both sides; flips come only from upstream drift in the hidden states, which is
# ~1e-6 relative in fp32 and ~1e-3 (fp16) / ~1e-2 (bf16) relative, moving probabilities by about as much
# times the router-logit scale. Heuristic bounds, generous by about 10x; a real bug flips at margins ~0.1+.
DEFAULT_MARGIN_TOL: dict[str, float] = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}

ProgressCallback = Callable[[str], None]


def make_feeds(
    artifact: Artifact,
    inputs: str | Path | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> list[Feeds]:
    """The validation inputs: an .npz file, or random token ids of each (batch, seq) shape."""
    if inputs is not None:
        npz = load_npz_feeds(inputs, artifact.interface, artifact.model_config("vocab_size"))
        return [artifact.interface.complete_feeds(npz)]
    shapes = list(shapes or DEFAULT_SHAPES)
    if not shapes:
        raise MoeExportError("no input shapes to validate with")
    vocab = artifact.vocab_size()
    interface = artifact.interface
    return [interface.select(interface.complete_feeds(random_feeds(interface, b, s, vocab, seed))) for b, s in shapes]


def validate(
    artifact_dir: str | Path,
    runtimes: Sequence[str] = ("torch", "onnxruntime"),
    inputs: str | Path | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    per_output: dict[str, Tolerance] | None = None,
    min_top1: float | None = None,
    margin_tol: float | None = None,
    routing: bool = True,
    options: RunnerOptions | None = None,
    progress: ProgressCallback | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    checkpoint: str | Path | None = None,
    base_model: str | Path | None = None,
    max_top1_drop: float | None = None,
) -> ValidationReport:
    """Compare `runtimes[1:]` with `runtimes[0]` on an export directory; see DESIGN.md section 8.

    `checkpoint` / `base_model` replace the source paths export.json recorded (the sources have moved).
    A quantized export (`onnx --quantize`) is checked in two parts (validation/quantized.py): its arithmetic
    against the reference with its dequantized base weights, at the fp32 tolerance, and the quantization's
    cost against the fp32 reference on held-out text (a gate only with `max_top1_drop`)."""
    runtimes = list(dict.fromkeys(runtimes))
    if len(runtimes) < 2:
        raise MoeExportError(
            f"--runtimes {','.join(runtimes)}: name at least two runtimes (the first is the reference)"
        )
    deployed = Artifact.open(artifact_dir, checkpoint, base_model)
    if max_top1_drop is not None and deployed.manifest.quant_scheme is None:
        raise MoeExportError(f"--max-top1-drop: {deployed.path} is not a quantized export (onnx --quantize)")
    artifact = exact_arithmetic_artifact(deployed)  # itself unless quantized
    options = options or RunnerOptions()
    if options.torch_dtype is None:
        options = replace(options, torch_dtype=REFERENCE_DTYPE)
    default = DEFAULT_TOLERANCES.get(artifact.dtype, DEFAULT_TOLERANCES["fp32"])
    tol = Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)
    margin = DEFAULT_MARGIN_TOL.get(artifact.dtype, 1e-4) if margin_tol is None else margin_tol
    feeds_list = make_feeds(artifact, inputs, shapes, seed)
    labels = [shape_label(f, artifact.interface) for f in feeds_list]
    compare = compare_func(tol.atol, tol.rtol, per_output=per_output, min_top1=min_top1)
    say = progress or (lambda _msg: None)

    reference_name, candidates = runtimes[0], runtimes[1:]
    report = ValidationReport(str(deployed.path), artifact.dtype, reference_name, candidates, tol, margin, labels)
    report.torch_dtype = options.torch_dtype
    padded = sum(int((~v).sum()) for f in feeds_list if (v := valid_positions(f, artifact.interface)) is not None)
    if padded:
        mask = artifact.interface.mask_name
        report.notes.append(f"{padded} padded positions ({mask} 0) are excluded: their outputs are unspecified")
    # Build every runner first so unknown/unavailable runtimes fail before any slow work.
    runners = {name: make_runner(name, artifact, options) for name in runtimes}

    say(f"running the reference ({reference_name})")
    capture_routing = routing and reference_name == "torch" and not artifact.base_only
    with runners[reference_name] as ref_runner:
        ref_outputs, ref_captures = [], []
        for feeds in feeds_list:
            if capture_routing:
                with record_torch_routing(ref_runner.model) as captured:
                    ref_outputs.append(ref_runner.infer(feeds))
                ref_captures.append(captured)
            else:
                ref_outputs.append(ref_runner.infer(feeds))
        references = unit_references(ref_runner.model) if capture_routing else {}
        reference_model = getattr(ref_runner, "model", None)  # kept for generation parity below

    for name in candidates:
        say(f"running {name}")
        with runners[name] as runner:
            for feeds, label, expected in zip(feeds_list, labels, ref_outputs, strict=True):
                start = time.perf_counter()
                got = runner.infer(feeds)
                seconds = time.perf_counter() - start
                valid = valid_positions(feeds, artifact.interface)
                result = compare(drop_padding(expected, valid), drop_padding(got, valid))
                report.comparisons.append(RunComparison(name, label, result, seconds))
            if getattr(runner, "kernel_note", ""):  # native kernels or function bodies ran the custom ops
                report.notes.append(f"{name}: {runner.kernel_note}")  # type: ignore[attr-defined]
        if not capture_routing:
            continue
        if name == "onnxruntime":
            say("capturing onnxruntime routing (debug session)")
            cand_captures = run_onnxruntime_debug(artifact.onnx_path, feeds_list, threads=options.threads)
            valid = [valid_positions(f, artifact.interface) for f in feeds_list]
            # Unit checks keep the dtype's default tolerance: --atol/--rtol are about the model outputs.
            report.units[name] = compare_units(ref_captures, cand_captures, references, default, margin, valid)
            _note_uncaptured(report, name, ref_captures, cand_captures)
        else:
            report.notes.append(f"{name}: per-unit routing capture is not supported; outputs compared only")
    if artifact.manifest.kv_cache and new_tokens > 0:
        if reference_name != "torch" or reference_model is None:
            report.notes.append("generation parity needs torch as the reference runtime: not compared")
        else:
            say(f"comparing greedy generation ({new_tokens} tokens)")
            runners = {name: make_runner(name, artifact, options) for name in candidates}
            report.generation = check_generation(
                reference_model, runners, artifact.manifest, tol, artifact.vocab_size(), pad_token_id(artifact.path),
                new_tokens, seed, onnx_path=artifact.onnx_path,
            )  # fmt: skip
    if deployed.manifest.quant_scheme is not None:
        say("measuring the quantization's cost against the fp32 reference (held-out text)")
        report.notes.append(
            f"{deployed.manifest.quant_scheme.scheme} export: parity is against the reference with the export's "
            "dequantized base weights, the export computing in fp32 (MatMulNBits accuracy level 0)"
        )
        report.quantization = quantization_cost(deployed, options, max_top1_drop)
    return report


def compare_units(
    ref_captures: list[dict[str, UnitCapture]],
    cand_captures: list[dict[str, UnitCapture]],
    references: dict[str, UnitReference],
    tol: Tolerance,
    margin_tol: float,
    valid: list[np.ndarray | None] | None = None,
) -> dict[str, UnitComparison]:
    """Per-unit routing agreement, same-input router check and op check, accumulated over every input.

    `valid` holds, per input, the [B, S] attention mask as bool (None: every token counts); end-to-end
    routing of padded tokens is not compared. The same-input checks use every token: they recompute the
    candidate from its own inputs, so padding does not matter there.
    """
    units: dict[str, UnitComparison] = {}
    valid = valid or [None] * len(ref_captures)
    for ref, cand, mask in zip(ref_captures, cand_captures, valid, strict=True):
        tokens = None if mask is None else mask.reshape(-1)  # [T], T = B*S in row-major order
        ref_names = set(ref) | set(references)
        for node_name, cand_capture in cand.items():
            name = match_unit(node_name, ref_names) or node_name
            unit = units.setdefault(name, UnitComparison(name, margin_tol=margin_tol))
            if name in ref:
                unit.add_routing(ref[name], cand_capture, tokens)
            reference = references.get(name)
            if reference is None:
                continue
            if reference.route is not None:
                unit.add_router_check(cand_capture, reference.route)
            if reference.expert_a is not None and reference.expert_b is not None:
                unit.add_op_check(cand_capture, reference.expert_a, reference.expert_b, tol)
    for unit in units.values():
        unit.finish(gate_tol=tol.bound(1.0))  # gates are in [0, 1]
    return units


RouteFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # x -> (ids, gates, probs)


@dataclass
class UnitReference:
    """What the same-input checks need from one reference module."""

    expert_a: Any = None  # [E_A, R, D_in]
    expert_b: Any = None  # [E, D_out, R], scaling folded in
    route: RouteFn | None = None


def unit_references(model: Any) -> dict[str, UnitReference]:
    """unit name -> reference weights and router of every adapter module of the torch reference."""
    from moe_export.reference.model import moe_modules

    return {
        name: UnitReference(getattr(m, "expert_A", None), getattr(m, "expert_B", None), _router_fn(m))
        for name, m in moe_modules(model)
    }


def _router_fn(module: Any) -> RouteFn | None:
    router, weight = getattr(module, "router", None), getattr(module, "router_weight", None)
    if router is None or weight is None or router.kind != "linear":
        return None  # task routing is constant: nothing input dependent to check
    bias = getattr(module, "router_bias", None)

    def route(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        from moe_export.reference.routing import router_probabilities, select_experts

        if x.dtype not in (np.float16, np.float32, np.float64):
            x = x.astype(np.float32)  # e.g. ml_dtypes bfloat16, which torch cannot read
        with torch.no_grad():
            probs = router_probabilities(router, torch.from_numpy(x), weight, bias)  # [T, E] fp32
            ids, gates = select_experts(router, probs)  # [T, K]
        return ids.numpy(), gates.numpy(), probs.numpy()

    return route


def valid_positions(feeds: Feeds, interface: GraphInterface) -> np.ndarray | None:
    """[B, S] bool of the non-padded positions, or None when nothing is padded."""
    mask = feeds.get(interface.mask_name)
    if mask is None or mask.all():
        return None
    return np.asarray(mask).astype(bool)


def drop_padding(outputs: dict[str, np.ndarray], valid: np.ndarray | None) -> dict[str, np.ndarray]:
    """Keep the non-padded positions of every [B, S, ...] output ([B, S, V] -> [N, V]); others as they are."""
    if valid is None:
        return outputs
    return {k: v[valid] if v.shape[:2] == valid.shape else v for k, v in outputs.items()}


def _note_uncaptured(
    report: ValidationReport, runtime: str, ref: list[dict[str, UnitCapture]], cand: list[dict[str, UnitCapture]]
) -> None:
    ref_units: set[str] = set().union(*ref) if ref else set()
    nodes: set[str] = set().union(*cand) if cand else set()
    missing = sorted(ref_units - {match_unit(n, ref_units) for n in nodes})
    if missing:
        report.notes.append(
            f"{runtime}: {len(missing)} routed reference unit(s) have no GroupedLoRA node named after them "
            f"(merged or renamed), e.g. {missing[0]}"
        )
