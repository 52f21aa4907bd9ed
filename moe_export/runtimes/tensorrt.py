"""The TensorRT runner: a serialized engine run with torch CUDA buffers (no pycuda) and execute_async_v3.

    with TensorRTRunner("out/onnx/model.engine") as runner:
        outputs = runner.infer({"input_ids": ids, "attention_mask": mask})

`tensorrt` is imported inside functions of export/ and runtimes/trt_engine.py only, never by `import moe_export`.
Engines built with the AOT plugin carry their kernels, so running one needs no Python plugin code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, MoeExportError
from moe_export.export.tensorrt import ENGINE_NAME
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.trt_engine import EngineSession


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine on the GPU; the engine is deserialized in `activate()`."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | Path) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.session: EngineSession | None = None

    def _activate(self) -> None:
        self.session = EngineSession.from_file(self.engine_path)

    def _deactivate(self) -> None:
        self.session = None

    def input_names(self) -> Sequence[str] | None:
        return self.session.inputs if self.session else None

    def _infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        assert self.session is not None
        self.session.bind(feeds)
        self.session.execute()
        return self.session.fetch()

    def time_execute(self, feeds: Feeds, warmup: int = 10, iterations: int = 50) -> list[float]:
        """Device time per run in seconds, without host<->device copies (for benchmarks)."""
        if self.session is None:
            raise MoeExportError(f"{self.name}: call activate() (or use `with`) before time_execute()")
        start = time.perf_counter()
        times = self.session.time_execute(feeds, warmup, iterations)
        self._last_time = time.perf_counter() - start
        return times


def runner_for_artifact(artifact: Any, options: Any) -> TensorRTRunner:
    """Registry factory (runtimes/registry.py): the engine `moe-export trt` wrote into the artifact dir.

    TensorRT always runs on the GPU, so `options.device` (meant for the CPU-capable runtimes) is ignored.
    """
    engine = Path(artifact.path) / ENGINE_NAME
    if not engine.is_file():
        raise FormatError(
            f"{engine}: no TensorRT engine in {artifact.path}; run `moe-export trt {artifact.path}` first"
        )
    return TensorRTRunner(engine)
