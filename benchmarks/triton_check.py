"""Checks a real tritonserver serving `moe-export triton` repositories; run by triton_check.sh in its own venv.

Imports no moe_export: every expectation comes from outside the code under test (a local onnxruntime
session of the same ONNX file; the torch reference's greedy tokens computed by triton_check.sh).
Also the bad requests: ids outside the vocabulary, requests past the context (each 400 / INVALID_ARGUMENT),
one bad request among 8 batched ones (fails alone), and a repository whose backend this server lacks (its
model is unavailable for the backend the repository names). Exit 0 when every check passes, 1 otherwise;
prints one line per check.
"""

from __future__ import annotations

import argparse
import functools
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


def check_outputs(clients: dict, args: argparse.Namespace, repo_of: dict[str, Path], cases: list[dict],
                  eos: set[int]) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:  # fmt: skip
    """Served scoring logits and first-step logits equal local ORT exactly; served generation gives the
    reference's tokens, over both protocols. Returns the local scoring session and the step feeds (reused)."""
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

    return score_local, step_feeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--serve", required=True, help="repositories to serve, comma-separated")
    parser.add_argument("--configs", default="", help="more repositories whose configs are only parsed")
    parser.add_argument("--expect", type=Path, required=True, help="JSON: prompts and the reference's tokens")
    parser.add_argument("--score-model", required=True)
    parser.add_argument("--step-model", required=True)
    parser.add_argument("--generate-model", required=True)
    parser.add_argument("--unloadable", default="", help="a repository the server lacks a backend for (served too)")
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

    unloadable = [Path(args.unloadable)] if args.unloadable else []
    repositories = [str(p) for p in serve + unloadable]
    server = Server(args.work, repositories, args.work / "tritonserver.log", exit_on_error=not unloadable)
    try:
        ready = server.wait_ready([args.score_model, args.step_model, args.generate_model])
        print(f"server ready in {ready:.1f} s (http {server.http_url}, grpc {server.grpc_url})", flush=True)
        check_backends(server, serve, unloadable)
        clients = {"http": (http.InferenceServerClient(server.http_url), http),
                   "grpc": (grpc.InferenceServerClient(server.grpc_url), grpc)}  # fmt: skip
        score_local, step_feeds = check_outputs(clients, args, repo_of, cases, eos)
        concurrent(server, args, cases, eos, score_local)
        bad_requests(clients, args, step_feeds)
        bad_request_alone(server, args, score_local)
        for client, _ in clients.values():
            client.close()  # an open connection would hold the server's shutdown until its exit timeout
    finally:
        leftover = server.stop()
        check(server.process.returncode == 0, f"server exited with {server.process.returncode} after SIGTERM")
        check(not leftover, f"no processes left in the server's group ({leftover})")
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


def needed_backends(root: Path) -> set[str]:
    """The backends a repository's configs name (parsed by Triton's own ModelConfig, not by moe-export)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    platforms = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
    names = set()
    for path in root.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        names.add(config.backend or platforms[config.platform])
    return names


def check_backends(server: Server, served: list[Path], unloadable: list[Path]) -> None:
    """Each repository names the backends its configs need (README and marker); the server loads the models
    of those it has, and a model whose backend it lacks fails to load for exactly that reason."""
    import tritonclient.http as http

    have = {p.name for p in server.backends.iterdir() if p.is_dir()}
    for root in served + unloadable:
        marker = json.loads((root / ".moe-export-triton.json").read_text())
        want = needed_backends(root)
        named = set(marker.get("backends", []))
        readme = (root / "README.md").read_text()
        check(named == want and all(f"`{b}`" in readme for b in want),
              f"{root.name}: the repository names the backends it needs {sorted(named)} (configs: {sorted(want)})")  # fmt: skip
    client = http.InferenceServerClient(server.http_url)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index()}
    finally:
        client.close()
    for root in unloadable:
        missing = needed_backends(root) - have
        for path in root.glob("*/config.pbtxt"):
            state = index.get(path.parent.name, {})
            reason = state.get("reason", "")
            check(bool(missing) and state.get("state") == "UNAVAILABLE" and any(f"'{b}'" in reason for b in missing),
                  f"{path.parent.name}: not loaded for the backend it names and the server lacks: {reason[:120]}")  # fmt: skip


def expect_client_error(call: object, what: str, words: str) -> None:
    """A request the server must refuse as the client's fault: HTTP 400 / gRPC INVALID_ARGUMENT, naming why."""
    from tritonclient.utils import InferenceServerException

    try:
        call()  # type: ignore[operator]
    except InferenceServerException as exc:
        status, message = str(exc.status()), exc.message()
        ok = status in ("400", "StatusCode.INVALID_ARGUMENT") and words in message
        check(ok, f"{what}: refused with {status}: {message[:150]}")
    else:
        check(False, f"{what}: accepted (expected 400 / INVALID_ARGUMENT)")


def bad_requests(clients: dict, args: argparse.Namespace, step_feeds: dict[str, np.ndarray]) -> None:
    """Ids outside the vocabulary and requests longer than the context (256 tokens for the GOAT sample)."""
    ids = np.asarray([[5, 17, -1, 9]], np.int64)
    step = dict(step_feeds, input_ids=step_feeds["input_ids"].copy())
    step["input_ids"][0, 3] = -1
    long = np.ones((1, 300), np.int64)
    past = {k: np.zeros((1, v.shape[1], 250, v.shape[3]), v.dtype) for k, v in step_feeds.items() if "past" in k}
    cases = [
        ("scoring, token id -1", args.score_model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, "vocabulary"),
        ("scoring, token id 256", args.score_model, {"input_ids": ids * 0 + 256, "attention_mask": np.ones_like(ids)}, "vocabulary"),
        ("decoder step, token id -1", args.step_model, step, "vocabulary"),
        ("scoring, 300 tokens", args.score_model, {"input_ids": long, "attention_mask": long}, "context"),
        ("decoder step, 250 past + 10 tokens", args.step_model,
         {"input_ids": np.ones((1, 10), np.int64), "attention_mask": np.ones((1, 260), np.int64),
          "position_ids": np.arange(250, 260, dtype=np.int64)[None], **past}, "context"),
        ("generate, 200-token prompt + 100 new", args.generate_model,
         {"input_ids": np.ones(200, np.int64), "max_new_tokens": np.asarray([100], np.int32)}, "context"),
        ("generate, token id -1", args.generate_model,
         {"input_ids": np.asarray([3, -1], np.int64), "max_new_tokens": np.asarray([4], np.int32)}, "vocabulary"),
    ]  # fmt: skip
    for proto, (client, module) in clients.items():
        for what, model, feeds, words in cases:
            output = "output_ids" if model == args.generate_model else "logits"
            call = functools.partial(infer, client, module, model, feeds, [output])
            expect_client_error(call, f"{proto}: {what}", words)


def bad_request_alone(server: Server, args: argparse.Namespace, local: object) -> None:
    """8 same-shape scoring requests at once (dynamic batching merges them), one with an id outside the
    vocabulary, 4 rounds: the 7 good ones are answered right every time and only the bad one fails."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    modules = [(http, server.http_url) if i % 2 else (grpc, server.grpc_url) for i in range(8)]
    before = batch_executions(server, args.score_model)
    wrong: list[str] = []
    for round_ in range(4):
        rng = np.random.default_rng(round_)
        feeds = [{"input_ids": rng.integers(0, 256, size=(1, 7), dtype=np.int64),
                  "attention_mask": np.ones((1, 7), np.int64)} for _ in range(8)]  # fmt: skip
        bad = round_ * 2 + 1
        feeds[bad]["input_ids"][0, 3] = 256
        for i, got in enumerate(burst(modules, args.score_model, feeds)):
            if i == bad:
                ok = isinstance(got, Exception) and str(got.status()) in ("400", "StatusCode.INVALID_ARGUMENT")  # type: ignore[attr-defined]
            else:  # as in `concurrent`: a batch's GEMM blocking may differ from a single run's
                want = local.run(["logits"], feeds[i])[0]  # type: ignore[attr-defined]
                ok = isinstance(got, np.ndarray) and np.allclose(got, want, rtol=1e-5, atol=1e-5)
            if not ok:
                wrong.append(f"round {round_} request {i}{' (the bad one)' if i == bad else ''}: {str(got)[:120]}")
    merged = batch_executions(server, args.score_model) - before
    check(not wrong, f"one bad request in 4 rounds of 8 concurrent scoring requests fails alone "
          f"({merged} executions ran several requests as one batch) {wrong[:3]}")  # fmt: skip


def burst(modules: list, model: str, feeds: list[dict[str, np.ndarray]]) -> list[object]:
    """Each request from its own client thread, released together: logits, or the exception the client raised.
    Each thread makes its own client (the http client's gevent loop belongs to the thread that made it)."""
    from tritonclient.utils import InferenceServerException

    barrier = threading.Barrier(len(feeds))
    outcome: list[object] = [None] * len(feeds)

    def send(i: int) -> None:
        module, url = modules[i]
        client = module.InferenceServerClient(url)
        barrier.wait()
        try:
            outcome[i] = infer(client, module, model, feeds[i], ["logits"])["logits"]
        except InferenceServerException as exc:
            outcome[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def batch_executions(server: Server, model: str) -> int:
    """How many times the model ran a batch of more than one request (Triton's own statistics)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return sum(int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []) if int(b["batch_size"]) > 1)


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
