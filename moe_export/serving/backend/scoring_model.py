"""Triton python-backend model: the moe-export ONNX file in this folder, run with onnxruntime.

Written by `moe-export triton` as `model.py`; `moe_export_runtime.py` sits next to it. Every graph input is
a request input and every graph output a response output, with the graph's names. With dynamic batching,
requests of the same shape run as one batch. Each request is checked first (ids in the vocabulary, shapes
that agree, the context): a bad one gets a 400 / INVALID_ARGUMENT and never reaches ORT or its batch-mates.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_export_runtime as runtime  # the sibling file, found through the path set above
import triton_python_backend_utils as pb_utils  # provided by the python backend stub


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config, params, self.session = runtime.open_model(args, os.path.dirname(os.path.abspath(__file__)))
        self.inputs = [spec.name for spec in self.session.get_inputs()]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.vocab, self.context = runtime.limits(params)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good, feeds = [], []
        for index, request in enumerate(requests):
            request_feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            try:
                runtime.check_feeds(request_feeds, self.vocab, self.context)
            except runtime.RequestError as exc:
                responses[index] = runtime.error_response(pb_utils, exc)
                continue
            good.append(index)
            feeds.append(request_feeds)
        for index, result in zip(good, runtime.run_grouped(self.session, feeds, self.batched), strict=True):
            if isinstance(result, Exception):
                responses[index] = runtime.error_response(pb_utils, result)
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
