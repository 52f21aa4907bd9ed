"""Triton kernel for `moe_export::GroupedLoRA`: one fused launch, usable eagerly and as TensorRT AOT PTX.

Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank,
D_in / D_out feature sizes; C = E*R columns of the concatenated experts; BT / BO / BD / BC tile sizes.

    y[t] = sum_j gates[t, j] * B[e] @ (A[e or 0] @ x[t]),   e = expert_ids[t, j]

Design (why one kernel): a TensorRT Python AOT plugin returns exactly one kernel launch, so there is
no room for vLLM's separate align/sort pass. The kernel fuses the exact dense decomposition
((x A_cat^T) * g) B_cat per token tile: A viewed as [E_A*R, D_in] and B as [E, D_out, R] are read as
C = E*R columns (no per-expert padding of R), the shrink h = x A_cat^T [BT, C] runs on tensor cores,
the gate of column c is gathered from the K slots (repeated ids add up, as in `dense_gates`), and the
expand (h*g) B_cat^T is accumulated in fp32. A program owns BT tokens x GROUP_O out-tiles of BO and
computes its shrink once when C fits one BC chunk, so the shrink is repeated only D_out/(BO*GROUP_O)
times across the grid; the tile tactics trade that against parallelism (TensorRT times them).
Dense-in-tile costs E/K more FLOPs than a routed gather, but at LoRA ranks both are a few percent of the
base GEMM, and sorting tokens by expert would need a second launch.

Kernel argument order is TensorRT's AOT contract: input pointers, then int32 scalars, then the output
pointer. All tensors are contiguous (TensorRT LINEAR format; the eager wrapper makes them so).
Import this module only on a Triton path: it imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

MAX_CHUNK = 128  # columns (E*R) per shrink chunk held in registers


@triton.jit
def _gated_shrink(
    x_rows,  # [BT, 1] pointers to the tile's rows of x
    mask_t,  # [BT]
    slot_base,  # [BT] offsets of the tile's rows in ids/gates
    ids_ptr,
    gates_ptr,
    a_ptr,
    col0,
    d_in,
    rank,
    top_k,
    num_cols,
    shared_a,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(x A_cat^T) * g for columns col0 .. col0+BC: [BT, BC] fp32."""
    cols = col0 + tl.arange(0, BLOCK_C)  # [BC]: column c = e * R + r
    mask_c = cols < num_cols
    expert = cols // rank  # [BC]
    a_row = tl.where(shared_a != 0, cols % rank, cols)  # [BC]: row of A viewed as [E_A * R, D_in]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    h = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)  # [BT, BC]
    for d0 in range(0, d_in, BLOCK_D):
        mask_d = (d0 + offs_d) < d_in
        xt = tl.load(x_rows + d0 + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)  # [BT, BD]
        a_offs = a_row[None, :].to(tl.int64) * d_in + d0 + offs_d[:, None]  # [BD, BC]: A_cat^T tile
        at = tl.load(a_ptr + a_offs, mask=mask_d[:, None] & mask_c[None, :], other=0.0)
        h = tl.dot(xt, at, h, input_precision=DOT_PRECISION)
    g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)  # [BT, BC]: gate of column c's expert
    for j in range(0, top_k):
        e_j = tl.load(ids_ptr + slot_base + j, mask=mask_t, other=-1)  # [BT]
        g_j = tl.load(gates_ptr + slot_base + j, mask=mask_t, other=0.0).to(tl.float32)  # [BT]
        g += tl.where(e_j[:, None] == expert[None, :], g_j[:, None], 0.0)
    return h * g


@triton.jit
def grouped_lora_kernel(
    x_ptr,  # [T, D_in]
    ids_ptr,  # [T, K] int64 or int32
    gates_ptr,  # [T, K]
    a_ptr,  # [E_A, R, D_in]
    b_ptr,  # [E, D_out, R]
    num_tokens,
    d_in,
    d_out,
    rank,
    top_k,
    num_experts,
    shared_a,  # 1 when E_A == 1 (one A for every expert)
    y_ptr,  # [T, D_out]
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    GROUP_O: tl.constexpr,  # out-tiles per program (they share one shrink)
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # cdiv(E * R, BLOCK_C)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact, not TF32); ignored for fp16/bf16
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = offs_t < num_tokens
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * d_in  # [BT, 1]
    slot_base = offs_t.to(tl.int64) * top_k  # [BT]
    num_cols = num_experts * rank
    low = b_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        hg_once = _gated_shrink(
            x_rows, mask_t, slot_base, ids_ptr, gates_ptr, a_ptr, 0, d_in, rank, top_k, num_cols, shared_a,
            BLOCK_T, BLOCK_C, BLOCK_D, DOT_PRECISION,
        ).to(low)  # fmt: skip
    for i in range(GROUP_O):
        offs_o = (pid_o * GROUP_O + i) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
        mask_o = offs_o < d_out
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)  # [BT, BO]
        for c in tl.static_range(NUM_CHUNKS):
            if NUM_CHUNKS == 1:
                hg = hg_once
            else:
                hg = _gated_shrink(
                    x_rows, mask_t, slot_base, ids_ptr, gates_ptr, a_ptr, c * BLOCK_C, d_in, rank, top_k,
                    num_cols, shared_a, BLOCK_T, BLOCK_C, BLOCK_D, DOT_PRECISION,
                ).to(low)  # fmt: skip
            cols = c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
            b_col = (cols // rank).to(tl.int64) * d_out * rank + cols % rank  # [BC]
            b_offs = b_col[:, None] + offs_o[None, :] * rank  # [BC, BO]: B_cat^T tile
            bt = tl.load(b_ptr + b_offs, mask=(cols[:, None] < num_cols) & mask_o[None, :], other=0.0)
            acc = tl.dot(hg, bt, acc, input_precision=DOT_PRECISION)
        y_offs = offs_t[:, None].to(tl.int64) * d_out + offs_o[None, :]  # [BT, BO]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_o[None, :])


def is_interpreted() -> bool:
    """True when this process imported triton with TRITON_INTERPRET=1 (kernels then run on CPU tensors).

    The choice is process-wide: triton.language's own helpers are built for one mode at import time.
    """
    return not isinstance(grouped_lora_kernel, JITFunction)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape; the constexprs of `grouped_lora_kernel`."""

    block_t: int
    block_o: int
    group_o: int
    block_d: int
    block_c: int
    num_chunks: int
    num_warps: int = 4
    num_stages: int = 2

    def constexprs(self, ieee_fp32: bool) -> dict[str, int | str]:
        return {
            "BLOCK_T": self.block_t,
            "BLOCK_O": self.block_o,
            "GROUP_O": self.group_o,
            "BLOCK_D": self.block_d,
            "BLOCK_C": self.block_c,
            "NUM_CHUNKS": self.num_chunks,
            "DOT_PRECISION": "ieee" if ieee_fp32 else "tf32",
        }

    @property
    def outputs_per_program(self) -> int:
        return self.block_o * self.group_o


# TensorRT tactic id -> (BLOCK_T, BLOCK_O, GROUP_O, num_warps): decode-sized tiles with the most
# programs, up to prefill tiles that share one shrink across 1024 outputs.
TACTICS = {1: (16, 64, 1, 4), 2: (32, 64, 4, 4), 3: (64, 64, 8, 4), 4: (64, 128, 8, 8)}


def choose_config(num_experts: int, rank: int, d_in: int, tactic: int = 2) -> KernelConfig:
    """Tiles for a problem; tl.dot needs every tile dimension >= 16 (powers of two)."""
    block_t, block_o, group_o, num_warps = TACTICS[tactic]
    columns = num_experts * rank
    block_c = min(MAX_CHUNK, max(16, triton.next_power_of_2(columns)))
    block_d = min(64, max(16, triton.next_power_of_2(d_in)))
    return KernelConfig(block_t, block_o, group_o, block_d, block_c, triton.cdiv(columns, block_c), num_warps)


# The int32 scalars between the input and output pointers, in kernel order (TensorRT passes them as SymInt32s).
SCALAR_ARGS = ("num_tokens", "d_in", "d_out", "rank", "top_k", "num_experts", "shared_a")
FLOAT_TYPES = ("fp32", "fp16", "bf16")
INDEX_TYPES = ("i32", "i64")
# Static shared memory a kernel may use without a dynamic-smem opt-in, which TensorRT's AOT launch
# is not documented to make.
SHARED_MEMORY_LIMIT = 48 * 1024


@dataclass(frozen=True)
class CompiledKernel:
    """One AOT-compiled specialization: what a TensorRT AOT plugin embeds and launches."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    config: KernelConfig


def compile_ptx(
    x_type: str,
    ids_type: str,
    gates_type: str,
    config: KernelConfig,
    target: tuple[str, int, int] | None = None,
) -> CompiledKernel:
    """Compile the kernel ahead of time to PTX (no GPU needed when `target`, e.g. ("cuda", 90, 32), is given).

    Types use Triton's names: x/A/B/y in FLOAT_TYPES, ids in INDEX_TYPES, gates in FLOAT_TYPES.
    Tiles shrink until the kernel's shared memory fits SHARED_MEMORY_LIMIT; launch with the returned
    kernel's `config`, which may differ from the one asked for.
    """
    if is_interpreted():
        raise RuntimeError("grouped_lora AOT: compile in a process without TRITON_INTERPRET=1")
    if x_type not in FLOAT_TYPES or gates_type not in FLOAT_TYPES or ids_type not in INDEX_TYPES:
        raise ValueError(f"grouped_lora AOT: unsupported types x={x_type} ids={ids_type} gates={gates_type}")
    while True:
        kernel = _compile_once(x_type, ids_type, gates_type, config, target)
        if kernel.shared_mem <= SHARED_MEMORY_LIMIT:
            return kernel
        smaller = _smaller_tiles(config)
        if smaller is None:
            raise ValueError(f"grouped_lora AOT: {kernel.shared_mem} B of shared memory even with 16-wide tiles")
        config = smaller


def _smaller_tiles(config: KernelConfig) -> KernelConfig | None:
    """Halve the staging tiles first (D, then columns), the output tiles last."""
    if config.block_d > 16:
        return replace(config, block_d=config.block_d // 2)
    if config.block_c > 16:
        return replace(config, block_c=config.block_c // 2, num_chunks=config.num_chunks * 2)
    if config.block_o > 16:
        return replace(config, block_o=config.block_o // 2, group_o=config.group_o * 2)
    if config.block_t > 16:
        return replace(config, block_t=config.block_t // 2)
    return None


def _compile_once(
    x_type: str, ids_type: str, gates_type: str, config: KernelConfig, target: tuple[str, int, int] | None
) -> CompiledKernel:
    from triton.backends.compiler import GPUTarget

    signature = {"x_ptr": f"*{x_type}", "ids_ptr": f"*{ids_type}", "gates_ptr": f"*{gates_type}"}
    signature |= {"a_ptr": f"*{x_type}", "b_ptr": f"*{x_type}"}
    signature |= dict.fromkeys(SCALAR_ARGS, "i32")
    signature["y_ptr"] = f"*{x_type}"
    constexprs = config.constexprs(ieee_fp32=x_type == "fp32")
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = triton.compiler.ASTSource(fn=grouped_lora_kernel, signature=signature, constexprs=constexprs)
    gpu = GPUTarget(*target) if target else triton.runtime.driver.active.get_current_target()
    backend = triton.compiler.make_backend(gpu)
    options = backend.parse_options(
        {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    )
    compiled = triton.compile(source, target=gpu, options=options.__dict__)
    meta = compiled.metadata
    # TensorRT launches exactly the declared arguments; Triton's implicit scratch buffers would be missing.
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise ValueError(
            "grouped_lora AOT: the compiled kernel needs Triton scratch memory, which TensorRT cannot provide"
        )
    return CompiledKernel(meta.name, compiled.asm["ptx"], meta.num_warps, meta.shared, config)


def launch_grid(num_tokens: int, d_out: int, config: KernelConfig) -> tuple[int, int]:
    return (triton.cdiv(num_tokens, config.block_t), triton.cdiv(d_out, config.outputs_per_program))


def grouped_lora_triton(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Run the kernel eagerly (CUDA, or any device under TRITON_INTERPRET=1); same contract as the op."""
    if x.dim() != 2 or expert_ids.dim() != 2 or gates.shape != expert_ids.shape or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            "grouped_lora_triton: expected x [T, D_in], ids/gates [T, K], A [E_A, R, D_in], B [E, D_out, R]"
        )
    num_tokens, d_in = x.shape
    num_experts, d_out, rank = B.shape
    if A.shape[1:] != (rank, d_in) or A.shape[0] not in (1, num_experts):
        raise ValueError(
            f"grouped_lora_triton: A {tuple(A.shape)} does not chain with x {tuple(x.shape)}, B {tuple(B.shape)}"
        )
    if A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"grouped_lora_triton: x, A, B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    config = config or choose_config(num_experts, rank, d_in, tactic=1 if num_tokens <= 64 else 2)
    y = torch.empty(num_tokens, d_out, dtype=x.dtype, device=x.device)  # [T, D_out]
    if num_tokens == 0 or d_out == 0:
        return y
    if x.device.type != "cuda" and not is_interpreted():
        raise ValueError("grouped_lora_triton: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    scalars = {
        "num_tokens": num_tokens,
        "d_in": d_in,
        "d_out": d_out,
        "rank": rank,
        "top_k": expert_ids.shape[1],
        "num_experts": num_experts,
        "shared_a": int(A.shape[0] == 1),
    }
    grouped_lora_kernel[launch_grid(num_tokens, d_out, config)](
        x.contiguous(),
        expert_ids.to(torch.int64).contiguous(),
        gates.contiguous(),
        A.contiguous(),
        B.contiguous(),
        *(scalars[name] for name in SCALAR_ARGS),  # the kernel's order, as TensorRT passes them
        y,
        **config.constexprs(ieee_fp32=x.dtype == torch.float32),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y
