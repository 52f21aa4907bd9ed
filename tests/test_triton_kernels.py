"""The Triton grouped-LoRA kernel against the eager op: interpreted on CPU, compiled on CUDA.

Without a GPU the module sets TRITON_INTERPRET=1 before triton is imported (the choice is process-wide),
so the same properties run in Triton's interpreter; on a CUDA machine they run the compiled kernel.
The AOT path (PTX for TensorRT) compiles in a subprocess, which needs no GPU but must not interpret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moe_export.ops.grouped_lora import grouped_lora  # noqa: E402
from moe_export.ops.triton_grouped_lora import TACTICS, choose_config, grouped_lora_triton, is_interpreted  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not is_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)


def _problem(
    seed: int, T: int, K: int, E: int, R: int, d_in: int, d_out: int, shared_a: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)  # [T, D_in]
    ids = torch.randint(0, E, (T, K), generator=g)  # [T, K]; repeats allowed: their gates add up
    gates = torch.rand(T, K, generator=g)  # [T, K]
    A = torch.randn(1 if shared_a else E, R, d_in, generator=g) * 0.3  # [E_A, R, D_in]
    B = torch.randn(E, d_out, R, generator=g) * 0.3  # [E, D_out, R]
    return x.to(dtype), ids, gates, A.to(dtype), B.to(dtype)


def _on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 40),
    K=st.integers(1, 4),
    E=st.integers(1, 6),
    R=st.integers(1, 8),
    d_in=st.integers(1, 70),
    d_out=st.integers(1, 70),
    shared_a=st.booleans(),
)
def test_kernel_matches_eager_op_fp32(
    seed: int, T: int, K: int, E: int, R: int, d_in: int, d_out: int, shared_a: bool
) -> None:
    x, ids, gates, A, B = _problem(seed, T, K, E, R, d_in, d_out, shared_a, torch.float32)
    expected = grouped_lora(x, ids, gates, A, B)  # [T, D_out]
    actual = grouped_lora_triton(*_on(DEVICE, x, ids, gates, A, B)).cpu()
    assert actual.shape == (T, d_out) and actual.dtype == torch.float32
    # fp32 dots are IEEE (not TF32) in the kernel; only the summation order differs from the eager op.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared_a", [False, True])
def test_kernel_fp16_with_fp32_gates(shared_a: bool) -> None:
    """fp16 activations/weights, fp32 gates (the router's dtype), fp32 accumulation inside the kernel."""
    x, ids, gates, A, B = _problem(1, 37, 2, 4, 8, 64, 48, shared_a, torch.float16)
    expected = grouped_lora(x.float(), ids, gates, A.float(), B.float())  # exact math on the fp16 inputs
    actual = grouped_lora_triton(*_on(DEVICE, x, ids, gates, A, B)).cpu()
    assert actual.dtype == torch.float16
    # Two fp16 roundings (h*g before the expand, the output) of relative size 2**-11 each, on values of
    # magnitude ~|y|: 1e-2 of the output scale bounds both with margin, and still fails on a wrong expert.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("tactic", sorted(TACTICS))
@pytest.mark.parametrize("shared_a", [False, True])
def test_every_tactic_with_several_column_chunks(tactic: int, shared_a: bool) -> None:
    """E*R = 160 > 128 columns: two shrink chunks; T and D_out leave partial token and output tiles."""
    x, ids, gates, A, B = _problem(4, 70, 3, 20, 8, 40, 150, shared_a, torch.float32)
    config = choose_config(20, 8, 40, tactic=tactic)
    assert config.num_chunks == 2
    actual = grouped_lora_triton(*_on(DEVICE, x, ids, gates, A, B), config=config).cpu()
    torch.testing.assert_close(actual, grouped_lora(x, ids, gates, A, B), rtol=1e-4, atol=1e-5)


def test_kernel_single_expert_and_empty_input() -> None:
    x, ids, gates, A, B = _problem(2, 9, 2, 5, 3, 16, 24, False, torch.float32)
    ids[:] = 3  # both slots pick the same expert: the gates add up
    actual = grouped_lora_triton(*_on(DEVICE, x, ids, gates, A, B)).cpu()
    expected = gates.sum(1, keepdim=True) * (x @ A[3].T @ B[3].T)  # [T, D_out]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    empty = grouped_lora_triton(*_on(DEVICE, x[:0], ids[:0], gates[:0], A, B))
    assert empty.shape == (0, 24)


def test_kernel_rejects_mismatched_inputs() -> None:
    x, ids, gates, A, B = _problem(3, 4, 2, 3, 2, 8, 8, False, torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_lora_triton(x, ids, gates, A.half(), B)
    with pytest.raises(ValueError, match="does not chain"):
        grouped_lora_triton(x, ids, gates, A[:, :, :4], B)


AOT_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ.pop("TRITON_INTERPRET", None)
    from moe_export.ops.triton_grouped_lora import choose_config, compile_ptx
    out = {}
    for x_type, ids_type, gates_type in [("fp16", "i64", "fp32"), ("fp32", "i32", "fp32")]:
        k = compile_ptx(x_type, ids_type, gates_type, choose_config(8, 8, 1024, tactic=4), target=("cuda", 90, 32))
        params = [l for l in k.ptx.splitlines() if l.strip().startswith(".param")]
        out[x_type] = {"name": k.name, "block_d": k.config.block_d, "params": len(params), "warps": k.num_warps, "shared": k.shared_mem,
                       "target": ".target sm_90" in k.ptx, "mma": "mma" in k.ptx}
    print(json.dumps(out))
    """
)


def test_aot_ptx_for_sm90_without_a_gpu() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, timeout=240, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for info in result.values():
        assert info["name"] == "grouped_lora_kernel" and info["target"]
        # 5 inputs + 7 int32 scalars + 1 output is what TensorRT passes; Triton appends its 2 scratch
        # pointers, unused when the scratch sizes are 0 (compile_ptx refuses otherwise).
        assert info["params"] == 5 + 7 + 1 + 2
        assert info["warps"] * 32 <= 1024 and 0 < info["shared"] <= 48 * 1024
    assert result["fp16"]["mma"], "fp16 dots should use tensor cores"
    assert not result["fp32"]["mma"], "fp32 dots must stay IEEE fp32, not TF32 tensor cores"
    # tactic 4 in fp32 needs 56 KiB with 64-wide D tiles (fp16: 24 KiB): compile_ptx shrinks the fp32 tiles
    assert result["fp32"]["block_d"] < 64 and result["fp16"]["block_d"] == 64
