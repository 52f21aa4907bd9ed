"""The graph interface object (export/interface.py): the one owner of input/output names and the past-KV
pattern, its export.json round trip (old files included), and the TensorRT feeds it builds driven through a
CPU stand-in engine for both export kinds, so feed drift shows without a GPU."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from moe_export.errors import FormatError, MoeExportError
from moe_export.export.interface import GraphInterface, KVLayout
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.export.tensorrt import TrtBuildOptions, inspect_onnx_dir, opt_feeds, resolve_profiles
from moe_export.export.trt_engine import check_bindings
from tests.artifacts import shared_export, shared_scoring_run

PACKAGE = Path(__file__).resolve().parents[1] / "moe_export"
OWNER = PACKAGE / "export" / "interface.py"
# Copied into a Triton model repository, where it runs with numpy and onnxruntime only: it cannot import the
# interface. tests/test_triton.py runs it on exports made through the interface, so a drift fails there.
STANDALONE = PACKAGE / "serving" / "backend"
# A graph name as a word anywhere in a string, the past/present patterns, or the output name as a whole string
# ("logits" alone is too common a word in messages to forbid inside a sentence).
SPELLED = re.compile(r"\b(input_ids|attention_mask|position_ids)\b|past_key_values\.|\bpresent\.[{%0-9]|^logits$")


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]]
    return {id(body[0].value) for n in nodes if (body := getattr(n, "body", None)) and isinstance(body[0], ast.Expr)}


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string constant in code that spells a graph name: docstrings and `help=` texts
    (documentation for people) are not code."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            skip |= {id(n) for n in ast.walk(node.value)}
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        if SPELLED.search(node.value)
    ]


def test_the_scanner_finds_spelled_names() -> None:
    """The check below can fail: each way of spelling a name is found, documentation is not."""
    source = '''
"""Module doc naming input_ids is fine."""
def f(feeds, out, i, option=Option(help="e.g. input_ids:1x128")):
    """So is a docstring: past_key_values.{i}.key."""
    a = feeds["attention_mask"]
    b = f"past_key_values.{i}.key"
    c = out["logits"]
    d = "present.%d.value"
    e = f"{option}: no position_ids here"
    return "the router logits are fine", "not present."
'''
    assert sorted(line for line, _ in spelled_names(source)) == [5, 6, 7, 8, 9]


def test_no_module_outside_the_interface_spells_a_graph_name() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == OWNER or STANDALONE in path.parents:
            continue
        found += [
            f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}" for line, text in spelled_names(path.read_text())
        ]
    assert not found, "use moe_export/export/interface.py instead of spelling graph names:\n" + "\n".join(found)


def _config(**overrides: int) -> SimpleNamespace:
    values = dict(num_attention_heads=4, hidden_size=32, num_hidden_layers=3, num_key_value_heads=2, vocab_size=64)
    return SimpleNamespace(**(values | overrides))


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_through_json(kv_cache: bool, dtype: str) -> None:
    interface = GraphInterface.for_model(_config(), kv_cache, dtype)
    again = GraphInterface.from_dict(json.loads(json.dumps(interface.to_dict())), "export.json")
    assert again == interface and again.is_decoder == kv_cache
    if kv_cache:  # the layout written down independently of the code under test: optimum's order
        names = [f"past_key_values.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
        assert interface.input_names() == ["input_ids", "attention_mask", "position_ids", *names]
        assert interface.output_names()[1:] == [n.replace("past_key_values", "present") for n in names]
        assert interface.inputs[3].shape == ("batch", 2, "past_sequence", 8) and interface.inputs[3].dtype == dtype
    else:
        assert interface.input_names() == ["input_ids", "attention_mask"] and interface.output_names() == ["logits"]


def test_export_json_without_an_interface_still_reads(tmp_path: Path) -> None:
    """export.json files written before the interface object held top-level inputs, outputs and kv_cache."""
    new = ExportManifest(
        "0", "/c", "/b", "goat", "fp16", 20, interface=GraphInterface.for_model(_config(), True, "float16")
    )
    data = new.to_dict()
    interface = data.pop("interface")
    data |= {"inputs": interface["inputs"], "outputs": interface["outputs"], "kv_cache": True}
    (tmp_path / "export.json").write_text(json.dumps(data))
    assert ExportManifest.load(tmp_path).interface == new.interface
    data |= {"inputs": [], "outputs": [], "kv_cache": False}  # the oldest: no specs at all, scoring
    (tmp_path / "export.json").write_text(json.dumps(data))
    assert ExportManifest.load(tmp_path).interface == GraphInterface.scoring()


def test_an_unknown_pattern_or_name_is_refused() -> None:
    data = GraphInterface.for_model(_config(), True).to_dict()
    data["past"]["past_key"] = "past.{}.k"
    with pytest.raises(FormatError, match="past-KV name pattern"):
        GraphInterface.from_dict(data, "export.json")
    data = GraphInterface.scoring().to_dict()
    data["inputs"][0]["name"] = "tokens"
    with pytest.raises(FormatError, match="does not follow the scoring interface"):
        GraphInterface.from_dict(data, "export.json")


def test_complete_and_next_step_feeds() -> None:
    interface = GraphInterface.decoder(KVLayout(2, 2, 8))
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    first = interface.complete_feeds({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": mask})
    assert first["position_ids"].tolist() == [[0, 1, 2], [0, 1, 1]]  # pads at 1, as transformers does
    assert first["past_key_values.1.value"].shape == (2, 2, 0, 8)
    previous = {name: np.full((2, 2, 3, 8), i, np.float32) for i, name in enumerate(interface.present_names())}
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step = interface.next_step_feeds(np.array([5, 6]), grown, 3, previous)
    assert step["input_ids"].tolist() == [[5], [6]] and step["position_ids"].tolist() == [[3], [2]]
    assert [int(step[f"past_key_values.{i}.{kv}"][0, 0, 0, 0]) for i in range(2) for kv in ("key", "value")] == [
        0,
        1,
        2,
        3,
    ]


# ---------------------------------------------------------------- TensorRT feeds through a stand-in engine


class StandInEngine:
    """What a TensorRT engine of the export checks and runs, on CPU: the engine's inputs are the ONNX graph's,
    its profile is the one `moe-export trt` would build, `check_bindings` is EngineSession.bind's own check,
    and onnxruntime computes the outputs."""

    def __init__(self, export: Path, options: TrtBuildOptions) -> None:
        info = inspect_onnx_dir(export)
        self.profiles = resolve_profiles(info, options)
        self.opt = opt_feeds(info, self.profiles)
        self.session = ort.InferenceSession(str(info.onnx_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.interface = info.interface

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_bindings("stand-in engine", self.inputs, feeds, lambda name: self.profiles[name])
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    scoring = shared_scoring_run(tmp_path_factory, tiny_base)
    assert scoring.exit_code == 0, scoring.stdout + scoring.stderr
    return {"decoder": shared_export(tmp_path_factory, tiny_base), "scoring": scoring.out_dir}


@pytest.mark.parametrize("kind", ["decoder", "scoring"])
def test_tensorrt_feeds_run_on_a_stand_in_engine(exports: dict[str, Path], kind: str) -> None:
    """The feeds of the GPU tests, of `--plugin auto`'s timing and of benchmarks/trt_gpu.py's profile all bind
    to the engine `moe-export trt` builds, for both export kinds; the old two-input feeds do not (the drift
    issue 22 found)."""
    from tests.test_tensorrt import engine_feeds

    export = exports[kind]
    engine = StandInEngine(export, TrtBuildOptions())
    logits_name = engine.interface.logits_name
    for feeds in (engine_feeds(export, 3, 17), engine.opt):
        batch, seq = feeds["input_ids"].shape
        assert engine.infer(feeds)[logits_name].shape == (batch, seq, 64)
    interface = Artifact.open(export).interface
    shapes = interface.input_shapes(8, 128)  # benchmarks/trt_gpu.py: a first step at its max batch x seq
    bench = StandInEngine(
        export, TrtBuildOptions(min_shapes=interface.input_shapes(1, 1), opt_shapes=shapes, max_shapes=shapes)
    )
    ids = np.zeros((8, 128), np.int64)
    assert bench.infer(interface.complete_feeds({interface.tokens_name: ids}))[logits_name].shape == (8, 128, 64)
    old = {"input_ids": ids[:3, :17], "attention_mask": np.ones((3, 17), np.int64)}
    if kind == "decoder":
        with pytest.raises(MoeExportError, match="missing inputs"):
            engine.infer(old)
    else:
        assert engine.infer(old)[logits_name].shape == (3, 17, 64)
    too_long = engine_feeds(export, 9, 17)  # batch 9 > the default profile's 8
    with pytest.raises(MoeExportError, match="outside the engine's profile"):
        engine.infer(too_long)
