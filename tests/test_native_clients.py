"""The native kernel library in every client: genai_config.json names it, and onnxruntime-genai really runs it.

"Runs" is read from the library's own call counter (`MoeExportKernelCalls`, a per-process count of kernel
calls): genai registers the library by itself from genai_config.json, and the loader maps one file once per
process, so the counter read through ctypes is the one genai's session increments. The expected count comes
from the graph (GroupedLoRA nodes) times the model runs genai made (one per new token), not from the code
under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from moe_export.export.client_files import GENAI_CONFIG, write_client_files
from moe_export.export.interface import GraphInterface
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.ops.names import DOMAIN
from moe_export.runtimes import native
from moe_export.runtimes.decoding import Prompts, torch_reference
from moe_export.runtimes.native import library as native_library
from moe_export.runtimes.torch_runner import reference_model_loader
from tests.artifacts import shared_export
from tests.conftest import native_library_or_skip
from tests.genai_check import genai_greedy


@pytest.fixture(scope="module")
def library() -> Path:
    return native_library_or_skip()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, library: Path) -> Path:
    return shared_export(tmp_path_factory, tiny_base)


def _custom_nodes(export_dir: Path) -> int:
    return sum(
        n.domain == DOMAIN for n in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.node
    )


def _session_options(export_dir: Path) -> dict:
    return json.loads((export_dir / GENAI_CONFIG).read_text())["model"]["decoder"].get("session_options", {})


def test_export_ships_the_library_and_genai_config_names_it(export_dir: Path, library: Path) -> None:
    name = _session_options(export_dir)["custom_ops_library"]
    assert name == library.name  # relative: genai resolves it against the export folder
    assert (export_dir / name).read_bytes() == library.read_bytes()
    assert name in ExportManifest.load(export_dir).copied_files  # replaced with the export, like its other files


def test_genai_runs_the_native_kernel(export_dir: Path, tmp_path: Path) -> None:
    """genai from the folder as exported: every GroupedLoRA node runs natively on every step, and the tokens are
    the torch reference's. The same folder without the session_options entry runs no kernel: the count can fail."""
    nodes = _custom_nodes(export_dir)
    assert nodes == 14
    shipped = export_dir / _session_options(export_dir)["custom_ops_library"]
    ids = np.array([[3, 17, 42, 9]], dtype=np.int64)
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 6, do_sample=False)
    generator = og.Generator(model, params)
    before = native.kernel_calls(shipped)
    generator.append_tokens(ids.astype(np.int32))  # the prompt's forward: each node once
    assert native.kernel_calls(shipped) - before == nodes
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[ids.shape[1] :]]
    calls = native.kernel_calls(shipped) - before
    # one forward per step after the prompt's; genai may run one more than it keeps, never a partial one
    assert calls % nodes == 0 and calls >= nodes * len(tokens) and tokens, (calls, nodes, tokens)
    model = reference_model_loader(Artifact.open(export_dir))().eval()
    pad = json.loads((export_dir / GENAI_CONFIG).read_text())["model"]["pad_token_id"]
    want = torch_reference(model, Prompts("p", ids, np.ones_like(ids)), 6, pad).tokens[0].tolist()
    assert tokens == want[: len(tokens)]
    del generator, model

    bodies = tmp_path / "bodies"
    shutil.copytree(export_dir, bodies)
    config = json.loads((bodies / GENAI_CONFIG).read_text())
    del config["model"]["decoder"]["session_options"]
    (bodies / GENAI_CONFIG).write_text(json.dumps(config))
    before = native.kernel_calls(bodies / shipped.name)
    assert genai_greedy(bodies, ids, new_tokens=6)[0] == tokens
    assert native.kernel_calls(bodies / shipped.name) == before  # genai ran the function bodies


def test_generate_gives_genai_the_library_of_an_export_without_one(
    export_dir: Path, library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export written without the library (older, or made where none was built) still runs natively under
    `moe-export generate --runtime onnxruntime-genai`: this machine's library comes in through a config overlay."""
    from moe_export.runtimes.generate import generate

    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)
    monkeypatch.setattr(native_library, "_session_library", {})
    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    config = json.loads((old / GENAI_CONFIG).read_text())
    del config["model"]["decoder"]["session_options"]
    (old / GENAI_CONFIG).write_text(json.dumps(config))
    (old / library.name).unlink()
    before = native.kernel_calls(library)
    result = generate(old, [3, 17, 42, 9], max_new_tokens=4, runtime="onnxruntime-genai")
    calls, nodes = native.kernel_calls(library) - before, _custom_nodes(old)
    assert calls % nodes == 0 and calls >= nodes * len(result.tokens) > 0, (calls, nodes, result.tokens)


def test_client_files_without_a_library_name_none(tmp_path: Path, library: Path) -> None:
    """Where no library is built (no compiler, no headers, MOE_EXPORT_KERNELS=off) genai_config.json names none
    and no file is copied: genai then runs the function bodies instead of failing to load a missing library."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    (tmp_path / "without").mkdir()
    interface = GraphInterface.for_model(config, kv_cache=True)
    written = write_client_files(tmp_path / "without", config, interface, "model.onnx")
    assert "session_options" not in json.loads((tmp_path / "without" / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert not (tmp_path / "without" / library.name).exists() and library.name not in written
    (tmp_path / "with").mkdir()
    assert library.name in write_client_files(tmp_path / "with", config, interface, "model.onnx", library)
    assert (tmp_path / "with" / library.name).is_file()
    assert _session_options(tmp_path / "with") == {"custom_ops_library": library.name}
