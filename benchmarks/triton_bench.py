"""Throughput through Triton vs direct in-process onnxruntime: requests/s, tokens/s, p50/p99 latency.

Runs in the venv of triton_check.sh, on the repositories it wrote (run the check first):
    LD_LIBRARY_PATH=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))") \\
    WORK/venv/bin/python benchmarks/triton_bench.py --work WORK [--requests 120] [--json OUT]
Scoring: goat_score (python backend, dynamic batching), one request = 1 x 32 tokens, tokens/s counts the
scored tokens. Generation: goat_generate, an 8-token prompt and 16 new tokens, tokens/s counts new tokens.
"Direct" runs the same ONNX file, kernel library and greedy loop (the repository's moe_export_runtime.py)
in this process, one shared session, the same number of client threads. Imports no moe_export.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from triton_server import Server

SEQ, PROMPT, NEW = 32, 8, 16


def run_clients(concurrency: int, total: int, call: Callable[[int, int], int], setup: Callable[[], object]) -> dict:
    """`total` requests split over `concurrency` threads; call(client_state, i) returns the tokens it handled."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def loop(index: int) -> None:
        state = setup()
        for n in range(index, total, concurrency):
            begin = time.perf_counter()
            count = call(state, n)  # type: ignore[arg-type]
            elapsed = time.perf_counter() - begin
            with lock:
                latencies.append(elapsed)
                tokens[0] += count
        close = getattr(state, "close", None)
        if close:
            close()

    begin = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    ms = np.asarray(latencies) * 1e3
    return {
        "requests_per_s": round(total / wall, 1),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def triton_calls(grpc: Any, ids: np.ndarray, prompts: np.ndarray) -> tuple[Callable, Callable]:
    """The served counterparts of direct_score and direct_generate (one gRPC request each)."""

    def triton_score(c: object, n: int) -> int:
        a = grpc.InferInput("input_ids", [1, SEQ], "INT64")
        a.set_data_from_numpy(ids[n % 64])
        m = grpc.InferInput("attention_mask", [1, SEQ], "INT64")
        m.set_data_from_numpy(np.ones((1, SEQ), np.int64))
        c.infer("goat_score", [a, m])  # type: ignore[attr-defined]
        return SEQ

    def triton_generate(c: object, n: int) -> int:
        a = grpc.InferInput("input_ids", [PROMPT], "INT64")
        a.set_data_from_numpy(prompts[n % 64])
        k = grpc.InferInput("max_new_tokens", [1], "INT32")
        k.set_data_from_numpy(np.asarray([NEW], np.int32))
        out = c.infer("goat_generate", [a, k]).as_numpy("output_ids")  # type: ignore[attr-defined]
        return len(out)

    return triton_score, triton_generate


def sweep(cases: dict[str, tuple[Callable, Callable, int]], client: Callable[[], object]) -> dict[str, dict]:
    """Direct ORT and Triton side by side at each concurrency, each after its own warm-up."""
    results: dict[str, dict] = {}
    for task, (direct, served, total) in cases.items():
        for concurrency in (1, 4, 16):
            for where, call, setup in (("direct ORT", direct, lambda: None), ("Triton grpc", served, client)):
                run_clients(concurrency, min(total, 16), call, setup)  # warm-up
                row = run_clients(concurrency, total, call, setup)
                results[f"{task} c={concurrency} {where}"] = row
                print(f"{task:10s} c={concurrency:2d} {where:11s} {row}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import tritonclient.grpc as grpc

    score_dir = args.work / "repo-score" / "goat_score" / "1"
    gen_dir = args.work / "repo-kv" / "goat_generate" / "1"
    spec = importlib.util.spec_from_file_location("moe_export_runtime", gen_dir / "moe_export_runtime.py")
    runtime = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(runtime)  # type: ignore[union-attr]

    def session(folder: Path) -> ort.InferenceSession:
        return runtime.make_session(str(folder / "model.onnx"), {"custom_ops_library": "libmoe_export_ort.so"})

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (64, 1, SEQ), dtype=np.int64)
    prompts = rng.integers(0, 256, (64, PROMPT), dtype=np.int64)
    score_local, gen_local = session(score_dir), session(gen_dir)

    def direct_score(_: object, n: int) -> int:
        score_local.run(["logits"], {"input_ids": ids[n % 64], "attention_mask": np.ones((1, SEQ), np.int64)})
        return SEQ

    def direct_generate(_: object, n: int) -> int:
        return len(runtime.greedy(gen_local, prompts[n % 64].tolist(), NEW))

    server = Server(args.work, [str(args.work / "repo-score"), str(args.work / "repo-kv")], args.work / "bench.log")
    try:
        server.wait_ready(["goat_score", "goat_generate"])

        def client() -> object:
            return grpc.InferenceServerClient(server.grpc_url)

        triton_score, triton_generate = triton_calls(grpc, ids, prompts)
        cases = {
            "scoring": (direct_score, triton_score, args.requests),
            "generation": (direct_generate, triton_generate, max(args.requests // 2, 32)),
        }
        results = sweep(cases, client)
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
