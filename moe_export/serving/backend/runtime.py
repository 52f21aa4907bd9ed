"""onnxruntime inside Triton's python backend: the session, batching of same-shape requests, greedy decoding.

Copied into the model repository as `moe_export_runtime.py` by `moe-export triton`; imports numpy and
onnxruntime only, so it cannot ask moe_export's graph interface (export/interface.py) for names: the request
checks spell them (tests/test_interface.py exempts this folder for that reason; tests/test_triton.py runs these
files on real exports, so a drift fails there), and the greedy loop takes the decoder's roles from positions,
which that interface fixes: inputs token ids, attention mask, position ids, then the past pairs; outputs the
logits, then the presents in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

TOKEN_INPUTS = 3  # ids, mask, positions; the past follows
PAST_PREFIX = "past_key_values."  # the request checks name what they check (the interface's pattern)
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


class RequestError(ValueError):
    """The request itself is wrong (ids out of the vocabulary, inconsistent shapes, longer than the context):
    answered as a client error (400 / INVALID_ARGUMENT), never run."""


def check_feeds(feeds: dict[str, np.ndarray], vocab: int, context: int) -> None:
    """A scoring or decoder-step request, checked before ORT sees it.

    ORT's Gather wraps a negative id to the end of the vocabulary and answers with wrong logits, and beyond
    the context the rotary positions leave what the model was trained on; shapes that disagree would fail
    inside ORT as a server error. `context` 0: no context limit known.
    """
    ids = feeds.get("input_ids")
    if ids is None or ids.ndim != 2 or ids.shape[1] == 0:
        raise RequestError("input_ids: expected a [batch, sequence] tensor with at least one token")
    batch, length = ids.shape
    check_ids(ids, vocab, "input_ids")
    pasts = {name: value for name, value in feeds.items() if name.startswith(PAST_PREFIX)}
    if any(value.ndim != 4 for value in pasts.values()) or len({v.shape[2] for v in pasts.values()}) > 1:
        raise RequestError(f"{PAST_PREFIX}*: every past tensor must be [batch, heads, past, head_dim], one past")
    past = next(iter(pasts.values())).shape[2] if pasts else 0
    expected = {"attention_mask": (batch, past + length), "position_ids": (batch, length)}
    expected.update({name: (batch, *value.shape[1:]) for name, value in pasts.items()})
    for name, shape in expected.items():
        if name in feeds and tuple(feeds[name].shape) != shape:
            raise RequestError(
                f"{name}: shape {list(feeds[name].shape)}, expected {list(shape)} "
                f"(input_ids {list(ids.shape)}, past length {past})"
            )
    if context and past + length > context:
        what = f"{past} past + {length} new tokens" if pasts else f"{length} tokens"
        raise RequestError(f"{what} exceed the model's context of {context} tokens")
    positions = feeds.get("position_ids")
    if context and positions is not None and (positions.min() < 0 or positions.max() >= context):
        raise RequestError(f"position_ids: must be in [0, {context}) (the model's context)")


def check_ids(ids: np.ndarray, vocab: int, name: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise RequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")


def check_generation(prompt: np.ndarray, new: int, vocab: int, context: int, limit: int) -> None:
    """A `_generate` request: a prompt of known ids, 1..limit new tokens, both together within the context."""
    if prompt.size == 0:
        raise RequestError("input_ids: empty prompt")
    check_ids(prompt, vocab, "input_ids")
    if not 1 <= new <= limit:
        raise RequestError(f"max_new_tokens {new}: expected 1..{limit}")
    if context and prompt.size + new > context:
        raise RequestError(
            f"a {prompt.size}-token prompt plus {new} new tokens exceed the model's context of {context} tokens"
        )


def run_grouped(session: Any, requests: Sequence[dict[str, np.ndarray]], batched: bool) -> list[Any]:
    """Outputs (name -> array) per request; same-shape requests of a batching model run as one batch.

    A request whose run fails gets the exception in its place, and one bad request fails alone: when a
    merged batch fails, its requests run again one by one.
    """
    outputs = [o.name for o in session.get_outputs()]
    results: list[Any] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, feeds in enumerate(requests):
        key = tuple(sorted((name, value.shape[1:], value.dtype.str) for name, value in feeds.items()))
        groups.setdefault(key if batched else (index,), []).append(index)
    for members in groups.values():
        merged = _run_merged(session, outputs, [requests[i] for i in members]) if len(members) > 1 else None
        if merged is not None:
            for i, result in zip(members, merged, strict=True):
                results[i] = result
            continue
        for i in members:
            try:
                results[i] = dict(zip(outputs, session.run(outputs, requests[i]), strict=True))
            except Exception as exc:  # ORT raises its own exception types; the request gets the message
                results[i] = exc
    return results


def _run_merged(session: Any, outputs: list[str], group: list[dict[str, np.ndarray]]) -> list[Any] | None:
    """Same-shape requests as one batch, split back per request; None when the batch fails (some member is
    bad, and the caller runs each alone to find it)."""
    sizes = [len(next(iter(feeds.values()))) for feeds in group]
    merged = {name: np.concatenate([feeds[name] for feeds in group]) for name in group[0]}
    try:
        values = session.run(outputs, merged)
    except Exception:  # ORT raises its own exception types
        return None
    bounds = np.cumsum([0, *sizes])
    return [
        {name: v[bounds[n] : bounds[n + 1]] for name, v in zip(outputs, values, strict=True)} for n in range(len(group))
    ]


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


def error_response(pb_utils: Any, exc: Exception) -> Any:
    """A failed request's response: the client's fault (RequestError) as 400 / INVALID_ARGUMENT, like
    Triton's own input checks; anything else as the server's, 500 / INTERNAL."""
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, RequestError) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code))


def limits(params: dict[str, str]) -> tuple[int, int]:
    """(vocabulary size, context length) from the model config's parameters; context 0: not known."""
    return int(params["vocab_size"]), int(params.get("context_length", "0") or 0)


def string_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The model config's `parameters` as plain strings (Triton hands them over as {key: {string_value}})."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
