"""`export_onnx`: the whole causal LM to ONNX, one `moe_export::GroupedLoRA` node per routed unit.

By default the graph is the KV-cache decoder that generation clients run (export/decoder.py; with
`fusion="contrib"` its attention, rotary and residual norms in ONNX Runtime contrib ops where the model allows
it: export/decoder_fused.py; plus genai_config.json from export/client_files.py); `kv_cache=False` writes the scoring graph
(input_ids, attention_mask) -> logits.

Steps: optional merge (merging/) -> fold always-on shared LoRAs into W (exact) -> optional fp16/bf16 cast
(routers stay fp32) -> torch.onnx.export(dynamo=True) with the custom-op translation table -> name each
custom node after its unit, attach the model-local function bodies -> save (external data above 2 GB)
-> RMSNorm rewritten so ORT fuses it (export/base_fusions.py) -> optional int4/int8 base weights
(export/quantize.py) -> onnx.checker full check -> export.json, config and tokenizer files -> rename into place (the steps from naming the nodes to the check: export/onnx_graph.py). Validation is the
next stage's job: `moe_export.api.export_onnx` (the public `moe_export.export_onnx`) runs it afterwards.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from moe_export import __version__
from moe_export.errors import ExportError, FormatError, InternalError, MoeExportError
from moe_export.export.client_files import write_client_files
from moe_export.export.decoder import trace_decoder
from moe_export.export.decoder_fused import resolve_fusion
from moe_export.export.dtypes import GRAPH_DTYPES, torch_dtype
from moe_export.export.interface import GraphInterface, read_onnx_io
from moe_export.export.manifest import MANIFEST_NAME, ExportManifest, UnitRecord, portable_path
from moe_export.export.onnx_graph import custom_op_types, post_process
from moe_export.export.onnx_ops import translation_table
from moe_export.export.options import ExportOptions
from moe_export.export.packing import PackPlan
from moe_export.files import (
    check_not_input,
    check_writable,
    make_staging_dir,
    output_errors,
    replace_directory,
    replace_files,
)
from moe_export.ops.names import DOMAIN
from moe_export.progress import status_spinner
from moe_export.reference.loading import LoadedAdapter, attach_model, load_base_model, load_without_model
from moe_export.reference.model import MoELoRALinear, cast_reference_model, moe_modules
from moe_export.reference.model_copy import copy_for_edit

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = MODEL_FILE + ".data"
# The scoring graph's example call; sizes >= 2 on every dynamic dim: torch.export specialises a dim of 1.
EXAMPLE_SHAPE = (2, 16)
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class ExportResult:
    """What `export_onnx` wrote, and the validation report when it ran."""

    out_dir: Path
    model_path: Path
    manifest: ExportManifest
    seconds: float
    validation: Any | None = None  # validate.ValidationReport

    def to_dict(self) -> dict[str, Any]:
        report = self.validation.to_dict() if self.validation is not None else None
        return {
            "out_dir": str(self.out_dir),
            "model": str(self.model_path),
            "seconds": round(self.seconds, 2),
            "manifest": self.manifest.to_dict(),
            "validation": report,
        }


class _CausalLMLogits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, no KV cache: the scoring interface (export/interface.py)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(
    loaded: LoadedAdapter,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    console: Console | None = None,
    merge_streaming: Any = None,
    consume: bool = False,
    kernel_library: Path | None = None,
    **fields: Any,
) -> ExportResult:
    """Export `loaded` to `out_dir` (model.onnx + export.json + config/tokenizer); see the module docstring.

    `options` (or its fields as keywords) say what to write. `loaded` is never changed: the shared LoRAs fold into
    a copy of the weights they touch (model_copy.py), a fp16/bf16 export casts a copy of the weights, and a merge
    works on its own copy. `consume=True` hands the model over instead (`moe_export.export_onnx` on a checkpoint
    path, whose model nobody else holds): folds and casts happen in place, so the export needs no second copy of
    the weights, and `loaded.model` is None afterwards, never half-folded. An existing `out_dir` that holds a
    previous export is replaced; one that also holds files we did not write is refused unless `force`, which
    replaces our files and leaves the others alone. `merge_streaming` (merging.layerwise.Streaming) runs the
    merge's calibration and held-out check layer by layer. `quantize` ("int4" | "int8") rewrites the base linears
    (lm_head included) into MatMulNBits blocks of `block_size` after the folds and the merge
    (export/quantize.py); routers and experts stay fp32. `kernel_library` (the native GroupedLoRA library; the
    API passes the one built here) ships with a KV-cache export that has custom ops, and genai_config.json names
    it (export/client_files.py). `fusion` ("none", the default, or "contrib"): the KV-cache decoder's attention,
    rotary and residual norms as ONNX Runtime com.microsoft ops where the model allows it (export/decoder_fused.py).
    """
    start = time.perf_counter()
    options = ExportOptions.build(options, fields)
    console = console or Console(stderr=True)
    out_dir = Path(out_dir).resolve()
    # the base a checkpoint names is known only now: -o must not be it, or inside it, either
    ours = check_export_target(out_dir, options, [loaded.checkpoint, loaded.base_model_path])
    if loaded.model is None and not options.base_only:
        raise ExportError(
            f"{loaded.checkpoint}: this LoadedAdapter has no model (an earlier export_onnx(consume=True) took it, "
            "or it was loaded without one); load the checkpoint again"
        )
    merged, merge_plan = _merge_first(loaded, options, console, merge_streaming)
    source = merged.model
    if consume:
        # Handed over: only `source` holds the model now, so an in-place cast frees each fp32 weight as it goes,
        # and nobody can reuse a half-folded model.
        loaded.model = merged.model = None

    with status_spinner(console, options.progress, "preparing the model") as status:
        model = _prepare_model(source, merged, options.dtype, options.base_only, consume)
        del source
        units = [] if options.base_only else _unit_records(loaded, model)
        fusion = resolve_fusion(options.fusion, model, options.kv_cache, console)  # export/decoder_fused.py
        manifest = _write_export(
            model, merged, out_dir, ours, options, units, merge_plan, kernel_library, status, fusion
        )
    return ExportResult(out_dir, out_dir / MODEL_FILE, manifest, time.perf_counter() - start)


def _write_export(
    model: torch.nn.Module, merged: LoadedAdapter, out_dir: Path, ours: set[str] | None, options: ExportOptions,
    units: list[UnitRecord], merge_plan: dict[str, Any] | None, kernel_library: Path | None, status: Any,
    fusion: dict[str, Any],
) -> ExportManifest:  # fmt: skip
    """Trace, post-process and write the export in a staging directory renamed into place (check_out_dir said
    how: `ours`); on any failure the staging directory goes and `out_dir` is as it was. `fusion`: the decoder's
    base-graph record (export/decoder_fused.py resolve_fusion), whose mode the trace follows."""
    with output_errors(out_dir):  # a full disk or read-only -o: one line naming -o, exit 2
        tmp = make_staging_dir(out_dir)
        try:
            status.update(f"exporting {len(units)} units to ONNX (opset {options.opset}, {options.dtype})")
            interface = GraphInterface.for_model(model.config, options.kv_cache, GRAPH_DTYPES[options.dtype])
            packed = fusion.get("packed") or {}
            program = _trace(model, interface, options.opset, fusion["mode"], packed)
            model_path, scheme, adapter_fusion = post_process(
                program, model, tmp / MODEL_FILE, options, units, status, set(packed)
            )
            interface = interface.with_graph(*read_onnx_io(model_path), where=str(model_path))
            manifest = _manifest(merged, out_dir, tmp, options, units, merge_plan, interface, program)
            manifest.quantization = scheme.to_dict() if scheme is not None else None
            manifest.adapter_fusion = adapter_fusion
            if adapter_fusion is not None and any(adapter_fusion[k] for k in ("residual_adds", "routers")):
                manifest.custom_ops = custom_op_types(model_path)
            manifest.fusion = fusion
            library = kernel_library if manifest.custom_ops else None
            _write_artifact(tmp, out_dir, ours, manifest, model.config, library)
            return manifest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def load_for_export(
    ckpt: str | Path, out_dir: str | Path, options: ExportOptions, base_model: str | Path | None = None,
    family: str | None = None, top_k: int | list[int] | None = None, task_id: int | None = None,
) -> LoadedAdapter:  # fmt: skip
    """The checkpoint loaded the way an export needs it, as the only holder of its model (hand it over with
    consume=True): in the export dtype when the base is stored in it and no merge calibrates in fp32 (one copy
    of the weights; the shared LoRAs still fold into exact W, one rounding), else in fp32, cast in place after
    the folds (a fp32 base loaded in fp16 would round W twice). A base-only export builds no adapter model.
    `out_dir` is checked first (check_export_target), and against the base the checkpoint names once that is
    read, before any weight loads."""
    check_export_target(out_dir, options, [ckpt, base_model])
    loaded = load_without_model(ckpt, base_model=base_model, family=family, top_k=top_k, task_id=task_id)
    check_export_target(out_dir, options, [loaded.base_model_path])
    if options.base_only:
        return loaded
    dtype = torch_dtype(options.dtype)
    direct = options.merge is None and _stored_dtypes(loaded.base_model_path) == {dtype}
    return attach_model(loaded, dtype if direct else torch.float32)


def merge_streaming_for(loaded: LoadedAdapter, options: ExportOptions) -> Any:
    """How the export's merge runs the reference (merging.layerwise.Streaming, or None: the model the export
    holds anyway, when on the CPU); None without a merge."""
    if options.merge is None:
        return None
    from moe_export.merging.layerwise import choose_streaming

    calibration = options.merge.calibration
    return choose_streaming(calibration.forward, calibration.device, loaded.base_model_path, whole_model_loaded=True)


def _stored_dtypes(base: Path) -> set[object]:
    """The base's stored weight dtypes; empty when it has no safetensors weights (transformers reads other files)."""
    from moe_export.formats.base_weights import BaseWeights

    try:
        return set(BaseWeights(base).stored_dtypes())
    except FormatError:
        return set()


def _merge_first(
    loaded: LoadedAdapter, options: ExportOptions, console: Console, streaming: Any
) -> tuple[LoadedAdapter, dict[str, Any] | None]:
    """The merged model and its plan when `options.merge` asks for one (its report rendered), else `loaded`."""
    if options.merge is None:
        return loaded, None
    from moe_export.merging.apply import merge  # lazy: merge pulls in calibration

    # the export's progress setting covers its merge's calibration bars too
    calibration = options.merge.calibration.replace(progress=options.progress)
    result = merge(loaded, options.merge.replace(calibration=calibration), streaming=streaming)
    result.report.render(console)
    return result.loaded, result.plan.to_dict()


def _manifest(
    loaded: LoadedAdapter, out_dir: Path, tmp: Path, options: ExportOptions, units: list[UnitRecord],
    merge_plan: dict[str, Any] | None, interface: GraphInterface, program: Any,
) -> ExportManifest:  # fmt: skip
    return ExportManifest(
        moe_export_version=__version__,
        source_checkpoint=str(Path(loaded.checkpoint).resolve()),
        base_model=str(Path(loaded.base_model_path).resolve()),
        relative_sources={
            "source_checkpoint": portable_path(loaded.checkpoint, out_dir),
            "base_model": portable_path(loaded.base_model_path, out_dir),
        },
        family=loaded.loader_family or loaded.family,  # the loader that reads the checkpoint again
        dtype=options.dtype,
        opset=options.opset,
        model_file=MODEL_FILE,
        external_data=EXTERNAL_DATA_FILE if (tmp / EXTERNAL_DATA_FILE).exists() else None,
        base_only=options.base_only,
        load_options={"top_k": loaded.options.top_k, "task_id": loaded.options.task_id},
        units=units,
        merge_plan=merge_plan,
        interface=interface,
        custom_ops=sorted({n.op_type for n in program.model.graph if n.domain == DOMAIN}),
        copied_files=_copy_base_files(Path(loaded.base_model_path), tmp),
    )


def _write_artifact(
    tmp: Path, out_dir: Path, ours: set[str] | None, manifest: ExportManifest, config: Any, library: Path | None
) -> None:
    """Client files and export.json into the staging directory, then renamed into place (export.json last)."""
    if manifest.interface.is_decoder:
        manifest.copied_files += write_client_files(tmp, config, manifest.interface, MODEL_FILE, library)
    manifest.save(tmp)
    if ours is None:
        replace_directory(tmp, out_dir)
    else:
        replace_files(tmp, out_dir, ours, MANIFEST_NAME)


def check_export_target(
    out_dir: str | Path, options: ExportOptions, inputs: list[str | Path | None]
) -> set[str] | None:
    """Refuse, before any work, an `out_dir` that is or holds one of the export's inputs (`inputs` and the
    merge's calibration text) or that we may not replace (check_out_dir, whose answer it returns)."""
    out_dir = Path(out_dir).resolve()
    check_not_input(out_dir, "-o", [*inputs, options.calibration_data], directory=True)
    return check_out_dir(out_dir, options.force)


def check_out_dir(out_dir: Path, force: bool) -> set[str] | None:
    """Refuse an output we may not replace; the names our previous export wrote when the replace must keep
    other files (None: the directory is absent, empty, or holds only our files, so it is swapped whole)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"-o {out_dir}: exists and is not a directory; choose another -o")
    check_writable(out_dir, "-o", directory=True)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    if not (out_dir / MANIFEST_NAME).is_file():
        raise ExportError(f"-o {out_dir}: exists, is not empty and holds no {MANIFEST_NAME}; refusing to replace it")
    ours = _previous_export_files(out_dir)
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if others and not force:
        raise ExportError(
            f"-o {out_dir}: holds files moe-export did not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); pass --force to replace only the export's files, or choose another -o"
        )
    return ours if others else None


def _previous_export_files(out_dir: Path) -> set[str]:
    """The file names the export in `out_dir` wrote, from its export.json (only the manifest if unreadable)."""
    try:
        old = ExportManifest.load(out_dir)
    except FormatError:
        return {MANIFEST_NAME}
    return {MANIFEST_NAME, old.model_file, *([old.external_data] if old.external_data else []), *old.copied_files}


def _prepare_model(
    source: torch.nn.Module | None, loaded: LoadedAdapter, dtype: str, base_only: bool, consume: bool
) -> torch.nn.Module:
    """The model to trace: shared LoRAs folded into W (fp32 sums), cast to `dtype` with routers kept as they are.

    Unless `consume`, the caller's model is left as it was (a later merge or export would fold again): the new
    module tree shares every weight, a folded weight is cloned, folded and cast one at a time, and the cast
    rebinds the copy's parameters. Extra memory: the weights in `dtype` (nothing for fp32 without folds).
    With `consume` everything happens in place, so the model in memory is the only copy."""
    target = torch_dtype(dtype)
    if base_only:
        return load_base_model(Path(loaded.base_model_path), target)
    assert source is not None  # export_onnx refuses a LoadedAdapter without a model
    model = source if consume else copy_for_edit(source, [])
    for name, module in moe_modules(model):
        if not (isinstance(module, MoELoRALinear) and module.shared_scalings):
            continue
        if not consume:
            module.base.weight = _new_parameter(module.base.weight.detach().clone())
        module.fold_shared_into_base(loaded.adapter.unit(name))  # type: ignore[arg-type]
        if module.base.weight.dtype != target:  # now: one weight-sized temporary, not a model-sized one
            module.base.weight = _new_parameter(module.base.weight.detach().to(target))
    return cast_reference_model(model, target).eval()


def _new_parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)  # traced under no_grad: nothing needs a gradient


def _unit_records(loaded: LoadedAdapter, model: torch.nn.Module) -> list[UnitRecord]:
    """One record per adapter unit; its status comes from the module that will be exported."""
    records = []
    for unit in loaded.adapter.units:
        module = model.get_submodule(unit.name)
        routed_module = getattr(module, "unit_name", None) is not None and getattr(module, "routed", True)
        status = "routed" if routed_module else ("merged" if unit.routed else "folded")
        router = unit.router if unit.routed else None
        stack = unit.experts if unit.kind == "linear_moe" else next(iter(unit.experts.values()), None)  # type: ignore[union-attr]
        records.append(
            UnitRecord(
                name=unit.name,
                kind=unit.kind,
                status=status,
                num_experts=router.num_experts if router is not None else None,
                top_k=router.slots if router is not None else None,
                rank=stack.rank if stack is not None else None,  # type: ignore[union-attr]
            )
        )
    return records


def _trace(model: torch.nn.Module, interface: GraphInterface, opset: int, fusion: str, packed: PackPlan) -> Any:
    """torch.onnx.export of the model into the interface (the decoder's base graph as `fusion` says: contrib
    or none, export/decoder_fused.py, with the `packed` projections: export/packing.py); returns the ONNXProgram."""
    try:
        if interface.is_decoder:
            return trace_decoder(model, interface, opset, translation_table(), fusion, packed)
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
        feeds = interface.example_feeds(vocab, *EXAMPLE_SHAPE)
        with torch.no_grad():
            return torch.onnx.export(
                _CausalLMLogits(model).eval(),
                tuple(torch.from_numpy(feeds[name]) for name in interface.input_names()),
                dynamo=True,
                opset_version=opset,
                input_names=interface.input_names(),
                output_names=interface.output_names(),
                dynamic_shapes=interface.dynamic_shapes(),
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=False,
            )
    except MoeExportError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise InternalError(f"torch.onnx.export crashed: {type(exc).__name__}: {first}") from exc


def _copy_base_files(base: Path, tmp: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
            copied.append(name)
    return copied
