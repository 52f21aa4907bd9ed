"""Triton python-backend model: greedy generation with the moe-export KV-cache decoder in this folder.

Written by `moe-export triton` as `model.py`. Request: `input_ids` (INT64, one prompt) and optionally
`max_new_tokens` (INT32, one value); response: `output_ids` (INT64, the new tokens, up to and including an
EOS). The decoding loop (moe_export_runtime.greedy) feeds the decoder its own present as the next past.
Prompt ids outside the vocabulary, or a prompt plus new tokens longer than the context, are refused as the
client's error (400 / INVALID_ARGUMENT) before anything runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_export_runtime as runtime  # the sibling file, found through the path set above
import triton_python_backend_utils as pb_utils  # provided by the python backend stub


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        _config, params, self.session = runtime.open_model(args, os.path.dirname(os.path.abspath(__file__)))
        self.eos = [int(t) for t in params.get("eos_token_ids", "").split(",") if t.strip()]
        self.vocab, self.context = runtime.limits(params)
        self.limit = int(params.get("max_new_tokens_limit", "512"))
        self.default_new = int(params.get("default_max_new_tokens", "32"))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        prompt = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        wanted = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        if wanted is not None:
            new = int(wanted.as_numpy().reshape(-1)[0])
        else:  # the default never asks for more than the context has room for
            new = max(1, min(self.default_new, self.context - prompt.size)) if self.context else self.default_new
        try:
            runtime.check_generation(prompt, new, self.vocab, self.context, self.limit)
            tokens = runtime.greedy(self.session, prompt.tolist(), new, self.eos)
        except Exception as exc:  # a RequestError is the client's; ORT raises its own types (the server's)
            return runtime.error_response(pb_utils, exc)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output_ids", np.asarray(tokens, np.int64))])
