"""Serving: a Triton Inference Server model repository from an export (`moe-export triton`).

A stage after validation: it reads an export (export stage) and the native kernel library (runtimes stage).
`backend/` holds the files copied into the repository for Triton's python backend; they import only numpy
and onnxruntime, since they run inside the server's Python, not moe-export's.
"""
