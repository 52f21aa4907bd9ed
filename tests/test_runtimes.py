"""The runner interface (activate / infer / deactivate), the runtime registry and the ORT / torch runners."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moe_export.errors import FormatError, InternalError, MoeExportError, RuntimeUnavailableError
from moe_export.export.manifest import Artifact
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.onnxruntime import OnnxRuntimeRunner, resolve_providers
from moe_export.runtimes.registry import RunnerOptions, get_factory, make_runner, register_runtime
from tests.artifacts import shared_export


class EchoRunner(Runner):
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def input_names(self) -> list[str]:
        return ["x"]

    def _activate(self) -> None:
        self.calls.append("activate")

    def _infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        return {"y": feeds["x"] * 2}

    def _deactivate(self) -> None:
        self.calls.append("deactivate")


def test_runner_lifecycle_and_errors() -> None:
    runner = EchoRunner()
    with pytest.raises(InternalError, match="activate"):
        runner.infer({"x": np.ones(2)})
    with pytest.raises(InternalError, match="no inference"):
        runner.last_inference_time()
    with runner:
        assert runner.infer({"x": np.ones(2)})["y"].tolist() == [2, 2]
        assert runner.last_inference_time() >= 0
        with pytest.raises(MoeExportError, match="missing inputs"):
            runner.infer({"z": np.ones(2)})
        with pytest.raises(InternalError, match="already active"):
            runner.activate()
    assert runner.calls == ["activate", "deactivate"] and not runner.is_active


def test_registry_plugs_in_and_rejects_unknown(tmp_path: Path) -> None:
    register_runtime("echo-test", lambda artifact, options: EchoRunner())
    assert isinstance(get_factory("echo-test")(None, RunnerOptions()), EchoRunner)  # type: ignore[arg-type]
    with pytest.raises(MoeExportError, match="unknown runtime"):
        get_factory("nope")
    with pytest.raises(MoeExportError, match="device"):
        RunnerOptions(device="tpu")
    with pytest.raises(FormatError, match="not found"):
        Artifact.open(tmp_path / "missing")
    with pytest.raises(FormatError, match=r"export\.json"):
        Artifact.open(tmp_path)


def test_unavailable_provider_is_a_clear_error() -> None:
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in _available():
        pytest.skip("this onnxruntime has the TensorRT EP")
    with pytest.raises(RuntimeUnavailableError, match="TensorrtExecutionProvider is not available"):
        resolve_providers(["tensorrt"])


def _available() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


@pytest.fixture(params=["as-configured", "off"], ids=["kernels", "function-bodies"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ORT sessions as configured (CI builds the native kernel library, so it is registered) and with
    MOE_EXPORT_KERNELS=off: the function bodies. (Was a second pytest run of this file in .ci/run.)"""
    if request.param == "off":
        monkeypatch.setenv("MOE_EXPORT_KERNELS", "off")
    return request.param


def test_onnxruntime_runner_errors(tmp_path: Path, kernels: str) -> None:
    with pytest.raises(FormatError, match="not found"):
        OnnxRuntimeRunner.from_path(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00not a model")
    runner = OnnxRuntimeRunner.from_path(broken)  # cheap: the session is built on activate
    with pytest.raises(FormatError, match=r"broken\.onnx"):
        runner.activate()


def test_torch_and_onnxruntime_runners_agree(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, kernels: str
) -> None:
    artifact = Artifact.open(shared_export(tmp_path_factory, tiny_base))
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 5))
    feeds = artifact.manifest.interface.complete_feeds({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    outputs = {}
    for name in ("torch", "onnxruntime"):
        runner = make_runner(name, artifact, RunnerOptions(threads=1))
        assert not runner.is_active
        with runner:
            outputs[name] = runner.infer(feeds)["logits"]
            assert runner.last_inference_time() > 0
            if name == "onnxruntime" and kernels == "off":
                assert not runner.kernel_note.startswith("native"), runner.kernel_note
            if name == "onnxruntime" and kernels == "as-configured" and os.environ.get("CI") == "true":
                assert runner.kernel_note.startswith("native"), runner.kernel_note  # CI builds the library
    assert outputs["torch"].shape == outputs["onnxruntime"].shape == (2, 5, 64)
    np.testing.assert_allclose(outputs["onnxruntime"], outputs["torch"], rtol=0, atol=1e-4)
    with make_runner("onnxruntime", artifact) as runner, pytest.raises(InternalError, match="inference failed"):
        runner.infer({**feeds, "input_ids": ids.astype(np.int32)})
