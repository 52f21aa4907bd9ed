"""The KV-cache decoder graph: the I/O contract that onnxruntime-genai and optimum's ORTModelForCausalLM run.

Inputs `input_ids` [B,S], `attention_mask` [B,past+S], `position_ids` [B,S] (int64) and, per layer i,
`past_key_values.{i}.key` / `.value` [B, kv_heads, past, head_dim]; outputs `logits` [B,S,V] and
`present.{i}.key` / `.value` [B, kv_heads, past+S, head_dim]. Keys and values interleave layer by layer on
both sides: optimum pairs them by position, so any other order generates wrong tokens without an error.
kv_heads and head_dim are static (genai reads them from the graph), batch / sequence / past symbolic;
past = 0 is the first step. Every routed unit still routes each token it sees, so a decode step routes
exactly the new token through the same single GroupedLoRA node per unit as the scoring graph.
Sliding-window bases (Mistral's `sliding_window`, Qwen2's `use_sliding_window` from `max_window_layers` on) keep
the whole past too: the window is a mask in the graph, so clients need no window setting (client_files.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from moe_export.errors import ExportError

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Example sizes >= 2 on every dynamic dim (torch.export specialises a dim whose example is 1); the past
# length 0 of a first step is then a valid value of the symbolic dim, checked by the tests.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 3, 4
TOTAL_DIM = "total_sequence"


@dataclass(frozen=True)
class KVLayout:
    """The static part of the cache shape, from the model config."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> KVLayout:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", None) or heads), head_dim)

    def past_names(self) -> list[str]:
        return [name.format(i) for i in range(self.num_layers) for name in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [name.format(i) for i in range(self.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]

    def input_names(self) -> list[str]:
        return [*TOKEN_INPUTS, *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]


class DecoderWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past pairs) -> (logits, present pairs), via a DynamicCache."""

    def __init__(self, model: torch.nn.Module, layout: KVLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # Full layers, never the config's sliding-window layers: those keep only the last window-1 positions, so
        # `present` would be bounded by the window (torch.export then guards past <= window-1 and fails). With
        # full layers the whole past comes in and goes out, and transformers' sliding-window mask (kv position >
        # query position - window, per layer type) masks what lies beyond the window: the same attention.
        cache = DynamicCache()
        for i in range(self.layout.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument(self.model): cache},
        )
        present = [t for layer in returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.2x names the forward's cache `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def trace_decoder(model: torch.nn.Module, opset: int, translations: dict[Any, Any]) -> Any:
    """torch.onnx.export of the decoder with past; returns the ONNXProgram (dims renamed, see module doc)."""
    layout = KVLayout.from_config(model.config)
    dtype = model.get_input_embeddings().weight.dtype  # routers stay fp32 in a fp16 export: not them
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    positions = torch.arange(p, p + s).expand(b, s).contiguous()
    shape = (b, layout.kv_heads, p, layout.head_dim)
    past = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * layout.num_layers)]
    dim = torch.export.Dim
    batch, sequence, past_len = dim("batch"), dim("sequence"), dim("past_sequence")
    dynamic = {
        "input_ids": {0: batch, 1: sequence},
        # past + sequence cannot be written as a derived Dim of one root: torch.export infers the relation.
        "attention_mask": {0: batch, 1: dim.DYNAMIC},
        "position_ids": {0: batch, 1: sequence},
        "past": [{0: batch, 2: past_len} for _ in range(2 * layout.num_layers)],
    }
    with torch.no_grad():
        program = torch.onnx.export(
            DecoderWithPast(model, layout).eval(),
            (ids, mask, positions, past),
            dynamo=True,
            opset_version=opset,
            input_names=layout.input_names(),
            output_names=layout.output_names(),
            dynamic_shapes=dynamic,
            custom_translation_table=translations,
            optimize=True,
            verbose=False,
        )
    _check_and_rename_dims(program.model, layout)
    return program


def _check_and_rename_dims(model: Any, layout: KVLayout) -> None:
    """Names fixed by the contract: the mask's and the presents' length is `total_sequence`."""
    import onnx_ir

    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    if inputs != layout.input_names() or outputs != layout.output_names():
        raise ExportError(f"decoder export: graph I/O {inputs} -> {outputs} does not follow the KV-cache contract")
    total = onnx_ir.SymbolicDim(TOTAL_DIM)
    mask = model.graph.inputs[1]
    mask.shape = onnx_ir.Shape([mask.shape[0], total])
    for value in model.graph.outputs[1:]:
        dims = list(value.shape.dims)
        if len(dims) != 4 or dims[1] != layout.kv_heads or dims[3] != layout.head_dim:
            raise ExportError(f"decoder export: {value.name} has shape {dims}, expected static kv_heads/head_dim")
        value.shape = onnx_ir.Shape([dims[0], dims[1], total, dims[3]])
