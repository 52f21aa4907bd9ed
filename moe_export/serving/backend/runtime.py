"""onnxruntime inside Triton's python backend: the session, batching of same-shape requests, greedy decoding.

Copied into the model repository as `moe_export_runtime.py` by `moe-export triton`; imports numpy and
onnxruntime only, so it cannot ask moe_export's graph interface (export/interface.py) for names. The greedy
loop takes the decoder's roles from positions instead, which that interface fixes: inputs token ids,
attention mask, position ids, then the past pairs; outputs the logits, then the presents in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

TOKEN_INPUTS = 3  # ids, mask, positions; the past follows
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def make_session(onnx_path: str, params: dict[str, str], instance_kind: str = "CPU") -> Any:
    """An ORT session as the model config's parameters ask: threads, and the native kernel library if shipped."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
    options.inter_op_num_threads = int(params.get("inter_op_thread_count", "1"))
    library = params.get("custom_ops_library", "")
    if library and os.path.isfile(os.path.join(os.path.dirname(onnx_path), library)):
        # Without the library ORT runs the op's function bodies: same results, slower on CPU.
        options.register_custom_ops_library(os.path.join(os.path.dirname(onnx_path), library))
    providers = ["CPUExecutionProvider"]
    if instance_kind.upper().endswith("GPU") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(onnx_path, options, providers=providers)


def open_model(args: dict[str, Any], folder: str) -> tuple[dict[str, Any], dict[str, str], Any]:
    """Triton's `initialize` args -> (model config, its string parameters, the ORT session of the ONNX file in
    `folder`); what every python-backend model.py here starts with."""
    config = json.loads(args["model_config"])
    params = string_parameters(config)
    onnx_path = os.path.join(folder, params.get("onnx_file", "model.onnx"))
    return config, params, make_session(onnx_path, params, args.get("model_instance_kind", "CPU"))


def run_grouped(session: Any, requests: Sequence[dict[str, np.ndarray]], batched: bool) -> list[Any]:
    """Outputs (name -> array) per request; same-shape requests of a batching model run as one batch.

    A request whose run fails gets the exception in its place, so one bad request fails alone.
    """
    outputs = [o.name for o in session.get_outputs()]
    results: list[Any] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, feeds in enumerate(requests):
        key = tuple(sorted((name, value.shape[1:], value.dtype.str) for name, value in feeds.items()))
        groups.setdefault(key if batched else (index,), []).append(index)
    for members in groups.values():
        try:
            if len(members) == 1:
                values = session.run(outputs, requests[members[0]])
                results[members[0]] = dict(zip(outputs, values, strict=True))
                continue
            sizes = [len(next(iter(requests[i].values()))) for i in members]
            merged = {name: np.concatenate([requests[i][name] for i in members]) for name in requests[members[0]]}
            values = session.run(outputs, merged)
            bounds = np.cumsum([0, *sizes])
            for n, i in enumerate(members):
                results[i] = {name: v[bounds[n] : bounds[n + 1]] for name, v in zip(outputs, values, strict=True)}
        except Exception as exc:  # ORT raises its own exception types; the request gets the message
            for i in members:
                results[i] = exc
    return results


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past key/values ([batch, kv_heads, 0, head_dim]; heads and head_dim are static dims)."""
    feeds = {}
    for spec in session.get_inputs()[TOKEN_INPUTS:]:
        heads, head_dim = int(spec.shape[1]), int(spec.shape[3])
        dtype = ORT_TO_NUMPY.get(spec.type)
        if dtype is None:
            raise ValueError(f"{spec.name}: element type {spec.type} is not supported by this model.py")
        feeds[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return feeds


def greedy(session: Any, prompt: Sequence[int], max_new_tokens: int, eos: Iterable[int] = ()) -> list[int]:
    """Greedy tokens after `prompt` (one row), through the decoder's own past/present; stops after an EOS."""
    inputs = [spec.name for spec in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    ids, mask, positions = inputs[:TOKEN_INPUTS]
    pairs = list(zip(inputs[TOKEN_INPUTS:], outputs[1:], strict=True))  # (past, present) by position
    stop = set(eos)
    length = len(prompt)
    feeds: dict[str, np.ndarray] = {
        ids: np.asarray([prompt], dtype=np.int64),
        mask: np.ones((1, length), dtype=np.int64),
        positions: np.arange(length, dtype=np.int64)[None],
        **empty_past(session, 1),
    }
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        step = session.run(outputs, feeds)
        token = int(np.argmax(step[0][0, -1]))  # the logits come first
        tokens.append(token)
        if token in stop:
            break
        length += 1
        feeds = {
            ids: np.asarray([[token]], dtype=np.int64),
            mask: np.ones((1, length), dtype=np.int64),
            positions: np.asarray([[length - 1]], dtype=np.int64),
        }
        feeds.update({past: value for (past, _), value in zip(pairs, step[1:], strict=True)})
    return tokens


def string_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The model config's `parameters` as plain strings (Triton hands them over as {key: {string_value}})."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
