"""Triton python-backend model: the moe-export ONNX file in this folder, run with onnxruntime.

Written by `moe-export triton` as `model.py`; `moe_export_runtime.py` sits next to it. Every graph input is
a request input and every graph output a response output, with the graph's names. With dynamic batching,
requests of the same shape run as one batch.
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
        config, _params, self.session = runtime.open_model(args, os.path.dirname(os.path.abspath(__file__)))
        self.inputs = [spec.name for spec in self.session.get_inputs()]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = []
        for request in requests:
            feeds.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs})
        responses = []
        for result in runtime.run_grouped(self.session, feeds, self.batched):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
