"""The ONNX Runtime runner: CPU EP by default, CUDA / TensorRT EPs when installed and asked for.

The session is built by a deferred callable (`session_builder`) inside `activate()`, as in Polygraphy's
`SessionFromOnnx`, so runners are cheap to construct and a debug variant of the model (extra outputs)
can reuse the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, InternalError, RuntimeUnavailableError
from moe_export.export.manifest import Artifact
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.registry import RunnerOptions
from moe_export.runtimes.taps import TappedModel, captures_from_outputs, tapped_model

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# An ONNX model given as a path or as serialized bytes (an in-memory edited copy).
ModelSource = str | Path | bytes


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise RuntimeUnavailableError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from exc
    return onnxruntime


def resolve_providers(names: Sequence[str]) -> list[str]:
    """EP names ('cpu', 'cuda', 'tensorrt' or full names) -> installed ORT providers; CPU is always last."""
    ort = _import_ort()
    available = ort.get_available_providers()
    providers = []
    for name in names:
        full = PROVIDERS.get(name, name)
        if full not in available:
            raise RuntimeUnavailableError(
                f"onnxruntime: provider {full} is not available (installed: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA / TensorRT"
            )
        providers.append(full)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")  # fallback for nodes the GPU EPs do not claim
    return providers


def session_builder(
    model: ModelSource,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    optimization: str = "all",
    external_data_dir: Path | None = None,
    native_kernels: bool = True,
    memory_arena: bool = True,
) -> Callable[[], Any]:
    """A callable that builds the InferenceSession; errors name the model file.

    With `native_kernels` the native GroupedLoRA library (moe_export/runtimes/native) is registered when it is
    built or can be built here; otherwise, or without it, ORT runs the model's function bodies.
    `memory_arena=False` turns off the CPU arena: ORT keeps every buffer it ever freed in its arena (and the memory
    pattern's block beside it), so a session whose runs cast fp16 weights to fp32 per op holds those casts'
    memory until it is released; without the arena each freed buffer goes back to the system.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise RuntimeUnavailableError(f"onnxruntime: optimization {optimization!r}; choose from {OPTIMIZATION_LEVELS}")
    where = str(model) if not isinstance(model, bytes) else f"in-memory model (data in {external_data_dir})"

    def build() -> Any:
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        # Errors come back as exceptions with one-line messages; ORT's own log would print them twice.
        options.log_severity_level = 4
        if not memory_arena:
            options.enable_cpu_mem_arena = False
        if threads is not None:
            options.intra_op_num_threads = threads
        if external_data_dir is not None:
            # A model passed as bytes has no directory: tell ORT where model.onnx.data lives.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_data_dir)
            )
        kernels = register_native_kernels(options) if native_kernels else BODIES_OFF
        source = model if isinstance(model, bytes) else str(model)
        try:
            session = ort.InferenceSession(source, options, providers=resolve_providers(providers))
            session.moe_export_kernels = kernels  # what ran the custom ops, for reports
            return session
        except RuntimeUnavailableError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FormatError(f"{where}: onnxruntime cannot load the model ({first})") from exc

    return build


def register_native_kernels(options: Any) -> str:
    """Register the native kernel library on `options` when there is one; returns what runs the custom ops."""
    from moe_export.runtimes.native import session_library

    library, reason = session_library()
    if library is None:
        return f"function bodies ({reason})"
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # the library's ORT API check (session_library already ran it once), or a dlopen error
        return f"function bodies (registering {library} failed: {str(exc).strip()[:300]})"
    return f"native GroupedLoRA kernels ({library})"


BODIES_OFF = "function bodies (native kernels off)"


def report_kernel_note(note: str) -> str:
    """What reports say ran the custom ops. When the library is unavailable, `session_library` has printed why
    once on stderr; the report then says the bodies ran without printing the reason a second time (the
    session's own `moe_export_kernels` keeps it)."""
    from moe_export.runtimes.native.library import disabled, session_library

    if not note.startswith("function bodies (") or note == BODIES_OFF:
        return note  # (session_library ran for every other note: cached, nothing is built here)
    library, reason = session_library()
    if library is None and reason and not disabled() and note == f"function bodies ({reason})":
        return "function bodies (native kernels unavailable here; `moe-export kernels` says why)"
    return note


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with ONNX Runtime; feeds and outputs are numpy dicts keyed by graph names."""

    name = "onnxruntime"

    def __init__(
        self,
        build_session: Callable[[], Any],
        device: str = "cpu",
        name: str | None = None,
        build_tapped: Callable[[], tuple[Callable[[], Any], TappedModel]] | None = None,
    ) -> None:
        """`build_tapped` gives the session builder of the tapped model (same providers and options) and its taps."""
        super().__init__()
        self._build_session = build_session
        self._build_tapped = build_tapped
        self._tapped: TappedModel | None = None
        self.device = device
        if name:
            self.name = name
        self.session: Any = None
        self.kernel_note = ""  # set when active: native kernels or function bodies ran the custom ops

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        providers: Sequence[str] | None = None,
        native_kernels: bool = True,
        memory_arena: bool = True,
    ) -> OnnxRuntimeRunner:
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: ONNX model not found")
        providers = providers or (("cuda",) if device == "cuda" else ("cpu",))
        build = session_builder(
            path, providers, threads, optimization, native_kernels=native_kernels, memory_arena=memory_arena
        )

        def build_tapped() -> tuple[Callable[[], Any], TappedModel]:
            # The copy holds the graph only: ORT maps the weights from the external data file next to the model.
            tapped = tapped_model(path)
            build = session_builder(
                tapped.model, providers, threads, optimization, path.parent, native_kernels, memory_arena
            )
            return build, tapped

        return cls(build, device=device, build_tapped=build_tapped)

    def request_taps(self) -> bool:
        """The tapped model runs in place of the model, on the same providers with the same options, so outputs and
        taps come from one run (the extra outputs only keep ORT from fusing across the custom ops' boundaries)."""
        if self._build_tapped is None:
            return False
        self.taps_requested = True
        return True

    def _activate(self) -> None:
        if self.taps_requested:
            assert self._build_tapped is not None
            build, self._tapped = self._build_tapped()
            self.session = build()
        else:
            self.session = self._build_session()
        self.kernel_note = report_kernel_note(getattr(self.session, "moe_export_kernels", ""))

    def _deactivate(self) -> None:
        self.session, self._tapped = None, None

    def input_names(self) -> list[str]:
        assert self.session is not None
        return [i.name for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        assert self.session is not None
        return [o.name for o in self.session.get_outputs()]

    def _infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        assert self.session is not None
        wanted = {name: feeds[name] for name in self.input_names()}
        try:
            values = self.session.run(None, wanted)
        except Exception as exc:  # ORT's own exception classes: a model that loads but cannot run
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in wanted.items())
            first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
            raise InternalError(f"{self.name}: inference failed on {shapes}: {first}") from exc
        outputs = dict(zip(self.output_names(), values, strict=True))
        if self._tapped is None:
            return outputs
        self.last_taps = captures_from_outputs(outputs, self._tapped.taps)
        return {name: outputs[name] for name in self._tapped.outputs}


def runner_for_artifact(artifact: Artifact, options: RunnerOptions) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner.from_path(
        artifact.onnx_path,
        device=options.device,
        threads=options.threads,
        optimization=options.optimization,
        memory_arena=options.memory_arena,
    )


def body_runner_for_artifact(artifact: Artifact, options: RunnerOptions) -> OnnxRuntimeRunner:
    """Runtime 'onnxruntime-body': never the native kernels, so validate can check them against the bodies."""
    runner = OnnxRuntimeRunner.from_path(
        artifact.onnx_path,
        options.device,
        options.threads,
        options.optimization,
        native_kernels=False,
        memory_arena=options.memory_arena,
    )
    runner.name = "onnxruntime-body"
    return runner
