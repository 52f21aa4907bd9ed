"""Files copied into a Triton model repository for the python backend (numpy + onnxruntime only).

`runtime.py` is copied as `moe_export_runtime.py` next to each `model.py`; `scoring_model.py` and
`generate_model.py` become `model.py`. Nothing here imports moe_export: the server's Python need not have it.
"""
