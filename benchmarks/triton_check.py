"""Checks a real tritonserver serving `moe-export triton` repositories; run by triton_check.sh in its own venv.

Imports no moe_export: every expectation comes from outside the code under test (a local onnxruntime
session of the same ONNX file; the torch reference's greedy tokens computed by triton_check.sh).
Exit 0 when every check passes, 1 otherwise; prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from triton_server import Server

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def local_session(version_dir: Path) -> ort.InferenceSession:
    """The same ONNX file and kernel library as the served model, in-process (the expectation)."""
    options = ort.SessionOptions()
    library = version_dir / "libmoe_export_ort.so"
    if library.is_file():
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def check_configs(roots: list[Path]) -> None:
    """Every config.pbtxt parses into ModelConfig; names, dtypes and dims agree with the ONNX graph."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    onnx_types = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64, "tensor(float16)": mc.TYPE_FP16}
    for root in roots:
        for path in sorted(root.glob("*/config.pbtxt")):
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
            where = f"{path.relative_to(root.parent)}"
            check(config.name == path.parent.name, f"{where}: parses; name matches its folder")
            onnx_dir = path.parent / "1"
            if config.platform == "tensorrt_plan":  # the engine's I/O is the ONNX graph's: compare with it
                onnx_dir = path.parent.parent / config.name.removesuffix("_trt") / "1"
            if config.name.endswith("_generate"):
                got = [(t.name, t.data_type, list(t.dims)) for t in [*config.input, *config.output]]
                want = [("input_ids", mc.TYPE_INT64, [-1]), ("max_new_tokens", mc.TYPE_INT32, [1]),
                        ("output_ids", mc.TYPE_INT64, [-1])]  # fmt: skip
                check(got == want, f"{where}: generation I/O {got}")
                continue
            session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
            batch = [-1] if config.max_batch_size > 0 else []
            for side, tensors, specs in (("inputs", config.input, session.get_inputs()),
                                         ("outputs", config.output, session.get_outputs())):  # fmt: skip
                got = [(t.name, t.data_type, batch + list(t.dims)) for t in tensors]
                want = [(s.name, onnx_types[s.type], [d if isinstance(d, int) else -1 for d in s.shape]) for s in specs]
                check(got == want, f"{where}: {side} match the ONNX graph ({len(want)} tensors)")
            check(config.max_batch_size == 0 or config.HasField("dynamic_batching"), f"{where}: batching settings")


def scoring_feeds(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 256, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, length - 2 :] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def infer(client: object, module: object, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in feeds.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    requested = [module.InferRequestedOutput(n) for n in outputs]  # type: ignore[attr-defined]
    result = client.infer(model, inputs, outputs=requested)  # type: ignore[attr-defined]
    return {n: result.as_numpy(n) for n in outputs}


def generate_ok(got: list[int], case: dict, eos: set[int]) -> bool:
    want = case["tokens"]
    return got == want[: len(got)] and (len(got) == len(want) or (bool(got) and got[-1] in eos))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--serve", required=True, help="repositories to serve, comma-separated")
    parser.add_argument("--configs", default="", help="more repositories whose configs are only parsed")
    parser.add_argument("--expect", type=Path, required=True, help="JSON: prompts and the reference's tokens")
    parser.add_argument("--score-model", required=True)
    parser.add_argument("--step-model", required=True)
    parser.add_argument("--generate-model", required=True)
    args = parser.parse_args()
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    serve = [Path(p) for p in args.serve.split(",")]
    check_configs(serve + [Path(p) for p in args.configs.split(",") if p])
    repo_of = {p.parent.name: p for r in serve for p in r.glob("*/config.pbtxt")}
    cases = json.loads(args.expect.read_text())
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    gen_config = text_format.Parse(repo_of[args.generate_model].read_text(), mc.ModelConfig())
    eos = {int(t) for t in gen_config.parameters["eos_token_ids"].string_value.split(",") if t}

    server = Server(args.work, [str(p) for p in serve], args.work / "tritonserver.log")
    try:
        ready = server.wait_ready([args.score_model, args.step_model, args.generate_model])
        print(f"server ready in {ready:.1f} s (http {server.http_url}, grpc {server.grpc_url})", flush=True)
        clients = {"http": (http.InferenceServerClient(server.http_url), http),
                   "grpc": (grpc.InferenceServerClient(server.grpc_url), grpc)}  # fmt: skip
        rng = np.random.default_rng(0)
        score_local = local_session(repo_of[args.score_model].parent / "1")
        feeds = scoring_feeds(rng, 2, 9)
        want = score_local.run(["logits"], feeds)[0]
        for proto, (client, module) in clients.items():
            got = infer(client, module, args.score_model, feeds, ["logits"])["logits"]
            check(np.array_equal(got, want), f"{proto}: {args.score_model} logits equal local ORT exactly")

        step_local = local_session(repo_of[args.step_model].parent / "1")
        step_feeds = {"input_ids": feeds["input_ids"][:1], "attention_mask": np.ones((1, 9), np.int64),
                      "position_ids": np.arange(9, dtype=np.int64)[None]}  # fmt: skip
        for spec in step_local.get_inputs():
            if spec.name.startswith("past_key_values."):
                step_feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
        want_step = step_local.run(["logits"], step_feeds)[0]
        for proto, (client, module) in clients.items():
            got = infer(client, module, args.step_model, step_feeds, ["logits"])["logits"]
            check(np.array_equal(got, want_step), f"{proto}: {args.step_model} first-step logits equal local ORT")

        for proto, (client, module) in clients.items():
            for case in cases:
                request = {"input_ids": np.asarray(case["prompt"], np.int64),
                           "max_new_tokens": np.asarray([case["max_new_tokens"]], np.int32)}  # fmt: skip
                got = infer(client, module, args.generate_model, request, ["output_ids"])["output_ids"].tolist()
                check(generate_ok(got, case, eos), f"{proto}: generate {case['prompt']} -> {got} (torch reference)")

        concurrent(server, args, cases, eos, score_local)
        for client, _ in clients.values():
            client.close()  # an open connection would hold the server's shutdown until its exit timeout
    finally:
        leftover = server.stop()
        check(server.process.returncode == 0, f"server exited with {server.process.returncode} after SIGTERM")
        check(not leftover, f"no processes left in the server's group ({leftover})")
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


def concurrent(server: Server, args: argparse.Namespace, cases: list, eos: set[int], local: object) -> None:
    """8 clients x 20 requests (half http, half grpc; scoring and generation interleaved), all checked."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    errors: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        module = http if index % 2 == 0 else grpc
        client = module.InferenceServerClient(server.http_url if module is http else server.grpc_url)
        rng = np.random.default_rng(100 + index)
        for n in range(20):
            try:
                if n % 2 == 0:
                    feeds = scoring_feeds(rng, 1 + n % 3, 6)
                    got = infer(client, module, args.score_model, feeds, ["logits"])["logits"]
                    want = local.run(["logits"], feeds)[0]  # type: ignore[attr-defined]
                    # Dynamic batching may run this request inside a larger batch: GEMM blocking (so the
                    # summation order) can change with the batch size, hence a tolerance rather than equality.
                    ok = np.allclose(got, want, rtol=1e-5, atol=1e-5)
                else:
                    case = cases[(index + n) % len(cases)]
                    request = {"input_ids": np.asarray(case["prompt"], np.int64),
                               "max_new_tokens": np.asarray([case["max_new_tokens"]], np.int32)}  # fmt: skip
                    got = infer(client, module, args.generate_model, request, ["output_ids"])["output_ids"].tolist()
                    ok = generate_ok(got, case, eos)
            except Exception as exc:  # a transport error is a failed request too
                ok, got = False, exc
            with lock:
                done[0] += 1
                if not ok:
                    errors.append(f"client {index} request {n}: {str(got)[:200]}")
        client.close()

    begin = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - begin
    check(done[0] == 160 and not errors, f"8 clients x 20 requests: {done[0] - len(errors)}/160 correct "
          f"in {seconds:.1f} s {errors[:3]}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
