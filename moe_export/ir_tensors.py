"""Inference tensors: the one place that turns whatever a training run saved into the adapter's tensors.

Training code saves live parameters: `torch.load` hands them back as `nn.Parameter` with
`requires_grad=True`, sometimes as views sharing one storage, sometimes strided, in fp16/bf16 when the
run trained in half precision. Kept as they are, they leak into the reference model as buffers that
"require grad", which `torch.onnx.export` refuses. Every loader's adapter goes through
`finish_adapter` (loading.py), so no loader has to think about it.

Dtype policy (README "Adapter dtypes"): every floating adapter tensor is held in fp32. fp16 and bf16
values upcast exactly, so nothing the training run saved is lost; the reference model and the export
cast the experts to the model's dtype (`--dtype`, fp32 by default) and run each router in the dtype its
family routes in (fp32 for most), whatever dtype the adapter was saved in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

ADAPTER_DTYPE = torch.float32


def owns_storage(tensor: torch.Tensor) -> bool:
    """True when `tensor` is contiguous and is the whole of its storage (no view into a bigger buffer)."""
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def inference_tensor(tensor: torch.Tensor, seen_storages: set[int] | None = None) -> torch.Tensor:
    """A plain, detached, contiguous tensor without grad that owns its storage, floating point in fp32.

    `seen_storages` collects storage addresses across calls: a second tensor on a storage already handed
    out (one tensor saved under two keys) gets its own copy, so no two adapter tensors alias.
    """
    out = tensor.detach()
    if type(out) is not torch.Tensor:  # nn.Parameter or another subclass: keep the data, drop the type
        out = out.as_subclass(torch.Tensor)
    if out.is_floating_point() and out.dtype != ADAPTER_DTYPE:
        out = out.to(ADAPTER_DTYPE, memory_format=torch.contiguous_format)  # a new storage
    elif not owns_storage(out) or (seen_storages is not None and out.untyped_storage().data_ptr() in seen_storages):
        out = out.clone(memory_format=torch.contiguous_format)
    if seen_storages is not None and out.numel():
        seen_storages.add(out.untyped_storage().data_ptr())
    return out.requires_grad_(False)


def finish_adapter(adapter: Any) -> Any:
    """Replace every tensor reachable from the adapter's dataclasses (units, stacks, routers, shared
    LoRAs, task gates) by its inference tensor, in place; returns the adapter."""
    seen: set[int] = set()
    visited: set[int] = set()
    upcast: set[str] = set()

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype != ADAPTER_DTYPE:
                upcast.add(str(value.dtype).removeprefix("torch."))
            return inference_tensor(value, seen)
        if id(value) in visited:
            return value
        visited.add(id(value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                current = getattr(value, f.name)
                new = visit(current)
                if new is not current:
                    object.__setattr__(value, f.name, new)
        elif isinstance(value, list):
            value[:] = [visit(v) for v in value]
        elif isinstance(value, dict):
            for key in list(value):
                value[key] = visit(value[key])
        return value

    with torch.no_grad():
        visit(adapter)
    if upcast:
        saved = "/".join(sorted(upcast))
        exact = "" if "float64" in upcast else " (an exact upcast)"
        adapter.notices.append(f"adapter tensors saved as {saved}: held in float32{exact}")
    return adapter


def adapter_tensors_are_inference_ready(adapter: Any) -> list[str]:
    """Canonical keys of tensors that break the contract (grad, subclass, view, non-fp32 float); [] if none."""
    bad = []
    for key, t in adapter.tensors().items():
        if (
            t.requires_grad
            or type(t) is not torch.Tensor
            or not owns_storage(t)
            or (t.is_floating_point() and t.dtype != ADAPTER_DTYPE)
        ):
            bad.append(key)
    return bad
