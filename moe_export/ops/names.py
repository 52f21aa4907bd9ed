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
OP_TYPES = (GROUPED_LORA, GROUPED_LORA_SLOTS)  # what `moe-export onnx` writes, one node (or more) per routed unit
PLUGIN_VERSION = "1"
# Node attributes TensorRT's ONNX parser reads to find a plugin for the node.
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}
