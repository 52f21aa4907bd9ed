"""Custom ops shared by the PyTorch reference, the ONNX exporter and the TensorRT plugin."""

from moe_export.ops.grouped_lora import dense_gates, grouped_lora, grouped_lora_dense
from moe_export.ops.grouped_lora_slots import grouped_lora_slots, grouped_lora_slots_dense

__all__ = ["dense_gates", "grouped_lora", "grouped_lora_dense", "grouped_lora_slots", "grouped_lora_slots_dense"]
