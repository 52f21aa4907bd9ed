"""Runners: torch reference, ONNX Runtime, TensorRT; one interface (`base.Runner`).

Backends are imported lazily: `tensorrt` is only imported inside `runtimes/tensorrt.py`.
"""
