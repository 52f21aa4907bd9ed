"""config.pbtxt for each model of the repository: I/O names, Triton dtypes and dims from the ONNX graph.

The graph is the truth (it is what the backend loads); export.json must agree with it, else the export
was edited or damaged and nothing is written. With max_batch_size > 0 Triton owns the first dim, so every
input and output must have a dynamic first dim, and dims exclude it; with 0, dims are the full shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_export.errors import FormatError
from moe_export.export.interface import INPUT_IDS, TensorSpec, read_onnx_io
from moe_export.export.manifest import Artifact
from moe_export.export.tensorrt import ENGINE_INFO_NAME, ENGINE_NAME
from moe_export.serving.pbtxt import Enum, Message, parameters

NUMPY_TO_TRITON = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
}


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output: name, numpy-style element type (float32, int64, ...), dims (None: dynamic)."""

    name: str
    elem_type: str
    dims: tuple[int | None, ...]

    @property
    def triton_type(self) -> str:
        if self.elem_type not in NUMPY_TO_TRITON:
            raise FormatError(f"graph tensor {self.name}: element type {self.elem_type} has no Triton equivalent")
        return NUMPY_TO_TRITON[self.elem_type]

    def triton_dims(self, batched: bool) -> list[int]:
        dims = self.dims[1:] if batched else self.dims
        return [-1 if d is None else d for d in dims]


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def first_dims_dynamic(self) -> bool:
        return all(t.dims and t.dims[0] is None for t in (*self.inputs, *self.outputs))


def graph_io(artifact: Artifact) -> GraphIO:
    """The ONNX graph's inputs/outputs (export/interface.py's reader), checked against export.json's interface."""
    inputs, outputs = read_onnx_io(artifact.onnx_path)
    artifact.interface.with_graph(inputs, outputs, where=f"{artifact.path / 'export.json'} vs {artifact.onnx_path}")
    return GraphIO(tuple(_tensor(t) for t in inputs), tuple(_tensor(t) for t in outputs))


def _tensor(spec: TensorSpec) -> GraphTensor:
    return GraphTensor(spec.name, spec.dtype, tuple(d if isinstance(d, int) else None for d in spec.shape))


def tensor_entries(tensors: tuple[GraphTensor, ...], batched: bool) -> list[Message]:
    return [
        [("name", t.name), ("data_type", Enum(t.triton_type)), *[("dims", d) for d in t.triton_dims(batched)]]
        for t in tensors
    ]


def instance_group(count: int, device: str) -> Message:
    return [("count", count), ("kind", Enum("KIND_GPU" if device == "gpu" else "KIND_CPU"))]


def onnx_model_config(
    name: str, io: GraphIO, *, backend: str, max_batch_size: int, instances: int, device: str,
    params: dict[str, str], model_file: str, op_library: str | None = None,
) -> Message:  # fmt: skip
    """The export's graph as a Triton model: onnxruntime backend, or python backend running ORT itself."""
    batched = max_batch_size > 0
    config: Message = [("name", name)]
    if backend == "onnxruntime":
        config.append(("platform", "onnxruntime_onnx"))
        if model_file != "model.onnx":
            config.append(("default_model_filename", model_file))
    else:
        config.append(("backend", "python"))
    config.append(("max_batch_size", max_batch_size))
    config += [("input", entry) for entry in tensor_entries(io.inputs, batched)]
    config += [("output", entry) for entry in tensor_entries(io.outputs, batched)]
    config.append(("instance_group", instance_group(instances, device)))
    if batched:
        # Triton batches only requests whose non-batch dims agree (same sequence length here).
        config.append(("dynamic_batching", [("max_queue_delay_microseconds", 100)]))
    if backend == "onnxruntime" and op_library:
        config.append(("model_operations", [("op_library_filename", op_library)]))
    config += parameters(params)
    return config


def generate_model_config(name: str, instances: int, device: str, params: dict[str, str]) -> Message:
    """Greedy generation driven inside the model: one prompt in, its new tokens out (no Triton batching)."""
    ids: Message = [("name", INPUT_IDS), ("data_type", Enum("TYPE_INT64")), ("dims", -1)]
    new: Message = [("name", "max_new_tokens"), ("data_type", Enum("TYPE_INT32")), ("dims", 1), ("optional", True)]
    out: Message = [("name", "output_ids"), ("data_type", Enum("TYPE_INT64")), ("dims", -1)]
    return [
        ("name", name),
        ("backend", "python"),
        ("max_batch_size", 0),
        ("input", ids),
        ("input", new),
        ("output", out),
        ("instance_group", instance_group(instances, device)),
        *parameters(params),
    ]


def tensorrt_model_config(name: str, io: GraphIO, instances: int) -> Message:
    """The engine from `moe-export trt`: explicit batch (max_batch_size 0), dims as the ONNX graph's."""
    return [
        ("name", name),
        ("platform", "tensorrt_plan"),
        ("default_model_filename", "model.plan"),
        ("max_batch_size", 0),
        *[("input", entry) for entry in tensor_entries(io.inputs, False)],
        *[("output", entry) for entry in tensor_entries(io.outputs, False)],
        ("instance_group", instance_group(instances, "gpu")),
    ]


def engine_path(artifact: Artifact) -> Path | None:
    """model.engine of `moe-export trt` in the export dir, when both it and engine.json are there."""
    engine, info = artifact.path / ENGINE_NAME, artifact.path / ENGINE_INFO_NAME
    return engine if engine.is_file() and info.is_file() else None
