"""The KV-cache decoder written with ONNX Runtime's `com.microsoft` contrib ops, as onnxruntime-genai's builder does
(`--fusion contrib`, opt-in: the standard-op decoder stays the default because TensorRT cannot build this graph,
see export/options.py DEFAULT_FUSION).

The plain decoder (export/decoder.py) traces transformers' attention: rotary, KV concat, head repeat, the 4-D
mask and the softmax come out as ~50 small standard ops per layer, which dominate a CPU decode step once the
MatMuls are int4. Here the same model is traced through an explicit forward that emits, per layer:
- one `GroupQueryAttention`: rotary on q and k, KV concat into present (BNSH, the interface's past layout), GQA head
  sharing, causal masking and softmax, with `seqlens_k` / `total_sequence_length` derived from `attention_mask` as
  the builder does. Rotary reads cos/sin caches precomputed from the model's own rotary module (any static rope
  type: default, linear, llama3, yarn...). The op rotates inside (`do_rotary`, as the builder's graph does) when
  the head size is a multiple of 16, the only sizes ORT's kernel rotates; it takes a new token's position from its
  row's attended count, which is what `position_ids` holds for every mask this graph is exact for (below). Other
  head sizes get a `RotaryEmbedding` on q and k, fed the graph's `position_ids`;
- `SkipSimplifiedLayerNormalization` for each residual add + RMSNorm (the first layer's input norm stays in
  standard ops, which ORT fuses itself: export/base_fusions.py).
- one MatMul for q, k and v (the base weights packed after every fold and merge, export/packing.py); each routed
  projection adds its own delta to its slice.
The projections are the model's own modules, so every `moe_export::GroupedLoRA` node, its function body, its
router chain and its unit name come out exactly as in the plain decoder; the graph interface is unchanged.

GroupQueryAttention reads only each row's attended-token count from the mask, and keeps a row's cache
compacted (a new token lands right after the row's real tokens). That is exact for unpadded rows, for right
padding (what onnxruntime-genai and our validate feed) and, with the graph rotating a left-padded row's tokens
so its real ones come first (and its hidden states back before lm_head), for left padding (optimum's batches). A mask with holes
inside one call, or a batch of several multi-token rows after a past (ORT refuses that: "batch_size must be 1
when sequence_length > 1 and past context is given"), needs `fusion="none"`. `fusion_blocker` says when a model cannot take this graph:
sliding-window bases (Mistral, Qwen2 with use_sliding_window) keep the plain decoder, because GQA's
`local_window_size` windows a row's attended tokens while transformers windows cache columns, pads included,
so a right-padded batch's padded rows differ past the window (an unpadded row matches to 1e-6: measured).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_export.export.interface import KVLayout
from moe_export.export.options import FUSION_CONTRIB, FUSION_NONE
from moe_export.export.packing import ATTENTION_PACK, packed_forward, packing_plan
from moe_export.export.token_order import left_pad_rotation

CONTRIB_DOMAIN = "com.microsoft"
# Decoder layers whose structure the explicit forward follows (pre-norm RMSNorm, q/k/v/o, rotate-half rope).
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# rope types whose cos/sin depend on the sequence length, not only the position: no fixed cache exists.
DYNAMIC_ROPE = ("dynamic", "longrope")
FUSED_DTYPES = (torch.float32, torch.float16)  # ORT's CPU GroupQueryAttention / RotaryEmbedding kernels
# GroupQueryAttention's do_rotary refuses other head sizes ("head_size shall be a multiple of 16")
ROTARY_INSIDE_HEAD_MULTIPLE = 16


def rotary_inside_attention(head_dim: int) -> bool:
    """Whether GroupQueryAttention rotates q and k itself (else RotaryEmbedding nodes do)."""
    return head_dim % ROTARY_INSIDE_HEAD_MULTIPLE == 0


def fusion_blocker(model: torch.nn.Module) -> str | None:
    """Why `model` cannot be exported with contrib ops (None: it can)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} (contrib fusion covers {', '.join(FUSED_MODEL_TYPES)})"
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} (ONNX Runtime's CPU GroupQueryAttention runs fp32 and fp16 only)"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope in DYNAMIC_ROPE:
        return f"rope_type {rope!r} (its cos/sin depend on the sequence length)"
    for layer in model.model.layers:
        attn = layer.self_attn
        if any(not hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or hasattr(attn, "q_norm"):
            return f"{type(attn).__name__} is not a plain q/k/v/o attention"
        if layer_window(config, attn):
            # GroupQueryAttention's window counts a row's attended tokens, transformers' counts cache columns
            # (a right-padded row's pads included): past the window the padded rows of a batch differ.
            return f"sliding window {layer_window(config, attn)} (GroupQueryAttention windows a right-padded row differently)"
    return None


class FusedDecoderWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past pairs) -> (logits, present pairs), in contrib ops.

    Traced only: the contrib ops are `torch.onnx.ops` symbols, whose eager result is a placeholder."""

    def __init__(self, model: torch.nn.Module, layout: KVLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        cos, sin = rotary_caches(model, layout.head_dim)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        # What GroupQueryAttention reads of the mask: each row's attended count - 1, and the mask's width.
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
        total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
        # GroupQueryAttention takes a row's real tokens to be the first ones of its cache. A left-padded row
        # (optimum pads on the left) is rotated so its real tokens come first, and its hidden states rotated back:
        # the present then holds them first too, where the next step's GroupQueryAttention looks. Every unit runs
        # in this order: validation maps their taps back with the same rotation (export/token_order.py).
        forward, back = left_pad_rotation(attention_mask, input_ids.shape[1])
        input_ids, position_ids = input_ids.gather(1, forward), position_ids.gather(1, forward)
        hidden = base.embed_tokens(input_ids)
        residual = hidden
        normed = base.layers[0].input_layernorm(hidden)  # standard ops: ORT fuses them (base_fusions.py)
        presents: list[torch.Tensor] = []
        layers = list(base.layers)
        for i, layer in enumerate(layers):
            attn, key_value = self._attention(
                layer.self_attn, normed, position_ids, past[2 * i : 2 * i + 2], seqlens_k, total
            )
            presents.extend(key_value)
            normed, residual = skip_rms_norm(attn, residual, layer.post_attention_layernorm)
            mlp = layer.mlp(normed)
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else base.norm
            normed, residual = skip_rms_norm(mlp, residual, after)
        # back to the caller's order before lm_head (per position): hidden is vocab/hidden times smaller than logits
        normed = normed.gather(1, back[..., None].expand(-1, -1, normed.shape[-1]))
        return (self.model.lm_head(normed), *presents)

    def _attention(
        self,
        attn: torch.nn.Module,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
        seqlens_k: torch.Tensor,
        total: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from torch.onnx.ops import symbolic_multi_out

        layout = self.layout
        q, k, v = packed_forward(attn, ATTENTION_PACK, x)  # one MatMul when packed (export/packing.py)
        inputs = [q, k, v, past[0], past[1], seqlens_k, total]
        rotary_inside = rotary_inside_attention(layout.head_dim)
        if rotary_inside:  # saves two passes over q and k per layer
            inputs += [self.cos_cache, self.sin_cache]
        else:
            inputs[:2] = self._rotary(q, position_ids), self._rotary(k, position_ids)
        heads = q.shape[-1] // layout.head_dim
        cache = [past[0].shape[0], layout.kv_heads, past[0].shape[2] + x.shape[1], layout.head_dim]
        window = layer_window(self.model.config, attn)
        out, key, value = symbolic_multi_out(
            f"{CONTRIB_DOMAIN}::GroupQueryAttention",
            inputs,
            attrs={
                "do_rotary": int(rotary_inside),
                "rotary_interleaved": 0,
                "num_heads": int(heads),
                "kv_num_heads": layout.kv_heads,
                "scale": float(attn.scaling),
                # the same number as transformers' window (measured: an unpadded row matches the plain decoder
                # to 1e-6 past the window with this, not with window - 1); the builder writes it so too
                "local_window_size": int(window) if window else -1,
            },
            dtypes=[q.dtype, past[0].dtype, past[1].dtype],
            shapes=[q.shape, cache, cache],
            version=1,
        )
        return attn.o_proj(out), [key, value]

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        from torch.onnx.ops import symbolic

        return symbolic(
            f"{CONTRIB_DOMAIN}::RotaryEmbedding",
            [x, position_ids, self.cos_cache, self.sin_cache],
            attrs={"interleaved": 0},
            dtype=x.dtype,
            shape=x.shape,
            version=1,
        )


def layer_window(config: Any, attn: torch.nn.Module) -> int | None:
    """The sliding window of one attention layer, as transformers applies it (None: full attention).

    Qwen2-style layers carry their own (`sliding_window`, None on full layers); Mistral's read the config's."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    return getattr(config, "sliding_window", None) or None


def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip), x + skip) as one SkipSimplifiedLayerNormalization (its mean / inv-std outputs unused:
    export/base_fusions.py empties them after the trace)."""
    from torch.onnx.ops import symbolic_multi_out

    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    stat = [*x.shape[:-1], 1]
    normed, _, _, summed = symbolic_multi_out(
        f"{CONTRIB_DOMAIN}::SkipSimplifiedLayerNormalization",
        [x, skip, norm.weight],
        attrs={"epsilon": float(eps)},
        dtypes=[x.dtype, torch.float32, torch.float32, x.dtype],
        shapes=[x.shape, stat, stat, x.shape],
        version=1,
    )
    return normed, summed


def rotary_caches(model: torch.nn.Module, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [max_positions, head_dim / 2] from the model's own rotary module (its scaling and
    attention factor included), in the model's dtype: GroupQueryAttention's and RotaryEmbedding's cos_cache / sin_cache."""
    rotary = model.model.rotary_emb
    length = int(model.config.max_position_embeddings)
    dtype = model.get_input_embeddings().weight.dtype
    probe = torch.zeros(1, length, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(length)[None])
    half = head_dim // 2
    # rotate-half layout: the two halves of cos/sin are equal, the op takes the first
    return cos[0, :, :half].to(dtype).contiguous(), sin[0, :, :half].to(dtype).contiguous()


def resolve_fusion(requested: str, model: torch.nn.Module, is_decoder: bool, console: Any) -> dict[str, Any]:
    """export.json's `fusion` record: what was asked (ExportOptions checked it), what the export gets, and why
    when they differ."""
    reason = None
    if requested == FUSION_CONTRIB:
        reason = "the scoring graph (--no-kv-cache) stays in standard ops" if not is_decoder else fusion_blocker(model)
        if reason is not None and is_decoder:
            console.print(f"note: --fusion contrib not applied ({reason}); the decoder keeps standard-op attention")
    mode = requested if reason is None else FUSION_NONE
    record: dict[str, Any] = {"requested": requested, "mode": mode, "reason": reason}
    if mode == FUSION_CONTRIB:
        record["packed"] = packing_plan(model)  # the projections the explicit forward packs (export/packing.py)
        inside = rotary_inside_attention(KVLayout.from_config(model.config).head_dim)
        record["rotary"] = "GroupQueryAttention" if inside else "RotaryEmbedding"
    return record
