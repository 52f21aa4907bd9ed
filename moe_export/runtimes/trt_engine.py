"""A deserialized TensorRT engine run with torch CUDA buffers (no pycuda) and execute_async_v3.

The execution core of the TensorRT runner (runtimes/tensorrt.py) and of the engine builder's `--plugin auto`
timing (`median_ms`, handed to export/tensorrt.build_engine by its callers). `tensorrt` and `torch.cuda` are
touched inside functions only, so this module imports on any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, InternalError, MoeExportError
from moe_export.export.trt_engine import check_bindings, import_tensorrt, require_cuda


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise InternalError(f"tensorrt: engine I/O dtype {dtype} is not supported by the runner")
    return table[dtype]


class EngineSession:
    """A deserialized engine + execution context with torch CUDA I/O buffers; one profile (index 0)."""

    def __init__(self, engine_bytes: bytes, source: str = "engine") -> None:
        import torch

        self.trt = import_tensorrt()
        require_cuda()
        self.source = source
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise FormatError(
                f"{source}: TensorRT could not deserialize the engine (built by another TensorRT version or GPU?); "
                "rebuild it with `moe-export trt`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._buffers: dict[str, Any] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> EngineSession:
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: engine file not found; build one with `moe-export trt ONNX_DIR`")
        return cls(path.read_bytes(), str(path))

    def profile_range(self, name: str) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def bind(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy feeds to the GPU (cast to the engine's dtypes), set shapes, allocate the outputs."""
        import torch

        check_bindings(self.source, self.inputs, feeds, self.profile_range)
        # Copies and allocations on the execution stream, so execute_async_v3 is ordered after them.
        with torch.cuda.stream(self.stream):
            self._bind_on_stream(feeds)

    def _bind_on_stream(self, feeds: dict[str, np.ndarray]) -> None:
        import torch

        for name in self.inputs:
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                lo, _, hi = self.profile_range(name)
                raise MoeExportError(
                    f"{self.source}: input {name} shape {tuple(tensor.shape)} is outside the engine's profile "
                    f"[{lo} .. {hi}]; rebuild with `moe-export trt --min-shapes/--max-shapes`"
                )
            self._buffers[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            tensor = torch.empty(shape, dtype=dtype, device="cuda")
            self._buffers[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise InternalError(f"{self.source}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def fetch(self) -> dict[str, np.ndarray]:
        import torch

        self.stream.synchronize()
        result = {}
        for name in self.outputs:
            tensor = self._buffers[name]
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                tensor = tensor.float()
            result[name] = tensor.cpu().numpy()
        return result

    def time_execute(self, feeds: dict[str, np.ndarray], warmup: int = 10, iterations: int = 50) -> list[float]:
        """Seconds per execute (CUDA events, device time only, buffers bound once)."""
        import torch

        self.bind(feeds)
        for _ in range(warmup):
            self.execute()
        self.stream.synchronize()
        times = []
        with torch.cuda.stream(self.stream):
            for _ in range(iterations):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                self.execute()
                end.record(self.stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
        return times


def median_ms(engine: bytes, feeds: dict[str, np.ndarray]) -> float:
    """Median latency of one serialized engine on `feeds`, in milliseconds (10 warm-up runs, 30 timed)."""
    times = EngineSession(engine, "candidate engine").time_execute(feeds, warmup=10, iterations=30)
    return float(np.median(times) * 1e3)
