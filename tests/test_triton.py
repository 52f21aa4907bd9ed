"""`moe-export triton`: the repository layout, configs against the ONNX graph, the python-backend runtime
(greedy loop vs the PyTorch reference, batched runs vs single runs), and bad input (exit 2, nothing written).

The real server runs in benchmarks/triton_check.sh (own venv: nvidia-pytriton needs numpy<2); there every
config.pbtxt is also parsed into Triton's ModelConfig protobuf, which cannot be installed here (tritonclient's
grpc extra would downgrade protobuf).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.export.manifest import Artifact
from moe_export.runtimes.decoding import Prompts, torch_greedy
from moe_export.runtimes.torch_runner import reference_model_loader
from moe_export.serving.backend import runtime
from tests.artifacts import shared_export, shared_scoring_run


@pytest.fixture(scope="module")
def kv_export(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return shared_export(tmp_path_factory, tiny_base)


@pytest.fixture(scope="module")
def scoring_export(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    run = shared_scoring_run(tmp_path_factory, tiny_base)  # `onnx --no-kv-cache`, shared with test_decoder
    assert run.exit_code == 0, run.stdout + run.stderr
    return run.out_dir


def _triton(*args: str) -> object:
    return CliRunner().invoke(app, ["triton", *args])


def _fields(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{key}: (.+)$", text, flags=re.M)


def test_scoring_repository(scoring_export: Path, tmp_path: Path) -> None:
    """onnxruntime backend: platform, batch dim owned by Triton, dims and names as the graph's, dynamic batching."""
    repo = tmp_path / "repo"
    result = _triton(str(scoring_export), "-o", str(repo), "--name", "m", "--instances", "3", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["models"]) == ["m"]
    text = (repo / "m" / "config.pbtxt").read_text()
    assert _fields(text, "platform") == ['"onnxruntime_onnx"'] and _fields(text, "max_batch_size") == ["8"]
    assert "dynamic_batching {" in text and _fields(text, "count") == ["3"] and _fields(text, "kind") == ["KIND_CPU"]
    graph = onnx.load(str(repo / "m" / "1" / "model.onnx"), load_external_data=False).graph
    names = [v.name for v in (*graph.input, *graph.output)]
    assert _fields(text, "name")[1:] == [f'"{n}"' for n in names]
    vocab = graph.output[0].type.tensor_type.shape.dim[2].dim_value
    assert _fields(text, "dims") == ["-1", "-1", "-1", str(vocab)]  # batch dim dropped: Triton owns it
    assert (repo / "README.md").is_file() and not (repo / "m_generate").exists()


def test_decoder_repository(kv_export: Path, tmp_path: Path) -> None:
    """A KV decoder: no batching, full dims; python backend files; the generation model with the export's EOS."""
    repo = tmp_path / "repo"
    result = _triton(str(kv_export), "-o", str(repo), "--name", "d", "--backend", "python")
    assert result.exit_code == 0, result.output
    text = (repo / "d" / "config.pbtxt").read_text()
    assert _fields(text, "backend") == ['"python"'] and _fields(text, "max_batch_size") == ["0"]
    assert "dynamic_batching" not in text and (repo / "d" / "1" / "moe_export_runtime.py").is_file()
    session = ort.InferenceSession(str(repo / "d" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    first_past = session.get_inputs()[3]
    dims = [str(d) if isinstance(d, int) else "-1" for d in first_past.shape]
    assert _fields(text, "dims")[6:10] == dims  # input_ids, attention_mask, position_ids: 2 dims each
    gen = (repo / "d_generate" / "config.pbtxt").read_text()
    eos = json.loads((kv_export / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert f'string_value: "{eos}"' in gen and (repo / "d_generate" / "1" / "model.py").is_file()


def test_greedy_loop_matches_the_torch_reference(kv_export: Path) -> None:
    """The loop the generation model runs inside Triton gives the PyTorch reference's greedy tokens."""
    artifact = Artifact.open(kv_export)
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    model = reference_model_loader(artifact)().eval()
    for prompt in ([5, 17, 42, 9], [1]):
        ids = np.asarray([prompt], dtype=np.int64)
        want = torch_greedy(model, Prompts("p", ids, np.ones_like(ids)), 8).tokens[0].tolist()
        assert runtime.greedy(session, prompt, 8) == want
    stop = want[2]
    assert runtime.greedy(session, [1], 8, eos=[stop]) == want[: want.index(stop) + 1]


def test_grouped_runs_equal_single_runs(scoring_export: Path) -> None:
    """Same-shape requests batched together give each request what it gets alone; a bad one fails alone."""
    session = ort.InferenceSession(str(scoring_export / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    requests = [
        {"input_ids": rng.integers(0, 64, (b, s), dtype=np.int64), "attention_mask": np.ones((b, s), np.int64)}
        for b, s in ((1, 5), (2, 5), (1, 7), (3, 5))
    ]
    requests.append({"input_ids": np.zeros((1, 5), np.int64)})  # attention_mask missing
    grouped = runtime.run_grouped(session, requests, batched=True)
    for feeds, result in zip(requests[:4], grouped[:4], strict=True):
        np.testing.assert_allclose(result["logits"], session.run(["logits"], feeds)[0], rtol=1e-5, atol=1e-6)
    assert isinstance(grouped[4], Exception)


def test_a_bad_request_in_a_merged_batch_fails_alone(scoring_export: Path) -> None:
    """Issue 24: one request that ORT refuses (an id past the vocabulary, as if the request checks had missed it),
    in a batch of same-shape requests, used to hand its exception to every batch-mate."""
    session = ort.InferenceSession(str(scoring_export / "model.onnx"), providers=["CPUExecutionProvider"])
    vocab = session.get_outputs()[0].shape[2]
    rng = np.random.default_rng(1)
    requests = [{"input_ids": rng.integers(0, vocab, (1, 6), dtype=np.int64), "attention_mask": np.ones((1, 6), np.int64)}
                for _ in range(4)]  # fmt: skip
    requests[2]["input_ids"][0, 1] = vocab
    grouped = runtime.run_grouped(session, requests, batched=True)
    assert isinstance(grouped[2], Exception) and "indices" in str(grouped[2])
    for index in (0, 1, 3):
        want = session.run(["logits"], requests[index])[0]
        np.testing.assert_allclose(grouped[index]["logits"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"input_ids": [[1, -1]], "attention_mask": [[1, 1]]}, "token id -1 is outside the vocabulary [0, 256)"),
        ({"input_ids": [[1, 256]], "attention_mask": [[1, 1]]}, "token id 256 is outside"),
        ({"input_ids": [[1] * 257], "attention_mask": [[1] * 257]}, "257 tokens exceed the model's context of 256"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 1, 1]]}, "attention_mask: shape [1, 3], expected [1, 2]"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 1]] * 2}, "attention_mask: shape [2, 2], expected [1, 2]"),
        ({"input_ids": [[1]], "position_ids": [[256]], "attention_mask": [[1]]}, "position_ids: must be in [0, 256)"),
    ],
)
def test_request_checks(feeds: dict, message: str) -> None:
    """What the python-backend models refuse before ORT (answered 400 / INVALID_ARGUMENT in Triton)."""
    with pytest.raises(runtime.RequestError, match=re.escape(message)):
        runtime.check_feeds({k: np.asarray(v, np.int64) for k, v in feeds.items()}, 256, 256)


def test_request_checks_past_and_generation() -> None:
    """A decoder step counts its past against the context; `_generate` counts prompt plus new tokens."""
    past = {
        f"past_key_values.{i}.{kv}": np.zeros((1, 2, 250, 16), np.float32) for i in range(2) for kv in ("key", "value")
    }
    step = {"input_ids": np.ones((1, 6), np.int64), "attention_mask": np.ones((1, 256), np.int64),
            "position_ids": np.arange(250, 256)[None], **past}  # fmt: skip
    runtime.check_feeds(step, 256, 256)  # exactly the context: accepted
    step.update(input_ids=np.ones((1, 7), np.int64), attention_mask=np.ones((1, 257), np.int64))
    step["position_ids"] = np.arange(250, 257)[None]
    with pytest.raises(runtime.RequestError, match=r"250 past \+ 7 new tokens exceed the model's context of 256"):
        runtime.check_feeds(step, 256, 256)
    runtime.check_generation(np.ones(200, np.int64), 56, 256, 256, 512)
    with pytest.raises(runtime.RequestError, match=r"200-token prompt plus 57 new tokens exceed .* context of 256"):
        runtime.check_generation(np.ones(200, np.int64), 57, 256, 256, 512)
    with pytest.raises(runtime.RequestError, match="token id 300"):
        runtime.check_generation(np.asarray([1, 300]), 5, 256, 256, 512)


def test_repository_names_the_backends_it_needs(scoring_export: Path, kv_export: Path, tmp_path: Path) -> None:
    """Issue 24: the default onnxruntime backend is missing from some servers (nvidia-pytriton's has python only);
    the hint, the README and the marker name every backend the repository's models need."""
    result = _triton(str(scoring_export), "-o", str(tmp_path / "my repo"), "--name", "m")
    assert result.exit_code == 0, result.output
    assert f"serve: tritonserver --model-repository '{tmp_path / 'my repo'}'" in result.stdout  # shell-quoted
    assert "needs the Triton backends: onnxruntime\n" in result.stdout and "--backend python" in result.stdout
    assert "Triton backend(s) `onnxruntime`" in (tmp_path / "my repo" / "README.md").read_text()
    result = _triton(str(kv_export), "-o", str(tmp_path / "kv"), "--backend", "python", "--json")
    assert json.loads(result.stdout)["backends"] == ["python"]
    assert json.loads((tmp_path / "kv" / ".moe-export-triton.json").read_text())["backends"] == ["python"]
    result = _triton(str(kv_export), "-o", str(tmp_path / "kv2"))  # onnxruntime decoder step + python generation
    assert "needs the Triton backends: onnxruntime, python\n" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-batch-size", "4"], "KV-cache decoder"),
        (["--instances", "0"], "--instances"),
        (["--device", "tpu"], "--device"),
        (["--backend", "tensorflow"], "--backend"),
        (["--name", "a b"], "--name"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(kv_export: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = _triton(str(kv_export), "-o", str(tmp_path / "repo"), *extra)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_not_an_export_or_a_foreign_folder(kv_export: Path, tmp_path: Path) -> None:
    """A folder without export.json, and an existing folder of the user's, are refused; nothing is touched."""
    result = _triton(str(tmp_path), "-o", str(tmp_path / "repo"))
    assert result.exit_code == 2 and "export.json" in result.output and not (tmp_path / "repo").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = _triton(str(kv_export), "-o", str(mine))
    assert result.exit_code == 2 and "not written by" in result.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    again = tmp_path / "again"
    assert _triton(str(kv_export), "-o", str(again)).exit_code == 0
    assert _triton(str(kv_export), "-o", str(again), "--name", "other").exit_code == 0  # our own: replaced
    assert sorted(p.name for p in again.iterdir() if not p.name.startswith(".")) == [
        "README.md", "other", "other_generate"
    ]  # fmt: skip
