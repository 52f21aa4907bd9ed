"""The README.md written at the top of a generated Triton model repository: what each model is and how to serve it."""

from __future__ import annotations

from typing import Any

from moe_export.export.interface import INPUT_IDS
from moe_export.export.manifest import Artifact
from moe_export.serving.model_config import GraphIO, GraphTensor

# The models written next to the scoring graph, by their name's suffix (repository.py names them).
EXTRA_MODELS = {
    "_generate": "generates greedily inside the model (it loops over the decoder, feeding each step's present as "
    f"the next past): request `{INPUT_IDS}` INT64 [prompt length] and optionally `max_new_tokens` INT32 [1]; "
    "response `output_ids` INT64, the new tokens up to and including an EOS. Prompt ids must be in [0, vocab) and "
    "prompt plus `max_new_tokens` within the model's context (else 400 / INVALID_ARGUMENT); without "
    "`max_new_tokens`, the default is cut to the room the context leaves. No dynamic batching: a decoder step "
    "cannot batch requests with different pasts.",
    "_trt": "is the engine from `moe-export trt` (`platform: tensorrt_plan`). It runs only on the GPU model and "
    "TensorRT version it was built with (see engine.json in the export). Built with `--plugin on`, the GroupedLoRA "
    "kernels are compiled ahead of time into the engine, so no plugin library needs loading; built with "
    "`--plugin off`, the engine holds standard layers only.",
}


def repository_readme(
    artifact: Artifact, name: str, models: dict[str, dict[str, Any]], notes: list[str], backend: str, io: GraphIO
) -> str:
    kv = artifact.manifest.kv_cache
    lines = [
        f"# Triton model repository for `{artifact.path.name}`",
        "",
        f"Written by `moe-export triton` from `{artifact.path}` ({artifact.manifest.family}, "
        f"{artifact.manifest.dtype}, {'KV-cache decoder' if kv else 'scoring graph'}).",
        "",
        "| model | backend | what it does |",
        "|---|---|---|",
    ]
    for model, info in models.items():
        lines.append(f"| `{model}` | {info['backend']} | {info['role']} |")
    lines += ["", f"## `{name}` inputs and outputs (from the ONNX graph)", ""]
    lines += [f"- in  {_describe(t)}" for t in io.inputs] + [f"- out {_describe(t)}" for t in io.outputs]
    lines += [
        "",
        "## Serve",
        "",
        "```bash",
        "tritonserver --model-repository $PWD --http-address 127.0.0.1 --grpc-address 127.0.0.1",
        "```",
        "",
        backends_line(sorted({info["backend"] for info in models.values()})),
        "",
    ]
    lines += [_backend_paragraph(name, backend, artifact.manifest.opset), ""]
    for suffix, what in EXTRA_MODELS.items():
        if any(m.endswith(suffix) for m in models):
            lines += [f"`{name}{suffix}` {what}", ""]
    lines += [
        "## Native kernels",
        "",
        "Copied into each model's version folder when `moe-export kernels build` had built them "
        "(`libmoe_export_ort.so`): the onnxruntime backend loads it through `model_operations` (an absolute "
        "path: rewrite it when the repository moves, e.g. to `/models/...` in a container); python-backend "
        "models find it next to `model.py`. The library is built for this machine's CPU and its ORT API "
        "version; elsewhere, rebuild it or delete it (the function bodies then run, same results).",
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _backend_paragraph(name: str, backend: str, opset: int) -> str:
    """How the main model is served: Triton's onnxruntime backend, or our python backend."""
    if backend == "onnxruntime":
        return (
            f"`{name}` uses Triton's onnxruntime backend (`platform: onnxruntime_onnx`), shipped in the "
            "`nvcr.io/nvidia/tritonserver:<yy.mm>-py3` container. The graph carries `moe_export::GroupedLoRA` "
            "nodes with standard-op function bodies; ONNX Runtime inlines them when the session is created, "
            "so the backend's ORT must be recent enough for the export's opset "
            f"({opset}). The backend passes requests to ORT unchecked: a negative token id "
            "indexes the embedding from its end (ONNX Gather) and answers with wrong logits; the python backend "
            "checks ids and the context first."
        )
    return (
        f"`{name}` uses the python backend: `model.py` runs the ONNX file with onnxruntime "
        '(`pip install onnxruntime "numpy<2"` in the server\'s Python; CUDA: `onnxruntime-gpu`). '
        "Each request is checked before ORT runs it: token ids in [0, vocab), shapes that agree (mask length "
        "= past + new tokens), past + new tokens within the context; a bad request gets 400 / "
        "INVALID_ARGUMENT and fails alone, never its dynamic-batching batch-mates."
    )


def backends_line(backends: list[str]) -> str:
    """Which Triton backends the server must have: a missing one fails that model's load with "unable to find
    backend library for backend '...'" (the python-only tritonserver of nvidia-pytriton has `python` alone)."""
    names = ", ".join(f"`{b}`" for b in backends)
    hint = ""
    if "onnxruntime" in backends:
        hint = (
            " A server without the onnxruntime backend (e.g. the python-only one of nvidia-pytriton) cannot load "
            "`platform: onnxruntime_onnx` models: write the repository with `--backend python` for it."
        )
    return (
        f"The server needs the Triton backend(s) {names}: each a folder in its `--backend-directory` "
        f"(default `/opt/tritonserver/backends`).{hint}"
    )


def _describe(tensor: GraphTensor) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in tensor.dims)
    return f"`{tensor.name}` {tensor.triton_type} [{dims}]"
