"""Micro-benchmark: candidate GroupedLoRA function bodies on one unit, against the unit's base MatMul.

    python benchmarks/grouped_lora_bodies.py [--tokens 128,1024] [--threads 2]

Candidates (all exact): `dense` (the shipped body, ops.grouped_lora_dense), `gather_k` (gather the K
selected experts' A and B per token, then batched MatMuls: E/K fewer FLOPs, but T*K*R*(D_in+D_out)
weights copied per call). Each model computes base MatMul + router-free LoRA delta, like one unit.
Legend: T tokens, K slots, E experts, R rank, D hidden.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moe_export.export.onnx_ops import function_bodies
from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES

OPSET = 20
D, E, R, K = 1024, 8, 8, 2


def gather_k_body(opset: int) -> onnx.FunctionProto:
    """y[t] = sum_j g[t,j] B[e_tj] (A[e_tj] x[t]) with per-token gathered weights (E_A == E only)."""
    n = helper.make_node
    nodes = [
        n("Gather", ["A", "expert_ids"], ["a_sel"], axis=0),  # [T, K, R, D_in]
        n("Constant", [], ["ax12"], value_ints=[1, 3]),
        n("Unsqueeze", ["x", "ax12"], ["x4"]),  # [T, 1, D_in, 1]
        n("MatMul", ["a_sel", "x4"], ["h"]),  # [T, K, R, 1]
        n("CastLike", ["gates", "x"], ["g"]),
        n("Constant", [], ["ax23"], value_ints=[2, 3]),
        n("Unsqueeze", ["g", "ax23"], ["g4"]),  # [T, K, 1, 1]
        n("Mul", ["h", "g4"], ["hg"]),  # [T, K, R, 1]
        n("Gather", ["B", "expert_ids"], ["b_sel"], axis=0),  # [T, K, D_out, R]
        n("MatMul", ["b_sel", "hg"], ["yk"]),  # [T, K, D_out, 1]
        n("Constant", [], ["ax13"], value_ints=[1, 3]),
        n("ReduceSum", ["yk", "ax13"], ["y"], keepdims=0),  # [T, D_out]
    ]
    return helper.make_function(
        DOMAIN, "GroupedLoRA", ["x", "expert_ids", "gates", "A", "B"], ["y"], nodes, [helper.make_opsetid("", opset)]
    )


BODIES = {"dense": lambda opset: function_bodies({"GroupedLoRA"}, opset)[0], "gather_k": gather_k_body}


def unit_model(body: str | None, seed: int = 0) -> bytes:
    """x [T, D] -> x W^T (+ GroupedLoRA(x, ids, gates, A, B)); body None = base MatMul only."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) / 32, "w_t"),
        numpy_helper.from_array(rng.standard_normal((E, R, D)).astype(np.float32) / 32, "A"),
        numpy_helper.from_array(rng.standard_normal((E, D, R)).astype(np.float32) / 32, "B"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", D]),
        helper.make_tensor_value_info("expert_ids", TensorProto.INT64, ["T", K]),
        helper.make_tensor_value_info("gates", TensorProto.FLOAT, ["T", K]),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w_t"], ["base" if body else "y"])]
    functions = []
    if body:
        nodes += [
            helper.make_node(
                "GroupedLoRA", ["x", "expert_ids", "gates", "A", "B"], ["delta"], domain=DOMAIN, **PLUGIN_ATTRIBUTES
            ),
            helper.make_node("Add", ["base", "delta"], ["y"]),
        ]
        functions = [BODIES[body](OPSET)]
    graph = helper.make_graph(
        nodes, "unit", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="128,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    variants = {"base": None, **{name: name for name in BODIES}}
    sessions = {name: ort.InferenceSession(unit_model(body), options) for name, body in variants.items()}
    for tokens in (int(t) for t in args.tokens.split(",")):
        rng = np.random.default_rng(1)
        ids = np.argsort(rng.random((tokens, E)), axis=1)[:, :K].astype(np.int64)  # [T, K] distinct experts
        feeds = {"x": rng.standard_normal((tokens, D)).astype(np.float32), "expert_ids": ids}
        feeds["gates"] = rng.random((tokens, K)).astype(np.float32)
        outs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
        assert np.allclose(outs["dense"], outs["gather_k"], rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.runs):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["base"])
        cells = ", ".join(
            f"{n} {statistics.median(t) * 1e3:.2f} ms (x{statistics.median(t) / base:.2f})" for n, t in times.items()
        )
        print(f"T={tokens}: {cells}")


if __name__ == "__main__":
    main()
