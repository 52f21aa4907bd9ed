"""The canonical adapter round-trips exactly through Adapter.save / Adapter.load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_export.errors import FormatError
from moe_export.ir import Adapter, ExpertStack, FFNMoE, LinearMoE, Router, SharedLoRA, TaskGate
from tests.tiny import random_adapter


def task_gated_adapter() -> Adapter:
    g = torch.Generator().manual_seed(5)
    gate = TaskGate("task", embedding=torch.randn(4, 8, generator=g), gate=torch.randn(3, 8, generator=g))
    stack = ExpertStack(torch.randn(3, 2, 32, generator=g), torch.randn(3, 16, 2, generator=g), torch.full((3,), 4.0))
    router = Router(kind="task", num_experts=3, select="dense", task_gate="task")
    unit = LinearMoE("model.layers.0.self_attn.k_proj", 32, 16, stack, router)
    plain = LinearMoE(
        "model.layers.0.self_attn.q_proj", 32, 32, shared=[SharedLoRA(torch.randn(2, 32), torch.randn(32, 2), 0.5)]
    )
    return Adapter("mmoelora", [unit, plain], base_model="../tiny", task_gates={"task": gate}, notices=["n"])


def ffn_adapter() -> Adapter:
    g = torch.Generator().manual_seed(6)
    router = Router(
        kind="linear",
        num_experts=4,
        select="top_p",
        top_p=0.7,
        temperature=0.5,
        weight=torch.randn(4, 32, generator=g),
        bias=torch.randn(4, generator=g),
    )
    experts = {
        p: ExpertStack(torch.randn(4, 2, d_in, generator=g), torch.randn(4, d_out, 2, generator=g), torch.rand(4) + 1)
        for p, (d_in, d_out) in {"gate_proj": (32, 48), "down_proj": (48, 32)}.items()
    }
    return Adapter("mixlora", [FFNMoE("model.layers.1.mlp", "llama_gated", "silu", router, experts)])


ADAPTERS = {
    "topk-shared": lambda: random_adapter(top_k=2, with_shared=True),
    "dense-shared-a": lambda: random_adapter(top_k=None, shared_a=True, with_shared=False),
    "task-gates": task_gated_adapter,
    "ffn-moe": ffn_adapter,
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    adapter = ADAPTERS[name]()
    adapter.source_config = {"adapter_config": {"r": 8, "nested": [1, 2]}}
    loaded = Adapter.load(adapter.save(tmp_path / name))
    assert loaded.to_manifest() == adapter.to_manifest()
    want, got = adapter.tensors(), loaded.tensors()
    assert sorted(want) == sorted(got)
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    # and a second save of the loaded adapter writes the same manifest
    assert Adapter.load(loaded.save(tmp_path / "again")).to_manifest() == adapter.to_manifest()


def test_task_gate_weights_survive_round_trip(tmp_path: Path) -> None:
    adapter = task_gated_adapter()
    loaded = Adapter.load(adapter.save(tmp_path / "a"))
    for task in range(4):
        torch.testing.assert_close(loaded.task_gates["task"].weights(task), adapter.task_gates["task"].weights(task))


def test_load_refuses_stray_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = task_gated_adapter().save(tmp_path / "a")
    tensors = load_file(str(out / "tensors.safetensors"))
    tensors["model.layers.9.mlp.up_proj.experts.A"] = torch.zeros(1)
    save_file(tensors, str(out / "tensors.safetensors"))
    with pytest.raises(FormatError, match="not referenced"):
        Adapter.load(out)


def test_unknown_task_gate_is_refused() -> None:
    adapter = task_gated_adapter()
    with pytest.raises(FormatError, match="task gate"):
        Adapter("x", adapter.units, task_gates={})
