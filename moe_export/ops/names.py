"""The custom op's names, in one place: ONNX domain and op types, TensorRT plugin lookup, torch namespace.

The contract behind them is docs/op-contract.md. Plain strings only: importing this module costs nothing
(no torch, no onnx).
"""

from __future__ import annotations

DOMAIN = "moe_export"  # ONNX node domain, torch.library namespace and TensorRT plugin namespace
DOMAIN_VERSION = 1
GROUPED_LORA = "GroupedLoRA"  # x, expert_ids, gates, A, B -> [T, D_out]
GROUPED_LORA_SLOTS = "GroupedLoRASlots"  # x, expert_ids, A, B -> [T, K, D_out] (MixLoRA's per-slot form)
# x, expert_ids, gates, A, B, base -> base + GroupedLoRA(...) in base's shape: the fused residual that the optional
# pass export/onnx_fused.py writes (`moe-export onnx` does not); the native kernels run it.
GROUPED_LORA_ADD = "GroupedLoRAAdd"
# The router inside the op: x, router_weight [D_in, E], A, B -> (y, expert_ids, gates), a softmax top-k router's
# MatMul/Softmax/TopK/normalise chain and GroupedLoRA in one node, and its fused-residual form (base last).
# The pass export/onnx_routed.py writes them in `moe-export onnx` (ExportOptions.fuse_routers).
ROUTED_GROUPED_LORA = "RoutedGroupedLoRA"
ROUTED_GROUPED_LORA_ADD = "RoutedGroupedLoRAAdd"
# Op types whose node takes the routing as inputs 1 (expert_ids) and 2 (gates) ...
GATED_OP_TYPES = (GROUPED_LORA, GROUPED_LORA_ADD)
# ... and those that compute it and give it back as outputs 1 and 2.
ROUTED_OP_TYPES = (ROUTED_GROUPED_LORA, ROUTED_GROUPED_LORA_ADD)
OP_TYPES = (GROUPED_LORA, GROUPED_LORA_SLOTS)  # what the trace writes, one node (or more) per routed unit
# Every op type a routed unit's node can have in a saved export (after the optional graph passes).
UNIT_OP_TYPES = (*OP_TYPES, GROUPED_LORA_ADD, *ROUTED_OP_TYPES)
PLUGIN_VERSION = "1"
# Node attributes TensorRT's ONNX parser reads to find a plugin for the node.
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}
