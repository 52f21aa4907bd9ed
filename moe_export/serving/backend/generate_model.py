"""Triton python-backend model: greedy generation with the moe-export KV-cache decoder in this folder.

Written by `moe-export triton` as `model.py`. Request: `input_ids` (INT64, one prompt) and optionally
`max_new_tokens` (INT32, one value); response: `output_ids` (INT64, the new tokens, up to and including an
EOS). The decoding loop (moe_export_runtime.greedy) feeds the decoder its own present as the next past.
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
        config, params, self.session = runtime.open_model(args, os.path.dirname(os.path.abspath(__file__)))
        # The prompt tensor's name as config.pbtxt declares it (serving/model_config.py, from the graph interface).
        self.prompt_input = config["input"][0]["name"]
        self.eos = [int(t) for t in params.get("eos_token_ids", "").split(",") if t.strip()]
        self.vocab = int(params["vocab_size"])
        self.limit = int(params.get("max_new_tokens_limit", "512"))
        self.default_new = int(params.get("default_max_new_tokens", "32"))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        prompt = pb_utils.get_input_tensor_by_name(request, self.prompt_input).as_numpy().reshape(-1)
        wanted = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        new = int(wanted.as_numpy().reshape(-1)[0]) if wanted is not None else self.default_new
        problem = None
        if prompt.size == 0:
            problem = f"{self.prompt_input}: empty prompt"
        elif prompt.min() < 0 or prompt.max() >= self.vocab:
            problem = f"{self.prompt_input}: token ids must be in [0, {self.vocab})"
        elif not 1 <= new <= self.limit:
            problem = f"max_new_tokens {new}: expected 1..{self.limit}"
        if problem is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
        try:
            tokens = runtime.greedy(self.session, prompt.tolist(), new, self.eos)
        except Exception as exc:  # ORT raises its own exception types; the request gets the message
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output_ids", np.asarray(tokens, np.int64))])
