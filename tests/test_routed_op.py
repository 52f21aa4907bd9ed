"""RoutedGroupedLoRA(Add): the router pass (export/onnx_routed.py), its function body and its native kernels.

- The pass on an export written without it: every softmax top-k router moves into its node, and plain ONNX
  Runtime gives bit-for-bit the unfused graph's outputs (the body is the traced chain, op for op), in fp32 and
  in fp16 with a router that runs in the model's dtype (MoLA).
- The native kernels against the body on single nodes: same experts (an exact tie goes to the lower id, as
  TopK; a choice that differs must be a near-tie of fp32 rounding), gates and outputs within fp32 rounding.
The fused default export's validation, route replay and mutated-weight failures run in test_onnx_export.py,
test_route_override.py and test_mutations.py, which use the default (fused) exports.
Legend: T tokens, E experts, K slots, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import moe_export
from moe_export.export.graph_rewrite import GraphIndex
from moe_export.export.manifest import ExportManifest
from moe_export.export.onnx_routed import fuse_adapter, routed_body
from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES, ROUTED_GROUPED_LORA, ROUTED_GROUPED_LORA_ADD
from tests.artifacts import shared_dir
from tests.conftest import SAMPLES, native_library_or_skip

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def library() -> Path:
    return native_library_or_skip()


def unfused_export(factory: pytest.TempPathFactory, sample: str, dtype: str) -> Path:
    def build(root: Path) -> None:
        loaded = moe_export.load(SAMPLES / sample)
        moe_export.export_onnx(loaded, root, validate=False, progress=False, dtype=dtype, adapter_fusion=False)

    return shared_dir(factory, f"unfused-{sample}-{dtype}", build)


def session(model: bytes | str, library: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("sample", "dtype"), [("goat", "fp32"), ("mola", "fp16"), ("goat", "fp16")])
def test_body_is_bit_for_bit_the_unfused_graph(sample: str, dtype: str, tmp_path_factory) -> None:
    """goat: fp32 top-2 renormalised; mola: fp16 export whose router runs in fp16 (Cast x, fp16 MatMul, Cast to
    fp32 before the softmax, gates cast back to fp16); goat fp16: one Cast of x read by the q/k/v (and gate/up)
    routers, which goes with the last of them."""
    out = unfused_export(tmp_path_factory, sample, dtype)
    manifest = ExportManifest.load(out)
    assert manifest.adapter_fusion == {"requested": False, "residual_adds": 0, "routers": 0, "views": 0}
    plain = onnx.load(str(out / "model.onnx"))
    fused = onnx.load(str(out / "model.onnx"))
    routed = sum(n.op_type == "GroupedLoRA" for n in plain.graph.node)
    counts = fuse_adapter(fused)
    assert routed and counts == {"residual_adds": routed, "routers": routed, "views": counts["views"]}
    assert {n.op_type for n in fused.graph.node if n.domain == DOMAIN} == {ROUTED_GROUPED_LORA_ADD}
    # The views went: each residual Add took one Reshape with it, each dropped view one more; every routed node
    # reads its x as [batch, sequence, D_in], so the body below flattens a 3-D x.
    reshapes = [sum(n.op_type == "Reshape" for n in m.graph.node) for m in (plain, fused)]
    assert counts["views"] > 0 and reshapes[0] - reshapes[1] == routed + counts["views"]
    assert routed_x_shapes(fused) == {"batch", "sequence"}
    assert not any(n.op_type in ("TopK", "ReduceSum") for n in fused.graph.node)  # every router moved in
    read = {name for n in fused.graph.node for name in n.input} | {o.name for o in fused.graph.output}
    assert all(n.output[0] in read for n in fused.graph.node if n.op_type == "Cast")  # no Cast of x left unread
    assert [f.name for f in fused.functions] == [ROUTED_GROUPED_LORA_ADD]
    onnx.checker.check_model(fused, full_check=True)
    plain_session, fused_session = session(plain.SerializeToString()), session(fused.SerializeToString())
    for batch, seq in ((1, 1), (2, 9), (3, 33)):
        ids = np.random.default_rng(seq).integers(0, 64, (batch, seq))
        feeds = manifest.interface.complete_feeds({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        feeds = {i.name: feeds[i.name] for i in plain_session.get_inputs()}
        for want, got in zip(plain_session.run(None, feeds), fused_session.run(None, feeds), strict=True):
            assert np.array_equal(want, got), (sample, dtype, batch, seq)


def test_default_export_reads_x_unviewed_and_validates(tmp_path_factory: pytest.TempPathFactory) -> None:
    """samples/goat's default export: no Reshape to [T, D_in] is left before a routed node (2 layers x 4 distinct
    x: q/k/v, o, gate/up, down), and validation passes with the native kernels and with the bodies, its route
    replay and per-unit op check reading the taps of 3-D x."""

    def build(root: Path) -> None:
        moe_export.export_onnx(moe_export.load(SAMPLES / "goat"), root, validate=False, progress=False)

    out = shared_dir(tmp_path_factory, "fused-goat-fp32", build)
    assert ExportManifest.load(out).adapter_fusion == {
        "requested": True,
        "residual_adds": 14,
        "routers": 14,
        "views": 8,
    }
    assert routed_x_shapes(onnx.load(str(out / "model.onnx"), load_external_data=False)) == {"batch", "sequence"}
    report = moe_export.validate(out, runtimes=("torch", "onnxruntime", "onnxruntime-body"), new_tokens=4)
    assert report.passed, report.failures()
    assert {c.runtime for c in report.comparisons} == {"onnxruntime", "onnxruntime-body"}
    assert all(c.replayed for c in report.comparisons)
    for runtime, units in report.units.items():
        assert len(units) == 14, runtime
        for unit in units.values():
            assert unit.tokens > 0 and unit.op_max_abs is not None and unit.op_max_abs <= unit.op_bound, unit


def routed_x_shapes(model: onnx.ModelProto) -> set[str]:
    """The leading dims of every routed node's x, as the graph declares them (each x must be declared [.., D])."""
    g = GraphIndex.of(model.graph)
    leading = set()
    for node in model.graph.node:
        if node.op_type in (ROUTED_GROUPED_LORA, ROUTED_GROUPED_LORA_ADD):
            shape = g.shape(node.input[0])
            assert shape is not None and isinstance(shape[-1], int), (node.name, shape)
            leading |= set(shape[:-1])
    return leading


def routed_model(p: dict, add: bool) -> bytes:
    """One RoutedGroupedLoRA(Add) node over graph inputs (weights as initializers when p["constant"]) plus its body."""
    t, tw = NP_TO_ONNX[p["x"].dtype.type], NP_TO_ONNX[p["W"].dtype.type]
    names = ["x", "W", "A", "B", *(["base"] if add else [])]
    types = {"x": t, "W": tw, "A": t, "B": t, "base": t}
    weights = ("W", "A", "B") if p["constant"] else ()
    inputs = [helper.make_tensor_value_info(n, types[n], list(p[n].shape)) for n in names if n not in weights]
    op = ROUTED_GROUPED_LORA_ADD if add else ROUTED_GROUPED_LORA
    node = helper.make_node(
        op, names, ["y", "ids", "gates"], domain=DOMAIN, k=p["k"], normalize=p["normalize"], **PLUGIN_ATTRIBUTES
    )
    outputs = [helper.make_tensor_value_info(n, types.get(n, t), None) for n in ("y", "gates")]
    outputs.insert(1, helper.make_tensor_value_info("ids", TensorProto.INT64, None))
    graph = helper.make_graph(
        [node], "g", inputs, outputs, initializer=[numpy_helper.from_array(p[n], n) for n in weights]
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[routed_body(op, 18)]).SerializeToString()


def run_body(p: dict, add: bool) -> list[np.ndarray]:
    """The body's outputs (y, expert_ids, gates) for problem `p` (a graph input for every array)."""
    model = session(routed_model({**p, "constant": False}, add))
    return model.run(None, {n: p[n] for n in ("x", "W", "A", "B", *(["base"] if add else []))})


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lead", [(2, 5), (2, 3, 4), (0, 3), (1, 1)])
def test_body_takes_x_of_any_rank(lead: tuple[int, ...], dtype: type, add: bool) -> None:
    """x [..., D_in] gives bit for bit what its [T, D_in] view gives (T the product of the leading dims):
    expert_ids and gates [T, K], y [T, D_out] for the plain form and base's shape for the Add form."""
    rng = np.random.default_rng(len(lead))
    d_in, d_out, E, R, k = 24, 8, 6, 3, 2
    T = int(np.prod(lead))
    p = {
        "x": rng.standard_normal((*lead, d_in)).astype(dtype),
        "W": rng.standard_normal((d_in, E)).astype(np.float32),
        "A": (rng.standard_normal((E, R, d_in)) * 0.3).astype(dtype),
        "B": (rng.standard_normal((E, d_out, R)) * 0.3).astype(dtype),
        "base": rng.standard_normal((*lead, d_out)).astype(dtype),
        "k": k, "normalize": 1,
    }  # fmt: skip
    y, ids, gates = run_body(p, add)
    flat = {**p, "x": p["x"].reshape(T, d_in), "base": p["base"].reshape(T, d_out)}
    y_flat, ids_flat, gates_flat = run_body(flat, add)
    assert ids.shape == gates.shape == (T, k) and ids.dtype == np.int64 and gates.dtype == dtype
    assert y.shape == ((*lead, d_out) if add else (T, d_out)) and y.dtype == dtype
    np.testing.assert_array_equal(ids, ids_flat)
    np.testing.assert_array_equal(gates, gates_flat)
    np.testing.assert_array_equal(y.reshape(T, d_out), y_flat)
    if T:  # the node computed something: the delta is not zero
        assert np.abs(y_flat - (flat["base"] if add else 0)).max() > 0


def run_both(p: dict, add: bool, library: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(body outputs, native outputs): y, expert_ids, gates."""
    model = routed_model(p, add)
    feeds = {n: p[n] for n in ("x", "W", "A", "B", "base") if n in p}
    body, native = session(model), session(model, library)
    wanted = {i.name for i in body.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    return body.run(None, feeds), native.run(None, feeds)


def tokens(p: dict) -> np.ndarray:
    """x's rows [T, D_in] (x [..., D_in])."""
    return p["x"].reshape(-1, p["x"].shape[-1])


def probabilities(p: dict) -> np.ndarray:
    """[T, E] softmax of x W in float64 (how close two experts' probabilities are)."""
    logits = tokens(p).astype(np.float64) @ p["W"].astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@st.composite
def problems(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 12))  # one 8-row dot-product block, and the rows past it
    T = draw(st.sampled_from([0, 1, 3, 5, 70]))  # 70: the parallel routing path and the expert-grouped op
    d_in, d_out, R = draw(st.sampled_from([1, 17, 64])), draw(st.sampled_from([1, 33])), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    router_dtype = draw(st.sampled_from([np.float32, dtype]))
    # x [..., D_in] of rank 2 to 4 with T rows (the exports' [batch, sequence, D_in] among them). Not [1, 0, D]:
    # the Add body's Reshape of the delta to base's shape reads a 0 in base's shape as "copy that dim", so base
    # [1, 0, D_out] fails there whatever x's rank (no export feeds a zero-length sequence).
    lead = draw(st.sampled_from([(T,), (T, 1), *([(1, T)] if T else []), *([(7, 10), (2, 5, 7)] if T == 70 else [])]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((T, d_in)).astype(dtype)
    if T > 1 and draw(st.booleans()):
        x[1] = 0  # every logit 0: all experts tie, TopK takes the lowest ids
    return {
        "x": x.reshape(*lead, d_in),
        "W": rng.standard_normal((d_in, E)).astype(router_dtype),
        "A": (rng.standard_normal((1 if draw(st.booleans()) else E, R, d_in)) * 0.3).astype(dtype),
        "B": (rng.standard_normal((E, d_out, R)) * 0.3).astype(dtype),
        "base": rng.standard_normal((*lead, d_out)).astype(dtype),
        "k": draw(st.integers(1, E)),
        "normalize": int(draw(st.booleans())),
        "constant": draw(st.booleans()),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems(), add=st.booleans())
def test_native_kernel_matches_the_body(library: Path, p: dict, add: bool) -> None:
    (y_body, ids_body, g_body), (y_native, ids_native, g_native) = run_both(p, add, library)
    x = tokens(p)  # [T, D_in]
    assert ids_native.shape == ids_body.shape == (x.shape[0], p["k"]) and g_native.dtype == p["x"].dtype
    assert y_native.shape == y_body.shape == (p["base"].shape if add else (x.shape[0], p["B"].shape[1]))
    same = (ids_native == ids_body).all(-1)  # [T]
    probs = probabilities(p)
    logits = x.astype(np.float64) @ p["W"].astype(np.float64)  # [T, E]
    # How far rounding can move a logit: a fp16 router's MatMul may accumulate in fp16 (ORT's CPU kernel), up to
    # D_in roundings of 2^-11 of the running sum, bounded by sum_i |x_i W_ie|; the kernel sums in fp32 and
    # rounds once.
    reach = x.shape[1] * 2.0**-11 * (np.abs(x).astype(np.float64) @ np.abs(p["W"]).astype(np.float64))
    for t in np.flatnonzero(~same):
        # A different choice is only allowed where rounding can decide it: the experts the two sides disagree on
        # have probabilities within 1e-5 (fp32 router) or logits within their rounding reach (fp16 router).
        differ = np.setxor1d(ids_native[t], ids_body[t])
        if p["W"].dtype == np.float16:
            gap = logits[t, differ].max() - logits[t, differ].min()
            assert gap <= 2 * reach[t, differ].max(), (t, gap, reach[t, differ])
        else:
            chosen = probs[t, differ]
            assert chosen.max() - chosen.min() <= 1e-5, (t, chosen)
    half = p["x"].dtype == np.float16
    # gates: fp32 softmax of identical logits up to the dot products' summation order; fp16 gates round to
    # 2^-11 relative, one step either way
    gate_tol = 2e-3 if half or p["W"].dtype == np.float16 else 2e-6
    np.testing.assert_allclose(g_native[same].astype(np.float64), g_body[same].astype(np.float64), atol=gate_tol)
    if add:
        y_native, y_body = y_native - p["base"], y_body - p["base"]
    y_native, y_body = (y.reshape(x.shape[0], y.shape[-1]) for y in (y_native, y_body))  # [T, D_out]
    largest_x = float(np.abs(x).max(initial=0))
    scale = np.abs(p["B"]).max() * np.abs(p["A"]).max() * largest_x * x.shape[1] * p["A"].shape[1] * p["k"]
    tol = (2e-2 if half else 2e-5) * max(scale, 1.0)  # fp32 rounding of the sums (fp16 outputs round to 2^-11)
    np.testing.assert_allclose(y_native[same].astype(np.float64), y_body[same].astype(np.float64), atol=tol)


def test_ties_go_to_the_lower_expert_id(library: Path) -> None:
    """Experts 1 and 3 have the same router column (exactly equal probabilities), so do 4..7: TopK's order (lower
    id first) on both sides, and x = 0 (all experts equal) routes to 0..k-1."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 8)).astype(np.float32)
    W[:, 3] = W[:, 1]
    W[:, 5] = W[:, 6] = W[:, 7] = W[:, 4]
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[0] = 0
    p = {
        "x": x, "W": W, "k": 3, "normalize": 1, "constant": True,
        "A": rng.standard_normal((8, 2, 16)).astype(np.float32), "B": rng.standard_normal((8, 4, 2)).astype(np.float32),
    }  # fmt: skip
    (_, ids_body, _), (_, ids_native, _) = run_both(p, False, library)
    assert ids_body[0].tolist() == ids_native[0].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(ids_native, ids_body)
    for row in ids_native:  # a tied pair is always taken lower id first
        for lower, higher in ((1, 3), (4, 5), (5, 6), (6, 7)):
            if higher in row and lower in row:
                assert list(row).index(lower) < list(row).index(higher)


@pytest.mark.parametrize("add", [False, True])
def test_native_kernel_takes_x_of_any_rank(library: Path, add: bool) -> None:
    """The kernel on x [2, 5, D_in] and [2, 5, 1, D_in] gives bit for bit what it gives on the same rows as
    [10, D_in] (the same arithmetic per token), and matches the body there (test_native_kernel_matches_the_body
    judges near-ties; this seed has none, so the routing must be the same)."""
    rng = np.random.default_rng(3)
    d_in, d_out, E, R = 32, 16, 6, 4
    x = rng.standard_normal((10, d_in)).astype(np.float32)
    p = {
        "W": rng.standard_normal((d_in, E)).astype(np.float32), "k": 2, "normalize": 1, "constant": True,
        "A": (rng.standard_normal((E, R, d_in)) * 0.3).astype(np.float32),
        "B": (rng.standard_normal((E, d_out, R)) * 0.3).astype(np.float32),
    }  # fmt: skip
    base = rng.standard_normal((10, d_out)).astype(np.float32)
    _, flat_native = run_both({**p, "x": x, "base": base}, add, library)
    for lead in ((2, 5), (2, 5, 1)):
        shaped = {**p, "x": x.reshape(*lead, d_in), "base": base.reshape(*lead, d_out)}
        body, native = run_both(shaped, add, library)
        assert native[0].shape == body[0].shape == ((*lead, d_out) if add else (10, d_out))
        for got, want in zip(native, flat_native, strict=True):
            np.testing.assert_array_equal(got.reshape(want.shape), want)
        np.testing.assert_array_equal(native[1], body[1])  # expert_ids
        np.testing.assert_allclose(native[2], body[2], atol=2e-6)  # gates: fp32 rounding, as above
        np.testing.assert_allclose(native[0], body[0], atol=2e-4)  # y: fp32 sums of about 100 terms of size 1
    assert np.abs(flat_native[0] - (base if add else 0)).max() > 0.1  # the experts added something


def base_from_matmul_model(p: dict, base_is_output: bool) -> bytes:
    """-(RoutedGroupedLoRAAdd) whose base is a MatMul's output, as in an export (a graph input is never reused):
    read by this node only, or also a graph output (then ONNX Runtime must not run the op in base's buffer)."""
    t = NP_TO_ONNX[p["x"].dtype.type]
    inits = [numpy_helper.from_array(p[n], n) for n in ("W", "A", "B", "Wb")]
    nodes = [
        helper.make_node("MatMul", ["x", "Wb"], ["base"]),
        helper.make_node(
            ROUTED_GROUPED_LORA_ADD,
            ["x", "W", "A", "B", "base"],
            ["sum", "ids", "gates"],
            domain=DOMAIN,
            k=p["k"],
            normalize=p["normalize"],
            **PLUGIN_ATTRIBUTES,
        ),
        helper.make_node("Neg", ["sum"], ["y"]),  # a graph output never shares a buffer: read the sum in the graph
    ]
    outputs = [helper.make_tensor_value_info("y", t, None)]
    if base_is_output:
        outputs.append(helper.make_tensor_value_info("base", t, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, ["tokens", p["x"].shape[-1]])],
                              outputs, initializer=inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    body = routed_body(ROUTED_GROUPED_LORA_ADD, 18)
    return helper.make_model(graph, opset_imports=opsets, functions=[body]).SerializeToString()


@pytest.mark.parametrize("tokens", [1, 70])  # a decode step (per token), a prompt (the expert-grouped path)
@pytest.mark.parametrize("base_is_output", [False, True])
def test_add_runs_in_base_buffer_only_when_nothing_else_reads_base(
    library: Path, base_is_output: bool, tokens: int
) -> None:
    """The kernel's output 0 may take base's buffer (may_inplace, with the shape inference that lets ONNX Runtime
    see equal sizes): it does for a base read by the op alone, never for one the graph also returns."""
    from moe_export.runtimes.native.library import in_place_calls

    rng = np.random.default_rng(3)
    d, d_out, E, R = 32, 48, 6, 4
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    p = {"x": x, "W": rng.standard_normal((d, E)).astype(np.float32), "k": 2, "normalize": 1,
         "A": (rng.standard_normal((E, R, d)) * 0.3).astype(np.float32),
         "B": (rng.standard_normal((E, d_out, R)) * 0.3).astype(np.float32),
         "Wb": rng.standard_normal((d, d_out)).astype(np.float32)}  # fmt: skip
    model = base_from_matmul_model(p, base_is_output)
    before = in_place_calls(library)
    native = session(model, library).run(None, {"x": x})
    in_place = in_place_calls(library) - before
    body = session(model).run(None, {"x": x})
    assert in_place == (0 if base_is_output else 1)
    np.testing.assert_allclose(native[0], body[0], rtol=1e-5, atol=1e-5)
    if base_is_output:  # the returned base is MatMul's, untouched by the op's add
        np.testing.assert_array_equal(native[1], body[1])


def test_routing_does_not_depend_on_how_many_tokens_come_together(library: Path) -> None:
    """A prompt's tokens are routed by token tiles (shrink_tokens), a decode step's one by the 8-row dot product
    (shrink): both sum every logit in the same order, so a token gets bit-identical ids and gates either way, as
    it does in x [T, D] and x [B, S, D] form."""
    rng = np.random.default_rng(4)
    d, E = 96, 11  # 11 experts: an 8-row block of the one-token path, then rows one by one
    p = {"W": rng.standard_normal((d, E)).astype(np.float32), "k": 3, "normalize": 0, "constant": True,
         "A": (rng.standard_normal((E, 8, d)) * 0.3).astype(np.float32),
         "B": (rng.standard_normal((E, 40, 8)) * 0.3).astype(np.float32)}  # fmt: skip
    x = rng.standard_normal((70, d)).astype(np.float32)
    run = session(routed_model({**p, "x": x}, False), library).run
    _, ids, gates = run(None, {"x": x})
    run_one = session(routed_model({**p, "x": x[:1]}, False), library).run
    for t in (0, 1, 37, 69):
        _, ids_one, gates_one = run_one(None, {"x": x[t : t + 1]})
        np.testing.assert_array_equal(ids_one[0], ids[t])
        np.testing.assert_array_equal(gates_one[0], gates[t])
    batched = routed_model({**p, "x": x.reshape(2, 35, d)}, False)
    y3, ids3, gates3 = session(batched, library).run(None, {"x": x.reshape(2, 35, d)})
    y2, _, _ = run(None, {"x": x})
    assert y3.shape == (70, 40)
    np.testing.assert_array_equal(ids3, ids)
    np.testing.assert_array_equal(gates3, gates)
    np.testing.assert_array_equal(y3, y2)
