"""`moe_export.validate()`: run the candidates, then judge each against the reference run with its routing replayed.

Run, then compare (as Polygraphy does): every candidate runtime produces a RunResult (outputs, and the per-unit
taps its own runner captured: validation/results.py); the first runtime (normally `torch`, the faithful PyTorch
forward) then runs each input with that candidate's routing decisions forced (route replay), so the outputs are
compared on arithmetic alone, while every routing flip is judged on its own against its rounding bound and
every routed op is checked on the candidate's own inputs (validation/replay.py, units.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.interface import GraphInterface
from moe_export.export.manifest import Artifact
from moe_export.export.token_order import caller_order, rotates_tokens
from moe_export.reference.model import ReferenceUnit
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.decoding import Prompts, pad_token_id
from moe_export.runtimes.registry import RunnerOptions, make_runner
from moe_export.runtimes.taps import UnitCapture, reorder_tokens
from moe_export.validation.feeds import DEFAULT_SHAPES, load_npz_feeds, random_feeds, shape_label
from moe_export.validation.generation import default_prompts
from moe_export.validation.generation_units import GenerationJobs, check_generation, decode_candidate, generation_jobs
from moe_export.validation.options import ValidateOptions
from moe_export.validation.parity import CompareFunc, Tolerance, compare_func
from moe_export.validation.quantized import exact_arithmetic_artifact, quantization_cost
from moe_export.validation.reference_run import (
    Job,
    Reference,
    Replayed,
    StreamedReference,
    WholeReference,
    streamable,
)
from moe_export.validation.replay import compare_taps, first_diverging_unit, forced_routes
from moe_export.validation.report import RunComparison, ValidationReport
from moe_export.validation.results import DecodeResult, RunResult
from moe_export.validation.units import TokenLayout, UnitComparison

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
    options: ValidateOptions | None = None,
    *,
    shapes: Sequence[tuple[int, int]] | None = None,
    per_output: dict[str, Tolerance] | None = None,
    routing: bool = True,
    progress: ProgressCallback | None = None,
    save_results: str | Path | None = None,
    load_results: str | Path | None = None,
    reference_runner: Runner | None = None,
    **fields: Any,
) -> ValidationReport:
    """Run the candidates (`options.runtimes[1:]`) on an export directory, then judge each against the reference
    (`runtimes[0]`) run with its routing replayed.

    `options` holds what `moe-export validate`'s flags set (validation/options.py); its fields may also be given as
    keywords (`validate(d, new_tokens=0)`), which replace those of `options`. `options.reference`: "streamed" (the
    default) runs the torch reference one decoder layer part at a time, after the candidates have run and freed
    their sessions, so validating holds about one copy of the weights, the candidate's; "whole" builds the whole
    reference model (validation/reference_run.py). `shapes`: several (batch, seq) random inputs.
    `save_results` writes each candidate's run (outputs, taps, generation) to DIR/<runtime>/; `load_results` reads
    them from there instead of running the candidates (validation/results.py). `reference_runner` (inactive) stands
    in for `runtimes[0]`: e.g. a TorchRunner over an already-built model, or one with substituted base weights
    (a dequantized int4 base), so any reference model gets the same route replay and judgement.
    A quantized export (`onnx --quantize`) is checked in two parts (validation/quantized.py): its arithmetic
    against the reference with its dequantized base weights, at the fp32 tolerance, and the quantization's
    cost against the fp32 reference on held-out text (a gate only with `max_top1_drop`)."""
    settings = (options or ValidateOptions()).replace(**fields) if fields else options or ValidateOptions()
    plan = _plan(artifact_dir, settings, shapes, save_results, load_results)
    artifact, say = plan.artifact, progress or (lambda _msg: None)
    default = DEFAULT_TOLERANCES.get(artifact.dtype, DEFAULT_TOLERANCES["fp32"])
    tol = Tolerance(*(d if v is None else v for d, v in ((default.atol, settings.atol), (default.rtol, settings.rtol))))
    reference = _reference(plan, reference_runner, routing)
    replay = routing and not artifact.base_only and reference.replays
    prompts = default_prompts(artifact.vocab_size(), pad_token_id(artifact.path), settings.seed)
    prompts = prompts if artifact.manifest.kv_cache and settings.new_tokens > 0 else []
    if load_results is not None:
        results = {name: RunResult.load(load_results, name) for name in plan.candidates}
        prompts = prompts if all(r.generation for r in results.values()) else []  # judged as they were run
    else:
        results = run_candidates(plan, plan.feeds, prompts, settings.new_tokens, replay, save_results, say)
    report = _new_report(plan.deployed, artifact.dtype, plan.reference_name, tol, results, replay, plan.options)
    report.notes += _reference_notes(reference, plan) + _optimization_notes(settings, plan)
    say(f"running the reference ({plan.reference_name}) with each candidate's routing replayed")
    compare = compare_func(tol.atol, tol.rtol, per_output=per_output, min_top1=settings.min_top1)
    with reference:
        judge_all(report, reference, results, prompts, compare, artifact, default, tol)
    if plan.deployed.manifest.quant_scheme is not None:
        say("measuring the quantization's cost against the fp32 reference (held-out text)")
        report.notes.append(
            f"{plan.deployed.manifest.quant_scheme.scheme} export: parity is against the reference with the export's "
            "dequantized base weights, the export computing in fp32 (MatMulNBits accuracy level 0)"
        )
        report.quantization = quantization_cost(plan.deployed, plan.options, settings.max_top1_drop)
    return report


@dataclass(frozen=True)
class _Plan:
    """What one validation runs, checked before anything slow: the export (and its exact-arithmetic copy), the
    runner options, the reference and the candidates (their runners built, so unknown runtimes fail first)."""

    deployed: Artifact
    artifact: Artifact
    options: RunnerOptions
    reference_name: str
    candidates: dict[str, Runner]
    mode: str
    why_whole: str
    feeds: list[Feeds]  # the validation inputs (none when judging loaded results)


def _plan(
    artifact_dir: str | Path,
    settings: ValidateOptions,
    shapes: Sequence[tuple[int, int]] | None,
    save_results: str | Path | None,
    load_results: str | Path | None,
) -> _Plan:
    if save_results is not None and load_results is not None:
        raise MoeExportError("--save-results and --load-results are exclusive")
    deployed = Artifact.open(artifact_dir, settings.checkpoint, settings.base_model)
    if settings.max_top1_drop is not None and deployed.manifest.quant_scheme is None:
        raise MoeExportError(f"--max-top1-drop: {deployed.path} is not a quantized export (onnx --quantize)")
    artifact = exact_arithmetic_artifact(deployed)  # itself unless quantized
    # Validation runs each session for a few inferences, so ORT's arena buys little speed; without it the buffers of
    # the per-op weight casts (fp16 at `basic`) go back to the system after each run instead of staying reserved.
    optimization = settings.optimization_for(artifact.dtype)
    options = RunnerOptions(settings.device, settings.threads, optimization, REFERENCE_DTYPE, memory_arena=False)
    # The inputs before the runners: a bad --inputs file is named before a missing model is.
    shape_list = shapes or settings.shapes()
    feeds = [] if load_results is not None else make_feeds(artifact, settings.inputs, shape_list, settings.seed)
    names = settings.runtimes
    candidates = {name: make_runner(name, artifact, options) for name in names[1:]}
    return _Plan(deployed, artifact, options, names[0], candidates, settings.reference, streamable(artifact), feeds)


def _reference_notes(reference: Reference, plan: _Plan) -> list[str]:
    if isinstance(reference, StreamedReference):
        return ["reference: layer-streamed (one decoder layer part's weights in memory at a time)"]
    if plan.mode == "streamed" and plan.why_whole and plan.reference_name == "torch":
        return [f"reference: whole model ({plan.why_whole})"]
    return []


def _optimization_notes(settings: ValidateOptions, plan: _Plan) -> list[str]:
    ort = any(name.startswith("onnxruntime") for name in plan.candidates)
    if settings.optimization is not None or plan.options.optimization == "all" or not ort:
        return []
    return [
        f"ONNX Runtime at --optimization {plan.options.optimization}, the default for an {plan.artifact.dtype} export "
        "on the CPU (at all, its CPU provider stores the weights converted to fp32)"
    ]


def _reference(plan: _Plan, runner: Runner | None, routing: bool) -> Reference:
    """The layer-streamed torch reference when asked for and possible (a torch reference of a streamable export, no
    runner given), else the reference runner run whole."""
    if plan.mode == "streamed" and runner is None and routing and plan.reference_name == "torch" and not plan.why_whole:
        return StreamedReference(plan.artifact, plan.options)
    return WholeReference(runner or make_runner(plan.reference_name, plan.artifact, plan.options), replay=routing)


def run_candidates(
    plan: _Plan,
    feeds_list: list[Feeds],
    prompts: list[Prompts],
    new_tokens: int,
    replay: bool,
    save_results: str | Path | None,
    say: ProgressCallback,
) -> dict[str, RunResult]:
    """Each candidate's RunResult; one session at a time, each freed before the next (and before the reference)."""
    from moe_export.ir.fold import trim_heap, unmap_large_frees

    unmap_large_frees()  # the sessions' large buffers (outputs, taps, per-op casts) are unmapped when freed
    results = {}
    artifact = plan.artifact
    rotated = rotates_tokens(artifact.manifest.fusion)
    for name, runner in plan.candidates.items():
        say(f"running {name}")
        results[name] = run_candidate(runner, feeds_list, artifact.interface, taps=replay, rotated=rotated)
        trim_heap()  # what the released session left on the heap, before the next session or the reference
        if prompts:
            say(f"greedy generation on {name} ({new_tokens} tokens)")
            fresh = make_runner(name, artifact, plan.options)
            _set_aside(
                results,
                name,
                functools.partial(decode_candidate, fresh, artifact.manifest, prompts, new_tokens, replay),
            )
        if save_results is not None:
            results[name].save(save_results)
    return results


def _set_aside(results: dict[str, RunResult], name: str, decode: Callable[[], list[DecodeResult]]) -> None:
    """Run `decode` (the greedy decode's session) while `results[name]` (the scoring outputs and every unit's taps:
    168 MiB on a 1.1B export) waits in a temporary directory, not beside the session's weights; then read it back
    with the decode attached. The arrays come back as they were saved (results.py stores them as they are)."""
    import tempfile

    from moe_export.ir.fold import trim_heap

    with tempfile.TemporaryDirectory(prefix="moe-export-validate-") as spill:
        results.pop(name).save(spill)
        trim_heap()
        generation = decode()
        trim_heap()
        results[name] = RunResult.load(spill, name)
    results[name].generation = generation


def judge_all(
    report: ValidationReport,
    reference: Reference,
    results: dict[str, RunResult],
    prompts: list[Prompts],
    compare: CompareFunc,
    artifact: Artifact,
    unit_tol: Tolerance,
    tol: Tolerance,
) -> None:
    """Every candidate's scoring runs and decodes against the reference: all their reference jobs run in one
    pass (one read of the weights when streamed), then each is judged."""
    units, interface = reference.units, artifact.interface
    scoring = {name: [Job(f, forced_routes(t, units) if units and r.tapped else None)
                      for f, t in zip(r.feeds, r.taps, strict=True)] for name, r in results.items()}  # fmt: skip
    decoding = {name: generation_jobs(r.generation, prompts, units, interface) if prompts else []
                for name, r in results.items()}  # fmt: skip
    jobs = [j for name in results for j in scoring[name] + _flat(decoding[name])]
    replayed = iter(reference.run(jobs))
    for name, result in results.items():
        judge_run(report, [next(replayed) for _ in scoring[name]], result, units, compare, artifact, unit_tol)
        gen = [next(replayed) for _ in _flat(decoding[name])]
        if decoding[name]:
            report.generation += check_generation(reference, name, decoding[name], gen, tol, interface, artifact.dtype)


def _flat(jobs: list[GenerationJobs]) -> list[Job]:
    return [j for g in jobs for j in ((g.replay, g.own) if g.replay is not None else (g.own,))]


def _new_report(
    deployed: Artifact,
    dtype: str,
    reference: str,
    tol: Tolerance,
    results: dict[str, RunResult],
    replay: bool,
    options: RunnerOptions,
) -> ValidationReport:
    first = next(iter(results.values()))
    report = ValidationReport(str(deployed.path), dtype, reference, list(results), tol, first.labels)
    report.torch_dtype = options.torch_dtype
    padded = sum(int((~v).sum()) for f in first.feeds if (v := valid_positions(f, deployed.interface)) is not None)
    if padded:
        mask = deployed.interface.mask_name
        report.notes.append(f"{padded} padded positions ({mask} 0) are excluded: their outputs are unspecified")
    for name, result in results.items():
        report.notes += [f"{name}: {note}" for note in result.notes]
        if replay and not result.tapped:
            report.notes.append(f"{name}: this runtime cannot tap its units: outputs compared without route replay")
    return report


def run_candidate(
    runner: Runner, feeds_list: list[Feeds], interface: GraphInterface, taps: bool, rotated: bool = False
) -> RunResult:
    """Run one candidate on every input (with its per-unit taps when asked and it can). `rotated`: the graph runs
    its units on each left-padded row's rotated tokens (a contrib decoder): the taps are put back in the feeds'
    order, so they line up with the reference's and the saved results read like any other."""
    tapped = taps and runner.request_taps()
    result = RunResult(runner.name, [shape_label(f, interface) for f in feeds_list], feeds_list, [], [], [], tapped)
    with runner:
        for feeds in feeds_list:
            result.outputs.append(runner.infer(feeds))
            result.seconds.append(runner.last_inference_time())
            result.taps.append(_caller_order_taps(runner.last_taps, feeds, interface, rotated) if tapped else {})
        if getattr(runner, "kernel_note", ""):  # native kernels or function bodies ran the custom ops
            result.notes.append(runner.kernel_note)  # type: ignore[attr-defined]
    runner.last_taps = {}  # the result holds them; the runner would keep the last input's alive after it
    return result


def _caller_order_taps(
    taps: dict[str, UnitCapture], feeds: Feeds, interface: GraphInterface, rotated: bool
) -> dict[str, UnitCapture]:
    """`taps` in the feeds' token order: undo the contrib decoder's left-pad rotation (export/token_order.py)."""
    mask = feeds.get(interface.mask_name)
    seq = int(np.asarray(feeds[interface.tokens_name]).shape[1])
    order = caller_order(mask, seq) if rotated and mask is not None else None
    return dict(taps) if order is None else reorder_tokens(taps, order)


def judge_run(
    report: ValidationReport,
    replayed: list[Replayed],
    result: RunResult,
    units: dict[str, ReferenceUnit],
    compare: CompareFunc,
    artifact: Artifact,
    unit_tol: Tolerance,
) -> None:
    """Judge `result`'s outputs and units against the reference's runs of its inputs with its routing replayed.

    Unit checks keep the dtype's default tolerance: --atol/--rtol are about the model outputs."""
    per_unit: dict[str, UnitComparison] = {}
    replay = result.tapped and bool(units)
    for feeds, label, got, taps, seconds, ran in zip(
        result.feeds, result.labels, result.outputs, result.taps, result.seconds, replayed, strict=True
    ):
        valid = valid_positions(feeds, artifact.interface)
        compared = compare(drop_padding(ran.outputs, valid), drop_padding(got, valid))
        before = {n: u.flip_count for n, u in per_unit.items()}
        if replay:
            seq = int(np.asarray(feeds[artifact.interface.tokens_name]).shape[1])
            layout = TokenLayout(label, seq, None if valid is None else valid.reshape(-1))
            compare_taps(per_unit, taps, ran.taps, units, artifact.dtype, unit_tol, layout)
            if not compared.passed:
                compared.messages.append(first_diverging_unit(taps, ran.taps, units, unit_tol))
        flips = [f for u in per_unit.values() for f in u.flips if f.input == label]
        count = sum(u.flip_count - before.get(n, 0) for n, u in per_unit.items())
        report.comparisons.append(RunComparison(result.runtime, label, compared, seconds, replay, count, flips))
    if replay:
        for unit in per_unit.values():
            unit.finish(gate_tol=unit_tol.bound(1.0))  # gates are in [0, 1]
        report.units[result.runtime] = per_unit
        _note_unmatched(report, result.runtime, units, per_unit)


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


def _note_unmatched(
    report: ValidationReport, runtime: str, units: dict[str, ReferenceUnit], judged: dict[str, UnitComparison]
) -> None:
    missing = sorted(name for name, unit in units.items() if unit.router is not None and name not in judged)
    if missing:
        report.notes.append(
            f"{runtime}: {len(missing)} routed reference unit(s) have no GroupedLoRA node named after them "
            f"(merged or renamed), e.g. {missing[0]}"
        )
