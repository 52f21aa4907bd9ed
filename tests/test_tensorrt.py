"""TensorRT engine build, QDP plugin and runner.

On CPU: shape/profile handling, options round trip, the one-line errors of `moe-export trt` without
TensorRT or without a GPU (nothing written), and the plugin's AOT implementation driven through a
stand-in `tensorrt.plugin` (real Triton PTX for sm_90, compiled without a GPU).
On a GPU (`pytest -m gpu`): fp32/fp16 engines, plugin and function body, against the PyTorch reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.errors import MoeExportError
from moe_export.export.manifest import ExportManifest
from moe_export.export.tensorrt import (
    TrtBuildOptions,
    inspect_onnx_dir,
    opt_feeds,
    parse_shapes,
    resolve_profiles,
)

REPO = Path(__file__).resolve().parents[1]


def _fake_export(directory: Path, max_positions: int = 64) -> Path:
    """An export dir whose model.onnx has our interface and one GroupedLoRA node (not meant to run)."""
    directory.mkdir(parents=True)
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*dims, 10])
    node = helper.make_node(
        "GroupedLoRA", ["x", "ids", "g", "A", "B"], ["logits"], domain="moe_export", plugin_namespace="moe_export"
    )
    graph = helper.make_graph([node], "g", inputs, [output])
    onnx.save(helper.make_model(graph), str(directory / "model.onnx"))
    manifest = ExportManifest("test", str(directory), str(directory), "canonical", "fp32", 20, model_file="model.onnx")
    manifest.save(directory)
    (directory / "config.json").write_text(json.dumps({"vocab_size": 10, "max_position_embeddings": max_positions}))
    return directory


def test_parse_shapes() -> None:
    assert parse_shapes("input_ids:1x128, attention_mask:8X64", "--opt-shapes") == {
        "input_ids": (1, 128),
        "attention_mask": (8, 64),
    }
    assert parse_shapes(None, "--min-shapes") == {}
    for bad in ("input_ids", "input_ids:1xa", ":1x2", "input_ids:-1x2"):
        with pytest.raises(MoeExportError, match="NAME:DxD"):
            parse_shapes(bad, "--max-shapes")


def test_build_options_round_trip_and_checks() -> None:
    options = TrtBuildOptions(plugin="on", opt_shapes={"input_ids": (2, 64)}, workspace_gib=2.0)
    assert TrtBuildOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    with pytest.warns(UserWarning, match="unknown keys"):
        assert TrtBuildOptions.from_dict({"plugin": "off", "from_the_future": 1}).plugin == "off"
    with pytest.raises(MoeExportError, match="--plugin"):
        TrtBuildOptions(plugin="maybe")
    with pytest.raises(MoeExportError, match="--workspace"):
        TrtBuildOptions(workspace_gib=0)


def test_default_and_given_profiles(tmp_path: Path) -> None:
    info = inspect_onnx_dir(_fake_export(tmp_path / "onnx", max_positions=64))
    assert info.grouped_lora_nodes == 1 and info.interface.input_names() == ["input_ids", "attention_mask"]
    profiles = resolve_profiles(info, TrtBuildOptions())
    # batch 1..8, sequence 1..min(512, max_position_embeddings), opt 1 x min(128, that)
    assert profiles["input_ids"] == ((1, 1), (1, 64), (8, 64))
    given = TrtBuildOptions(opt_shapes={"input_ids": (4, 32)}, max_shapes={"input_ids": (16, 64)})
    assert resolve_profiles(info, given)["input_ids"] == ((1, 1), (4, 32), (16, 64))
    feeds = opt_feeds(info, resolve_profiles(info, given))
    assert feeds["input_ids"].shape == (4, 32) and feeds["input_ids"].max() < 10
    assert (feeds["attention_mask"] == 1).all()
    for bad, message in (
        ({"opt_shapes": {"pixel_values": (1, 3)}}, "pixel_values"),
        ({"opt_shapes": {"input_ids": (1, 2, 3)}}, "rank 2"),
        ({"min_shapes": {"input_ids": (2, 100)}}, "min <= opt <= max"),
    ):
        with pytest.raises(MoeExportError, match=message):
            resolve_profiles(info, TrtBuildOptions(**bad))


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, ["trt", *args])


def _assert_one_line_error(result: object, code: int, *needles: str) -> None:
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == code, output  # type: ignore[attr-defined]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in output.replace("\n", " "), output


def test_cli_bad_input_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    export = _fake_export(tmp_path / "onnx")
    out = tmp_path / "engine"
    _assert_one_line_error(_invoke(str(tmp_path / "nope"), "-o", str(out)), 2, "nope", "not found")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_invoke(str(tmp_path / "empty"), "-o", str(out)), 2, "export.json")
    _assert_one_line_error(_invoke(str(export), "--plugin", "sometimes", "-o", str(out)), 2, "--plugin")
    _assert_one_line_error(_invoke(str(export), "--opt-shapes", "input_ids=1x2", "-o", str(out)), 2, "NAME:DxD")
    assert not out.exists()


def test_cli_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = tmp_path / "engine"
    result = _invoke(str(_fake_export(tmp_path / "onnx")), "-o", str(out))
    _assert_one_line_error(result, 2, "TensorRT is not installed", "pip install 'moe-export[gpu]'")
    assert "benchmarks/" not in result.output  # an installed package has no benchmarks/ folder to point to
    assert not out.exists() and not list(tmp_path.glob(".engine*"))


def test_cli_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "0-fake"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "engine"
    result = _invoke(str(_fake_export(tmp_path / "onnx")), "-o", str(out), "--plugin", "off")
    _assert_one_line_error(result, 2, "needs an NVIDIA GPU")
    assert not out.exists()


def test_cli_subprocess_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("moe-export")
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", "from moe_export.cli import main; main()"]
    proc = subprocess.run([*command, "trt", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing: artifact directory not found" in proc.stderr


def test_runner_needs_an_engine_and_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_export.errors import FormatError, RuntimeUnavailableError
    from moe_export.runtimes.tensorrt import runner_for_artifact

    artifact = types.SimpleNamespace(path=tmp_path)
    with pytest.raises(FormatError, match="moe-export trt"):
        runner_for_artifact(artifact, None)
    (tmp_path / "model.engine").write_bytes(b"not an engine")
    runner = runner_for_artifact(artifact, None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"):
        runner.activate()
    assert not runner.is_active


# The plugin module against a stand-in tensorrt.plugin: the decorators record the functions, shape
# expressions are constants or a symbol, and the AOT implementation compiles real PTX for sm_90.
PLUGIN_SCRIPT = textwrap.dedent(
    """
    import enum, json, os, sys, types
    os.environ.pop("TRITON_INTERPRET", None)
    trt, trtp = types.ModuleType("tensorrt"), types.ModuleType("tensorrt.plugin")
    class DataType(enum.Enum):
        FLOAT = 0; HALF = 1; BF16 = 2; INT32 = 3; INT64 = 4
    trt.DataType, trt.plugin = DataType, trtp
    recorded = {}
    def recorder(kind):
        return lambda plugin_id: (lambda fn: recorded.setdefault((kind, plugin_id), fn))
    trtp.register, trtp.autotune, trtp.aot_impl = recorder("register"), recorder("autotune"), recorder("aot_impl")
    class Expr:
        def __init__(self, v): self.v = v
        def is_constant(self): return isinstance(self.v, int)
        def constant_value(self): return self.v
    class TensorDesc:
        def __init__(self, shape, dtype): self.shape_expr, self.dtype = [Expr(v) for v in shape], dtype
    class SymIntExprs(list):
        from_tuple = classmethod(lambda cls, items: cls(items))
    class KernelLaunchParams: pass
    class AutoTuneCombination:
        def __init__(self, types, layouts, tactics): self.args = [types, layouts, list(tactics)]
    trtp.TensorDesc, trtp.SymIntExprs, trtp.KernelLaunchParams = TensorDesc, SymIntExprs, KernelLaunchParams
    trtp.AutoTuneCombination = AutoTuneCombination
    trtp.SymInt32 = lambda e: e.v if isinstance(e, Expr) else e
    trtp.cdiv = lambda a, b: ["cdiv", a.v, b]
    trtp.from_shape_expr = lambda shape, dtype: [[s.v for s in shape], dtype.name]
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp

    from moe_export.export import trt_plugin
    trt_plugin.AOT_TARGET = ("cuda", 90, 32)
    pid = trt_plugin.register_plugin()
    assert trt_plugin.register_plugin() == pid  # idempotent
    H, F, I64 = DataType.HALF, DataType.FLOAT, DataType.INT64
    x, ids, g = TensorDesc(["T", 1024], H), TensorDesc(["T", 2], I64), TensorDesc(["T", 2], F)
    A, B = TensorDesc([8, 8, 1024], H), TensorDesc([8, 512, 8], H)
    y = TensorDesc(["T", 512], H)
    result = {"id": pid, "out": recorded[("register", pid)](x, ids, g, A, B)}
    result["tune"] = [c.args for c in recorded[("autotune", pid)](x, ids, g, A, B, (y,))]
    for tactic in (1, 2, 4):
        name, ptx, launch, extra = recorded[("aot_impl", pid)](x, ids, g, A, B, (y,), tactic)
        result[tactic] = {"name": name, "grid": [launch.grid_x, launch.grid_y], "block": launch.block_x,
                          "shared": launch.shared_mem, "extra": list(extra), "sm90": ".target sm_90" in ptx}
    print(json.dumps(result))
    """
)


def test_plugin_aot_impl_with_stand_in_tensorrt() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", PLUGIN_SCRIPT], capture_output=True, text=True, timeout=240, env=env, cwd=REPO
    )
    if proc.returncode != 0 and "No module named 'triton'" in proc.stderr:
        pytest.skip("triton is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["id"] == "moe_export::GroupedLoRA"
    assert result["out"] == [["T", 512], "HALF"]  # [T, D_out] in x's dtype (strong typing)
    assert result["tune"] == [["FP16, INT64, FP32, FP16, FP16, FP16", "LINEAR", [1, 2, 3, 4]]]
    # tactic -> (token tile, outputs per program, threads); D_out = 512
    for tactic, (block_t, per_program, threads) in {
        "1": (16, 64, 128),
        "2": (32, 256, 128),
        "4": (64, 1024, 256),
    }.items():
        launch = result[tactic]
        assert launch["name"] == "grouped_lora_kernel" and launch["sm90"]
        assert launch["grid"] == [["cdiv", "T", block_t], -(-512 // per_program)]
        assert launch["block"] == threads and 0 < launch["shared"] < 48 * 1024  # no opt-in smem needed
        # SCALAR_ARGS order: T (symbolic), D_in, D_out, R, K, E, shared_a
        assert launch["extra"] == ["T", 1024, 512, 8, 2, 8, 0]


# ---------------------------------------------------------------- GPU: real engines (pytest -m gpu)


KINDS = ("decoder", "scoring")  # the KV-cache decoder (the default export) and --no-kv-cache


@pytest.fixture(scope="module")
def gpu_exports(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """fp32 and fp16 exports of one tiny checkpoint, of both kinds: `{kind}-{dtype}`, plus `ckpt`."""
    import moe_export
    from tests.artifacts import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("trt")
    ckpt = save_tiny_checkpoint(root / "ckpt", tiny_base)
    exports: dict[str, Path] = {"ckpt": ckpt}
    for kind in KINDS:
        for dtype in ("fp32", "fp16"):
            out = root / f"{kind}-{dtype}"
            loaded = moe_export.load(ckpt, base_model=tiny_base)
            # adapter_fusion off: TensorRT's plugin binds GroupedLoRA nodes (the fused ops import as their bodies)
            moe_export.export_onnx(
                loaded, out, dtype=dtype, kv_cache=kind == "decoder", validate=False, progress=False, fusion="none",
                adapter_fusion=False,
            )  # fmt: skip
            exports[f"{kind}-{dtype}"] = out
    return exports


def _reference_logits(ckpt: Path, base: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import moe_export

    model = moe_export.load(ckpt, base_model=base).model
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])
        )
    return out.logits.float().numpy()


def engine_feeds(export: Path, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A first step of the export's graph interface (a decoder's positions and empty past included)."""
    from moe_export.export.manifest import Artifact

    interface = Artifact.open(export).interface
    ids = np.random.default_rng(seed).integers(0, 64, size=(batch, seq), dtype=np.int64)
    return interface.complete_feeds({interface.tokens_name: ids})


def _engine_logits(export: Path, out: Path, plugin: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    from moe_export.export.tensorrt import TrtBuildOptions, build_engine
    from moe_export.runtimes.tensorrt import TensorRTRunner
    from moe_export.runtimes.trt_engine import median_ms

    report = build_engine(export, out, TrtBuildOptions(plugin=plugin), time_engine=median_ms)
    with TensorRTRunner(out / "model.engine") as runner:
        return runner.infer(feeds)["logits"].astype(np.float32), report


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plugin", ["off", "on"])
def test_fp32_engine_matches_reference(
    gpu_exports: dict[str, Path], tiny_base: Path, tmp_path: Path, plugin: str, kind: str
) -> None:
    export = gpu_exports[f"{kind}-fp32"]
    feeds = engine_feeds(export, 3, 17)
    expected = _reference_logits(gpu_exports["ckpt"], tiny_base, feeds)
    actual, report = _engine_logits(export, tmp_path / plugin, plugin, feeds)
    assert report["plugin"] == plugin
    assert (report["plugin_layers"] > 0) == (plugin == "on")
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_plugin_matches_function_body_and_reference(
    gpu_exports: dict[str, Path], tiny_base: Path, tmp_path: Path, kind: str
) -> None:
    export = gpu_exports[f"{kind}-fp16"]
    feeds = engine_feeds(export, 2, 33, seed=1)
    plugin, on = _engine_logits(export, tmp_path / "on", "on", feeds)
    # Built after the plugin in the same process: its creator must be out of the registry again.
    body, off = _engine_logits(export, tmp_path / "off", "off", feeds)
    assert on["plugin_layers"] == on["grouped_lora_nodes"] > 0 and off["plugin_layers"] == 0
    expected = _reference_logits(gpu_exports["ckpt"], tiny_base, feeds)
    scale = float(np.abs(expected).max())
    # fp16 end to end: each of 2 layers x 7 projections rounds to fp16 (2**-11 relative); routing stays
    # fp32. 2e-2 of the logits' scale covers that accumulation; a wrong expert or gate is far larger.
    np.testing.assert_allclose(plugin, body, rtol=2e-2, atol=2e-2 * scale)
    np.testing.assert_allclose(plugin, expected, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.gpu
def test_auto_keeps_the_faster_path_and_says_why(gpu_exports: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["trt", str(gpu_exports["decoder-fp16"]), "-o", str(tmp_path / "auto"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "auto" / "engine.json").read_text())
    latency = report["latency_ms_at_opt"]
    assert report["plugin"] == min(latency, key=latency.get)
    assert report["reason"].startswith("auto:") and set(report["build_seconds"]) == {"off", "on"}


@pytest.mark.parametrize(
    ("plugin", "nodes", "unavailable", "timer", "paths", "why"),
    [
        ("off", 3, None, True, ["off"], "requested --plugin off"),
        ("on", 3, None, False, ["on"], "requested --plugin on"),
        ("auto", 0, None, True, ["off"], "no GroupedLoRA nodes"),
        ("auto", 3, "no TensorRT plugins", True, ["off"], "plugin unavailable: no TensorRT plugins"),
        ("auto", 3, None, False, ["on"], "without timing"),
        ("auto", 3, None, True, ["off", "on"], ""),
    ],
)
def test_plugin_paths_follow_the_option_and_the_graph(
    plugin: str, nodes: int, unavailable: str | None, timer: bool, paths: list[str], why: str
) -> None:
    """Which engines `trt --plugin` builds, decided without TensorRT (build_engine passes what it found)."""
    from moe_export.export.tensorrt import plugin_paths

    got, reason = plugin_paths(plugin, nodes, unavailable, (lambda engine, feeds: 1.0) if timer else None)
    assert got == paths and why in reason


def test_plugin_on_refused_when_the_plugin_is_unavailable() -> None:
    from moe_export.errors import RuntimeUnavailableError
    from moe_export.export.tensorrt import plugin_paths

    with pytest.raises(RuntimeUnavailableError, match="--plugin on: too old"):
        plugin_paths("on", 3, "too old", None)
