"""Runtime lookup: a name ('torch', 'onnxruntime', 'tensorrt') -> a factory that builds a Runner for an artifact.

Factories are referenced as 'module:function' strings so that naming a runtime imports its backend
only when it is used (`tensorrt` must never be imported by `import moe_export.runtimes`).
A factory has the signature `factory(artifact: Artifact, options: RunnerOptions) -> Runner`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from moe_export.errors import MoeExportError
from moe_export.export.manifest import Artifact
from moe_export.runtimes.base import Runner


@dataclass
class RunnerOptions:
    """How to run: device, threads, optimisation; each runtime uses the fields it understands."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    threads: int | None = field(default=None, metadata={"help": "intra-op threads (None: the runtime's default)"})
    optimization: str = field(default="all", metadata={"help": "ORT graph optimisation: disable|basic|extended|all"})
    torch_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the torch model (None: the export's); validation uses fp32"}
    )
    memory_arena: bool = field(
        default=True, metadata={"help": "ORT CPU memory arena (validation turns it off: freed buffers are returned)"}
    )

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise MoeExportError(f"device {self.device!r}: expected cpu or cuda")
        if self.threads is not None and self.threads < 1:
            raise MoeExportError(f"threads {self.threads}: expected a positive integer")


RunnerFactory = Callable[[Artifact, RunnerOptions], Runner]

_FACTORIES: dict[str, str | RunnerFactory] = {
    "torch": "moe_export.runtimes.torch_runner:runner_for_artifact",
    "onnxruntime": "moe_export.runtimes.onnxruntime:runner_for_artifact",
    "onnxruntime-body": "moe_export.runtimes.onnxruntime:body_runner_for_artifact",
    "tensorrt": "moe_export.runtimes.tensorrt:runner_for_artifact",
}


def register_runtime(name: str, factory: str | RunnerFactory) -> None:
    """Add or replace a runtime ('module:function' or a callable)."""
    _FACTORIES[name] = factory


def get_factory(name: str) -> RunnerFactory:
    if name not in _FACTORIES:
        raise MoeExportError(f"unknown runtime {name!r}; choose from {', '.join(_FACTORIES)}")
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            from moe_export.errors import RuntimeUnavailableError

            raise RuntimeUnavailableError(f"runtime {name!r} is not available: {exc}") from exc
        factory = getattr(module, attr)
    return factory


def make_runner(name: str, artifact: Artifact, options: RunnerOptions | None = None) -> Runner:
    """The Runner for `artifact` on runtime `name` (not yet activated)."""
    return get_factory(name)(artifact, options or RunnerOptions())
