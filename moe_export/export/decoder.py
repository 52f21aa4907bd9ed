"""The KV-cache decoder graph: the I/O contract that onnxruntime-genai and optimum's ORTModelForCausalLM run.

The names, dims and past-KV layout are the decoder `GraphInterface` (export/interface.py); this module
traces a transformers causal LM into it. Every routed unit still routes each token it sees, so a decode step
routes exactly the new token through the same single GroupedLoRA node per unit as the scoring graph.
Sliding-window bases (Mistral's `sliding_window`, Qwen2's `use_sliding_window` from `max_window_layers` on) keep
the whole past too: the window is a mask in the graph, so clients need no window setting (client_files.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from moe_export.errors import ExportError
from moe_export.export.decoder_fused import FusedDecoderWithPast
from moe_export.export.interface import TOTAL_SEQUENCE, GraphInterface, KVLayout
from moe_export.export.options import FUSION_CONTRIB, FUSION_NONE
from moe_export.export.packing import PackPlan, packed_projections


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


def trace_decoder(
    model: torch.nn.Module,
    interface: GraphInterface,
    opset: int,
    translations: dict[Any, Any],
    fusion: str = FUSION_NONE,
    packed: PackPlan | None = None,
) -> Any:
    """torch.onnx.export of the decoder with past; returns the ONNXProgram (dims renamed to the interface's).

    `fusion="contrib"`: attention, rotary and residual norms as com.microsoft ops (export/decoder_fused.py), and
    the projections `packed` names as one MatMul per pack (export/packing.py)."""
    assert interface.past is not None
    layout = interface.past
    feeds = interface.example_feeds(int(model.config.vocab_size))
    args = [torch.from_numpy(feeds[name]) for name in interface.token_input_names()]
    dtype = model.get_input_embeddings().weight.dtype  # routers stay fp32 in a fp16 export: not them
    # via fp32: torch cannot read numpy's (ml_dtypes') bfloat16
    past = [torch.from_numpy(feeds[name].astype("float32")).to(dtype) for name in interface.past_names()]
    wrapper = FusedDecoderWithPast(model, layout) if fusion == FUSION_CONTRIB else DecoderWithPast(model, layout)
    with torch.no_grad(), packed_projections(model, packed if fusion == FUSION_CONTRIB and packed else {}):
        program = torch.onnx.export(
            wrapper.eval(),
            (*args, past),
            dynamo=True,
            opset_version=opset,
            input_names=interface.input_names(),
            output_names=interface.output_names(),
            dynamic_shapes=interface.dynamic_shapes(),
            custom_translation_table=translations,
            optimize=True,
            verbose=False,
        )
    _check_and_rename_dims(program.model, interface)
    return program


def _check_and_rename_dims(model: Any, interface: GraphInterface) -> None:
    """Names fixed by the interface: the mask's and the presents' length is `total_sequence`."""
    import onnx_ir

    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    if inputs != interface.input_names() or outputs != interface.output_names():
        raise ExportError(f"decoder export: graph I/O {inputs} -> {outputs} does not follow the KV-cache contract")
    assert interface.past is not None
    layout = interface.past
    total = onnx_ir.SymbolicDim(TOTAL_SEQUENCE)
    mask = model.graph.inputs[1]
    mask.shape = onnx_ir.Shape([mask.shape[0], total])
    for value in model.graph.outputs[1:]:
        dims = list(value.shape.dims)
        if len(dims) != 4 or dims[1] != layout.kv_heads or dims[3] != layout.head_dim:
            raise ExportError(f"decoder export: {value.name} has shape {dims}, expected static kv_heads/head_dim")
        value.shape = onnx_ir.Shape([dims[0], dims[1], total, dims[3]])
