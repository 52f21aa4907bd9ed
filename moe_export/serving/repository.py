"""`moe-export triton`: write a Triton model repository for an export, atomically.

Models (NAME from --name, else the export folder's name):
  NAME           the export's graph: onnxruntime backend (platform onnxruntime_onnx) or python backend
  NAME_generate  KV-cache exports only: greedy generation inside one python-backend model
  NAME_trt       --device gpu and an engine from `moe-export trt` in the export: platform tensorrt_plan
Every option is checked before anything is written; the repository is built in a temporary sibling and
renamed into place, and an existing non-empty folder is replaced only if an earlier run wrote it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_export import __version__
from moe_export.errors import MoeExportError
from moe_export.export.interface import INPUT_IDS, GraphInterface
from moe_export.export.manifest import Artifact
from moe_export.files import make_staging_dir, output_errors, replace_directory, write_text_atomic
from moe_export.runtimes.generate import eos_ids
from moe_export.serving import model_config
from moe_export.serving.pbtxt import Message, render
from moe_export.serving.readme import repository_readme

BACKENDS = ("onnxruntime", "python")
DEVICES = ("cpu", "gpu")
DEFAULT_MAX_BATCH = 8
MARKER = ".moe-export-triton.json"  # says an earlier `moe-export triton` wrote the folder (safe to replace)
BACKEND_FILES = Path(__file__).resolve().parent / "backend"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_NEW_TOKENS_LIMIT = 512


@dataclass
class TritonOptions:
    name: str | None = None
    max_batch_size: int | None = None  # None: 8 for a stateless graph, 0 for a KV-cache decoder
    instances: int = 1
    device: str = "cpu"
    backend: str = "onnxruntime"
    threads: int = 0  # ORT intra-op threads per instance; 0: ORT's default (one per core)


@dataclass
class RepositoryReport:
    repository: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)  # the Triton backends the server needs for these models

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_repository(export_dir: str | Path, out: str | Path, options: TritonOptions | None = None) -> RepositoryReport:
    options = options or TritonOptions()
    artifact = Artifact.open(export_dir)
    out = Path(out)
    plan = _plan(artifact, out, options)
    with output_errors(out):  # a full disk or read-only -o: one line naming -o, exit 2
        staging = make_staging_dir(out)
        try:
            report = _write(artifact, staging, out, options, plan)
            replace_directory(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return report


@dataclass
class _Plan:
    name: str
    io: model_config.GraphIO
    max_batch_size: int
    library: Path | None
    engine: Path | None
    notes: list[str]


def _plan(artifact: Artifact, out: Path, options: TritonOptions) -> _Plan:
    """Every check, before anything is written: a failed check leaves the file system as it was."""
    if options.backend not in BACKENDS:
        raise MoeExportError(f"--backend {options.backend!r}: choose from {', '.join(BACKENDS)}")
    if options.device not in DEVICES:
        raise MoeExportError(f"--device {options.device!r}: choose from {', '.join(DEVICES)}")
    if options.instances < 1:
        raise MoeExportError(f"--instances {options.instances}: expected >= 1")
    if options.threads < 0:
        raise MoeExportError(f"--threads {options.threads}: expected >= 0 (0: onnxruntime's default)")
    name = options.name or re.sub(r"[^A-Za-z0-9_.-]", "_", artifact.path.name)
    if not NAME_RE.match(name):
        raise MoeExportError(f"--name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter/digit)")
    kv = artifact.manifest.kv_cache
    batch = options.max_batch_size if options.max_batch_size is not None else (0 if kv else DEFAULT_MAX_BATCH)
    if batch < 0:
        raise MoeExportError(f"--max-batch-size {batch}: expected >= 0 (0: no dynamic batching)")
    if kv and batch > 0:
        raise MoeExportError(
            f"--max-batch-size {batch}: {artifact.path} is a KV-cache decoder, which Triton cannot batch "
            "dynamically (each request carries its own past); use --max-batch-size 0, the generation model, "
            "or export with --no-kv-cache"
        )
    python_side = options.backend == "python" or kv
    if python_side and artifact.manifest.dtype == "bf16":
        raise MoeExportError(
            f"{artifact.path}: a bf16 export cannot run in the python backend (numpy has no bfloat16); "
            "use --backend onnxruntime with a --no-kv-cache export, or export fp32/fp16"
        )
    io = model_config.graph_io(artifact)
    if batch > 0 and not io.first_dims_dynamic:
        raise MoeExportError(
            f"--max-batch-size {batch}: {artifact.onnx_path} has a static first dim; use --max-batch-size 0"
        )
    for tensor in (*io.inputs, *io.outputs):
        _ = tensor.triton_type  # an unsupported element type fails here, before writing
    if out.resolve() == artifact.path or artifact.path in out.resolve().parents:
        raise MoeExportError(f"-o {out}: must be outside the export directory {artifact.path}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise MoeExportError(
            f"-o {out}: exists and was not written by `moe-export triton`; choose a new or empty folder"
        )
    notes = []
    library = _native_library()
    engine = model_config.engine_path(artifact)
    if engine is not None and options.device != "gpu":
        notes.append(f"{engine.name} found but not served: TensorRT needs --device gpu")
        engine = None
    return _Plan(name, io, batch, library, engine, notes)


def _native_library() -> Path | None:
    """The native kernel library built for this machine (built now when a compiler and the headers are here)."""
    from moe_export.runtimes import native

    return native.session_library()[0]


def _write_generate_model(
    artifact: Artifact, staging: Path, options: TritonOptions, plan: _Plan, ort_params: dict[str, str],
    limits: dict[str, str],
) -> dict[str, dict[str, str]]:  # fmt: skip
    """The `<name>_generate` python-backend model (greedy generation on the KV-cache decoder); its report row."""
    gen_name = f"{plan.name}_generate"
    folder = staging / gen_name / "1"
    _place_onnx(artifact, folder)
    _place_backend(folder, "generate_model.py")
    library_name = plan.library.name if plan.library else None
    if plan.library is not None:
        _link_or_copy(plan.library, folder / plan.library.name)
    gen_params = {
        **ort_params,
        "onnx_file": artifact.manifest.model_file,
        "custom_ops_library": library_name or "",
        "eos_token_ids": ",".join(map(str, sorted(eos_ids(artifact.path)))),
        **limits,
        "max_new_tokens_limit": str(MAX_NEW_TOKENS_LIMIT),
        "default_max_new_tokens": "32",
    }
    _write_config(
        staging / gen_name, model_config.generate_model_config(gen_name, options.instances, options.device, gen_params)
    )
    return {gen_name: {"backend": "python", "role": f"greedy generation ({INPUT_IDS} -> output_ids)"}}


def _write(artifact: Artifact, staging: Path, final: Path, options: TritonOptions, plan: _Plan) -> RepositoryReport:
    report = RepositoryReport(str(final), notes=list(plan.notes))
    ort_params = {"intra_op_thread_count": str(options.threads), "inter_op_thread_count": "1"}
    library_name = plan.library.name if plan.library else None
    if plan.library is None:
        report.notes.append(
            "native kernel library unavailable here (`moe-export kernels` says why): function bodies run"
        )

    main = staging / plan.name
    _place_onnx(artifact, main / "1")
    params = dict(ort_params)
    op_library = None
    if library_name:
        _link_or_copy(plan.library, main / "1" / library_name)  # type: ignore[arg-type]
        # The onnxruntime backend dlopens the path as written: where the repository will be at serve time.
        op_library = str(final.resolve() / plan.name / "1" / library_name)
    limits = _limits(artifact)
    if options.backend == "python":
        _place_backend(main / "1", "scoring_model.py")
        params.update(onnx_file=artifact.manifest.model_file, custom_ops_library=library_name or "", **limits)
    config = model_config.onnx_model_config(
        plan.name, plan.io, backend=options.backend, max_batch_size=plan.max_batch_size,
        instances=options.instances, device=options.device, params=params,
        model_file=artifact.manifest.model_file, op_library=op_library,
    )  # fmt: skip
    _write_config(main, config)
    report.models[plan.name] = _describe(options.backend, plan.max_batch_size, artifact.interface)

    if artifact.manifest.kv_cache:
        report.models.update(_write_generate_model(artifact, staging, options, plan, ort_params, limits))
    if plan.engine is not None:
        trt_name = f"{plan.name}_trt"
        _link_or_copy(plan.engine, staging / trt_name / "1" / "model.plan")
        _write_config(staging / trt_name, model_config.tensorrt_model_config(trt_name, plan.io, options.instances))
        report.models[trt_name] = {"backend": "tensorrt", "role": "the TensorRT engine (GPU)"}

    report.backends = sorted({info["backend"] for info in report.models.values()})
    write_text_atomic(
        staging / "README.md",
        repository_readme(artifact, plan.name, report.models, report.notes, options.backend, plan.io),
    )
    marker = {
        "moe_export_version": __version__,
        "export": str(artifact.path),
        "models": sorted(report.models),
        "backends": report.backends,
    }
    write_text_atomic(staging / MARKER, json.dumps(marker, indent=2) + "\n")
    return report


def _limits(artifact: Artifact) -> dict[str, str]:
    """What the python-backend models check each request against: ids in [0, vocab), tokens within the context
    (config.json's max_position_embeddings; "0" when the config has none: no context check)."""
    context = artifact.model_config("max_position_embeddings")
    return {"vocab_size": str(artifact.vocab_size()), "context_length": str(context or 0)}


def _describe(backend: str, batch: int, interface: GraphInterface) -> dict[str, Any]:
    scoring = f"scoring ({', '.join(interface.input_names())} -> {', '.join(interface.output_names())})"
    role = "decoder step (past/present in and out)" if interface.is_decoder else scoring
    return {"backend": backend, "role": role, "max_batch_size": batch, "dynamic_batching": batch > 0}


def _write_config(model_dir: Path, config: Message) -> None:
    header = f"# Written by moe-export {__version__} (`moe-export triton`); see ../README.md.\n"
    write_text_atomic(model_dir / "config.pbtxt", header + render(config) + "\n")


def _place_onnx(artifact: Artifact, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    _link_or_copy(artifact.onnx_path, version_dir / artifact.manifest.model_file)
    if artifact.manifest.external_data:
        _link_or_copy(artifact.path / artifact.manifest.external_data, version_dir / artifact.manifest.external_data)


def _place_backend(version_dir: Path, model_file: str) -> None:
    shutil.copyfile(BACKEND_FILES / model_file, version_dir / "model.py")
    shutil.copyfile(BACKEND_FILES / "runtime.py", version_dir / "moe_export_runtime.py")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when on the same file system (weights are large), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
