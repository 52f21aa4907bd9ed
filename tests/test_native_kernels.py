"""The native ORT kernels (moe_export/runtimes/native) against float64 per-token math and the function bodies.

Single-node models carry the same function body the exporter attaches, so one file runs both ways:
with the library registered ORT runs the kernel, without it the body. Every instruction-set path this
CPU has (avx512, avx2, portable) is exercised through MOE_EXPORT_KERNEL_ISA. Whole-model parity on
family samples runs the exported model with and without the library against the torch reference.
Without a compiler or the ORT headers the kernel tests skip and say why (CI fetches the headers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from moe_export.export.onnx_ops import grouped_lora_dense_body
from moe_export.export.onnx_slots import grouped_lora_slots_body
from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES
from moe_export.runtimes import native
from moe_export.runtimes.native import library as native_library
from tests.artifacts import sample_export
from tests.conftest import native_library_or_skip

ISAS = ("avx512", "avx2", "portable")
NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def library() -> Path:
    return native_library_or_skip()


def loop_reference(x, ids, gates, A, B) -> np.ndarray:
    """y[t] = sum_j g[t,j] B[e] (A[e or 0] x[t]) in float64, one token and slot at a time; gates None: per slot."""
    x, A, B = (np.asarray(v, dtype=np.float64) for v in (x, A, B))
    T, K = ids.shape
    out = np.zeros((T, B.shape[1]) if gates is not None else (T, K, B.shape[1]))
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            term = B[e] @ (A[0 if A.shape[0] == 1 else e] @ x[t])
            if gates is None:
                out[t, j] = term
            else:
                out[t] += float(gates[t, j]) * term
    return out


def single_node_model(op: str, x, ids, gates, A, B, weights_constant: bool) -> bytes:
    """One moe_export node over graph inputs (A, B as initializers or as inputs) plus its function body."""
    t = NP_TO_ONNX[x.dtype.type]
    names = ["x", "ids", "gates", "A", "B"] if gates is not None else ["x", "ids", "A", "B"]
    values = dict(zip(names, [x, ids, gates, A, B] if gates is not None else [x, ids, A, B], strict=True))
    types = {"x": t, "A": t, "B": t, "ids": TensorProto.INT64}
    if gates is not None:
        types["gates"] = NP_TO_ONNX[gates.dtype.type]
    weights = ("A", "B") if weights_constant else ()
    inputs = [helper.make_tensor_value_info(n, types[n], list(values[n].shape)) for n in names if n not in weights]
    inits = [numpy_helper.from_array(values[n], n) for n in weights]
    node = helper.make_node(op, names, ["y"], domain=DOMAIN, **PLUGIN_ATTRIBUTES)
    body = grouped_lora_dense_body(18) if op == "GroupedLoRA" else grouped_lora_slots_body(18)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", t, None)], initializer=inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[body]).SerializeToString()


def run(model: bytes, feeds: dict[str, np.ndarray], library: Path | None, threads: int = 2) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library is not None:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]


@st.composite
def problems(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E + 1))  # K = E: dense routers; K > E forces repeated ids
    R = draw(st.integers(1, 20))  # 8-row shrink blocks and the one-row remainder
    # 0: empty input; < 4 per-token path, >= 4 expert-grouped path, 300: more than one 256-token block
    T = draw(st.sampled_from([0, 1, 2, 5, 33, 70, 300]))
    d_in = draw(st.sampled_from([1, 3, 8, 17, 64, 130]))  # vector tails for every width (4, 8, 16)
    d_out = draw(st.sampled_from([1, 5, 16, 33, 64, 150]))  # 4-vector blocks, single vectors, scalar tail
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ids = rng.integers(0, E, (T, K))
    if draw(st.booleans()) and K > 1:
        ids[:, 1] = ids[:, 0]  # ties: one expert twice in a token, gates add up
    gates = rng.random((T, K), dtype=np.float32)
    if draw(st.booleans()) and T > 0:
        gates[0, 0] = 0.0  # an unselected slot (top-p padding)
    return {
        "x": rng.standard_normal((T, d_in), dtype=np.float32),
        "ids": ids.astype(np.int64),
        "gates": gates,
        "A": rng.standard_normal((1 if draw(st.booleans()) else E, R, d_in), dtype=np.float32),
        "B": rng.standard_normal((E, d_out, R), dtype=np.float32),
        "constant": draw(st.booleans()),
    }


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)) if want.size else 0.0


def term_err(got: np.ndarray, want: np.ndarray, p: dict, gates: np.ndarray | None) -> float:
    """max |got - want| over the largest sum of absolute terms, sum |g| |B| (|A| |x|): fp32 rounding is
    relative to the terms summed, not to an output that cancellation made small (a 1x1 output of 0.15 from
    terms of magnitude ~10 is off by 4e-5 of itself, well within fp32 rounding of those terms)."""
    assert got.shape == want.shape and np.isfinite(got).all()
    if not want.size:
        return 0.0
    scale = loop_reference(
        np.abs(p["x"]), p["ids"], None if gates is None else np.abs(gates), np.abs(p["A"]), np.abs(p["B"])
    )
    return float(np.abs(got - want).max() / max(np.abs(scale).max(), 1e-30))


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_grouped_lora_fp32_matches_loop_and_body(library: Path, isa: str, p: dict, monkeypatch) -> None:
    monkeypatch.setenv("MOE_EXPORT_KERNEL_ISA", isa)
    model = single_node_model("GroupedLoRA", p["x"], p["ids"], p["gates"], p["A"], p["B"], p["constant"])
    want = loop_reference(p["x"], p["ids"], p["gates"], p["A"], p["B"])
    got = run(model, p, library)
    # fp32 sums of <= 150 products against float64: 1e-5 of the summed terms' magnitude is ~100 ulps of headroom.
    assert term_err(got, want, p, p["gates"]) <= 1e-5
    assert term_err(got, run(model, p, None).astype(np.float64), p, p["gates"]) <= 1e-5  # the body, T = 0 too


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_slots_fp32_matches_loop_and_body(library: Path, isa: str, p: dict, monkeypatch) -> None:
    monkeypatch.setenv("MOE_EXPORT_KERNEL_ISA", isa)
    model = single_node_model("GroupedLoRASlots", p["x"], p["ids"], None, p["A"], p["B"], p["constant"])
    want = loop_reference(p["x"], p["ids"], None, p["A"], p["B"])
    got = run(model, p, library)
    assert term_err(got, want, p, None) <= 1e-5
    assert term_err(got, run(model, p, None).astype(np.float64), p, None) <= 1e-5  # the body, T = 0 too


@pytest.mark.parametrize("gate_dtype", [np.float32, np.float16])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_fp16_inputs_are_correct(library: Path, gate_dtype: type, p: dict) -> None:
    """fp16 in and out, fp32 inside: the error is the final fp16 rounding (2^-11 relative) and no more."""
    x, A, B = (p[k].astype(np.float16) for k in ("x", "A", "B"))
    gates = p["gates"].astype(gate_dtype)
    model = single_node_model("GroupedLoRA", x, p["ids"], gates, A, B, p["constant"])
    got = run(model, {"x": x, "ids": p["ids"], "gates": gates, "A": A, "B": B}, library)
    assert got.dtype == np.float16
    want = loop_reference(x, p["ids"], gates, A, B)  # the same fp16-rounded inputs, in float64
    scale = np.abs(want).max() if want.size else 1.0
    assert (np.abs(got.astype(np.float64) - want) <= 2.0**-10 * np.abs(want) + 1e-5 * scale).all()


def test_kernel_claims_the_node_and_checks_ids(library: Path) -> None:
    """With the library the kernel (not the body) runs: its own message for an out-of-range expert id."""
    rng = np.random.default_rng(0)
    p = {"x": rng.standard_normal((3, 8), dtype=np.float32), "ids": np.array([[0], [3], [1]], dtype=np.int64)}
    p["gates"] = np.ones((3, 1), dtype=np.float32)
    A, B = rng.standard_normal((2, 4, 8), dtype=np.float32), rng.standard_normal((2, 5, 4), dtype=np.float32)
    model = single_node_model("GroupedLoRA", p["x"], p["ids"], p["gates"], A, B, True)
    with pytest.raises(Exception, match=r"expert id 3 outside \[0, E\)"):
        run(model, p, library)


def test_build_is_cached_and_status_reports_it(library: Path) -> None:
    assert native.build() == library  # second call: same hashed path, no rebuild
    state = native.status()
    assert state.library == library and state.isa in ISAS and state.api_version is not None


def test_bad_header_override_names_the_variable(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_EXPORT_ORT_INCLUDE", str(tmp_path))
    with pytest.raises(native.KernelBuildError, match="MOE_EXPORT_ORT_INCLUDE"):
        native.build()


def test_api_version_mismatch_registers_nothing_and_sessions_say_bodies(
    library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A library asking for an ORT API this runtime lacks (built here with a version no runtime offers) refuses
    registration with its own message; moe-export's sessions then run the function bodies, say so in the kernel
    note and print one notice; and the library's kernels never run. (Before: GetApi returned null, registration
    "succeeded" with nothing registered, and the note claimed native kernels.)"""
    from moe_export.runtimes.onnxruntime import session_builder

    mismatched = tmp_path / "libmismatch.so"
    native_library.compile_library(
        native_library.compiler(), native_library.find_headers(), mismatched, ("MOE_EXPORT_ORT_API_VERSION=9999",)
    )
    with pytest.raises(Exception, match=r"need ONNX Runtime API 9999 .*nothing was registered"):
        ort.SessionOptions().register_custom_ops_library(str(mismatched))

    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)
    monkeypatch.setattr(native_library, "_session_library", {})
    monkeypatch.setattr(native_library, "build", lambda **_: mismatched)
    rng = np.random.default_rng(1)
    p = {"x": rng.standard_normal((5, 8), dtype=np.float32), "ids": rng.integers(0, 3, (5, 2)).astype(np.int64)}
    p["gates"] = rng.random((5, 2), dtype=np.float32)
    A, B = rng.standard_normal((3, 4, 8), dtype=np.float32), rng.standard_normal((3, 6, 4), dtype=np.float32)
    model = single_node_model("GroupedLoRA", p["x"], p["ids"], p["gates"], A, B, True)
    capsys.readouterr()
    for _ in range(2):
        session = session_builder(model)()
        assert session.moe_export_kernels.startswith("function bodies"), session.moe_export_kernels
        assert "API 9999" in session.moe_export_kernels
        got = session.run(None, {k: p[k] for k in ("x", "ids", "gates")})[0]
        assert rel_err(got, loop_reference(p["x"], p["ids"], p["gates"], A, B)) <= 1e-5
    assert capsys.readouterr().err.count("native GroupedLoRA kernels unavailable") == 1
    assert native.kernel_calls(mismatched) == 0


def test_build_key_follows_the_compiler_version(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same compiler path reporting another version (an upgraded compiler) gets another build folder."""
    real = native_library.compiler()
    wrapper = tmp_path / "c++"

    def install(version: str) -> Path:
        wrapper.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
        path = native_library.library_path()
        assert path is not None
        return path

    monkeypatch.setenv("CXX", str(wrapper))
    first = install("c++ (fake) 12.2.0")
    upgraded = install("c++ (fake) 14.1.0 upgraded")
    assert upgraded != first and upgraded.name == first.name
    assert install("c++ (fake) 12.2.0") == first  # the key is the version, not the moment


def test_ci_fails_instead_of_skipping_when_the_build_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_EXPORT_ORT_INCLUDE", str(tmp_path))  # no headers there: the build fails
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the native kernel library must build here"):
        native_library_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not buildable here"):
        native_library_or_skip()


def test_fetched_headers_are_pinned_and_checksummed(tmp_path: Path) -> None:
    """The Debian package is fetched at one version and its .deb must match the pinned SHA-256."""
    assert "=" not in native_library.DEBIAN_VERSION and native_library.DEBIAN_VERSION.startswith("1.21.")
    assert all(len(v) == 64 for v in native_library.DEBIAN_SHA256.values())
    deb = tmp_path / "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
    deb.write_bytes(b"not the pinned package")
    with pytest.raises(native.KernelBuildError, match="is not the pinned"):
        native_library._check_sha256(deb, native_library.DEBIAN_SHA256["amd64"])
    native_library._check_sha256(deb, hashlib.sha256(deb.read_bytes()).hexdigest())


SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["goat", "hydralora", "mixlora", "loramoe"])
def test_whole_model_parity_with_and_without_library(
    library: Path, family: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch
) -> None:
    """top-k (GOAT), shared A (HydraLoRA), slots (MixLoRA), dense k = E (LoRAMoE): both ways match torch, the
    default export (residual Adds and top-k routers fused: GroupedLoRAAdd, RoutedGroupedLoRAAdd) and one written
    with --no-adapter-fusion (GroupedLoRA and the routers in standard ops), with the kernels and with the bodies."""
    import torch

    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)  # this test runs both ways itself
    monkeypatch.setattr(native_library, "_session_library", {})  # forget an earlier "not built yet"

    import moe_export
    from moe_export.runtimes.onnxruntime import OnnxRuntimeRunner

    result = sample_export(tmp_path_factory, SAMPLES / family)  # the run's default export of the sample (read only)
    reference = moe_export.load(SAMPLES / family).model
    moe_export.export_onnx(moe_export.load(SAMPLES / family), tmp_path / "unfused", validate=False, progress=False,
                           adapter_fusion=False)  # fmt: skip
    unfused = onnx.load(str(tmp_path / "unfused" / "model.onnx"), load_external_data=False)
    fused = onnx.load(str(result.model_path), load_external_data=False)
    plain_nodes = sum(n.op_type == "GroupedLoRA" for n in unfused.graph.node)
    fused_nodes = sum(n.op_type in ("GroupedLoRAAdd", "RoutedGroupedLoRAAdd") for n in fused.graph.node)
    assert plain_nodes == fused_nodes and not any(n.op_type == "GroupedLoRA" for n in fused.graph.node)
    vocab = int(reference.config.vocab_size)
    for batch, seq in ((1, 1), (2, 17), (3, 40)):
        ids = np.random.default_rng(seq).integers(0, vocab, (batch, seq))
        # The decoder export's first step (past length 0): the default export is the KV-cache decoder.
        feeds = result.manifest.interface.complete_feeds({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        with torch.no_grad():
            want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids * 0 + 1)).logits
        for path in (result.model_path, tmp_path / "unfused" / "model.onnx"):
            for use_library in (True, False):
                with OnnxRuntimeRunner.from_path(path, native_kernels=use_library) as runner:
                    got = runner.infer(feeds)["logits"]
                    assert runner.kernel_note.startswith("native") == use_library, runner.kernel_note
                assert rel_err(got, want.double().numpy()) <= 1e-5, (family, path.name, batch, seq, use_library)
