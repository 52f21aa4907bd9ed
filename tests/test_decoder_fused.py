"""The contrib-op KV-cache decoder (export/decoder_fused.py, `fusion="contrib"`) against the standard-op one.

Both graphs come from the same tiny checkpoint; the plain one (`fusion="none"`) is the decoder the rest of the
suite checks against the PyTorch reference, so here the fused graph must (a) really hold the contrib ops and the
packed q/k/v MatMul (int4 quantizing each pack once), (b) keep
every GroupedLoRA node and function body byte for byte, and (c) give the same logits at every decode step, for
one row and for a right- and a left-padded batch, within an fp32 bound; onnxruntime-genai must generate the
reference's tokens from it; and validate must judge a left-padded batch unit by unit (its taps mapped back from
the graph's rotated token order), naming a mutated expert.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import moe_export
from moe_export.export.manifest import Artifact
from moe_export.ops.names import DOMAIN, GATED_OP_TYPES, ROUTED_OP_TYPES
from moe_export.runtimes.decoding import next_token_logits
from moe_export.runtimes.torch_runner import reference_model_loader
from moe_export.validation.generation import default_prompts
from tests.artifacts import shared_export, shared_fused_export
from tests.conftest import SAMPLES
from tests.genai_check import assert_genai_matches_torch

LAYERS = 2  # tests/tiny.py's Llama
# fp32 against fp32: GroupQueryAttention's GEMM/softmax order differs from the decomposed graph's; measured
# max |Δ| ~2e-6 on logits of ~4 (relative 5e-7). 2e-5 relative leaves 40x margin and still catches a wrong
# position, window or cache row (those move logits by > 1e-1, see tests/test_real_configs.py).
REL_BOUND = 2e-5
STEPS = 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    return {
        "contrib": shared_fused_export(tmp_path_factory, tiny_base),
        "none": shared_export(tmp_path_factory, tiny_base),
    }


@pytest.fixture(scope="module")
def goat_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """samples/goat both ways: its base (samples/tiny-llama) has 16-wide heads, so GroupQueryAttention rotates q and
    k itself (tests/tiny.py's 8-wide heads take the RotaryEmbedding nodes)."""
    root = tmp_path_factory.mktemp("goat-fusion")
    loaded = moe_export.load(SAMPLES / "goat")
    for fusion in ("contrib", "none"):
        moe_export.export_onnx(loaded, root / fusion, validate=False, progress=False, fusion=fusion)
    return {fusion: root / fusion for fusion in ("contrib", "none")}


@pytest.fixture(params=["tiny", "goat"])
def rotary_exports(request: pytest.FixtureRequest) -> dict[str, Path]:
    """The fused/plain pair of each rotary path: RotaryEmbedding nodes (tiny) and rotary inside attention (goat)."""
    return request.getfixturevalue("exports" if request.param == "tiny" else "goat_exports")


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path / "model.onnx"), load_external_data=False)


def test_fused_graph_holds_the_contrib_ops(exports: dict[str, Path]) -> None:
    fused, plain = _load(exports["contrib"]), _load(exports["none"])
    ops = collections.Counter((n.domain, n.op_type) for n in fused.graph.node)
    assert ops[("com.microsoft", "GroupQueryAttention")] == LAYERS
    assert ops[("com.microsoft", "RotaryEmbedding")] == 2 * LAYERS  # q and k: 8-wide heads, see goat_exports
    assert all(_gqa_attrs(n)["do_rotary"] == 0 for n in fused.graph.node if n.op_type == "GroupQueryAttention")
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * LAYERS
    plain_ops = collections.Counter((n.domain, n.op_type) for n in plain.graph.node)
    assert not any(domain == "com.microsoft" for domain, _ in plain_ops)
    # the attention block's standard ops are gone: no Softmax outside the routers left in standard ops (one per
    # unit whose node reads its routing: GroupedLoRA(Add); RoutedGroupedLoRAAdd routes inside)
    routers = sum(1 for n in fused.graph.node if n.op_type in GATED_OP_TYPES)
    assert ops[("", "Softmax")] <= routers < plain_ops[("", "Softmax")]
    assert [v.name for v in fused.graph.input] == [v.name for v in plain.graph.input]
    assert [v.name for v in fused.graph.output] == [v.name for v in plain.graph.output]
    fusion = json.loads((exports["contrib"] / "export.json").read_text())["fusion"]
    packed = fusion.pop("packed")
    assert fusion == {"requested": "contrib", "mode": "contrib", "reason": None, "rotary": "RotaryEmbedding"}
    # q/k/v as one MatMul (export/packing.py), the builder's layout; the routers (one MatMul on a [D, E] weight per
    # routed unit) are untouched
    assert sorted(packed) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(LAYERS)]
    assert [m for m, _ in packed["model.layers.0.self_attn.qkv_proj"]] == [
        f"model.layers.0.self_attn.{p}_proj.base" for p in "qkv"
    ]
    inits = {t.name: list(t.dims) for t in fused.graph.initializer}
    weights = [inits[n.input[1]] for n in fused.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    base = [dims for dims in weights if dims[-1] != 4]  # routers: [D_in, E=4]
    assert len(weights) - len(base) == routers
    assert len(base) == 5 * LAYERS + 1  # qkv, o, gate, up, down per layer; lm_head
    # tests/tiny.py: the packs [hidden 32, 32 + 2 kv heads of 8], and lm_head [32, vocab 64]
    assert base.count([32, 32 + 2 * 16]) == LAYERS + 1
    assert json.loads((exports["none"] / "export.json").read_text())["fusion"]["mode"] == "none"  # the default


def _gqa_attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_attention_rotates_inside_for_heads_of_16(goat_exports: dict[str, Path]) -> None:
    """The builder's layout: no RotaryEmbedding node, GroupQueryAttention rotates with the cos/sin caches; the graph
    interface (position_ids included) stays the plain decoder's."""
    fused, plain = _load(goat_exports["contrib"]), _load(goat_exports["none"])
    assert not any(n.op_type == "RotaryEmbedding" for n in fused.graph.node)
    attention = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == LAYERS
    for node in attention:
        assert _gqa_attrs(node)["do_rotary"] == 1 and _gqa_attrs(node)["rotary_interleaved"] == 0
        assert node.input[7:9] == ["cos_cache", "sin_cache"]
    assert [v.name for v in fused.graph.input] == [v.name for v in plain.graph.input]
    assert (
        json.loads((goat_exports["contrib"] / "export.json").read_text())["fusion"]["rotary"] == "GroupQueryAttention"
    )


def test_grouped_lora_nodes_and_bodies_unchanged(exports: dict[str, Path]) -> None:
    fused, plain = _load(exports["contrib"]), _load(exports["none"])

    def custom(model: onnx.ModelProto) -> dict[str, tuple[str, list[str]]]:
        return {
            n.name: (n.op_type, [a.SerializeToString() for a in n.attribute])
            for n in model.graph.node
            if n.domain == "moe_export"
        }

    assert custom(fused) == custom(plain) and len(custom(fused)) == 14
    assert [f.SerializeToString() for f in fused.functions] == [f.SerializeToString() for f in plain.functions]


def _greedy(path: Path, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of the prompt's next token and of STEPS greedy decode steps [STEPS+1, B, V]; last presents."""
    interface = Artifact.open(path).interface
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = interface.output_names()
    out = dict(
        zip(names, session.run(None, interface.complete_feeds({"input_ids": ids, "attention_mask": mask})), strict=True)
    )
    logits = [next_token_logits(out["logits"], mask)]
    for _ in range(STEPS):
        past = mask.shape[1]
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
        feeds = interface.next_step_feeds(logits[-1].argmax(-1), mask, past, out)
        out = dict(zip(names, session.run(None, feeds), strict=True))
        logits.append(out["logits"][:, -1])
    return np.stack(logits), [out[n] for n in interface.present_names()]


def _left_padded(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same rows with their pads moved to the front (optimum's padding side)."""
    order = np.argsort(mask, axis=1, kind="stable")  # zeros first, real tokens keep their order
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(mask, order, axis=1)


def test_fused_decode_steps_match_the_plain_decoder(rotary_exports: dict[str, Path]) -> None:
    """One row, a right-padded batch (genai, validate) and the same batch left-padded (optimum), for both rotary
    paths: a wrong position moves logits by > 1e-1 (tests/test_real_configs.py)."""
    exports = rotary_exports
    single, padded = default_prompts(64, pad_id=0, seed=5)
    cases = [
        (single.input_ids, single.attention_mask),
        (padded.input_ids, padded.attention_mask),
        _left_padded(padded.input_ids, padded.attention_mask),
    ]
    assert not cases[2][1][:, 0].all() and not cases[1][1][:, -1].all()  # both padding sides really occur
    for ids, mask in cases:
        (fused, fused_cache), (plain, plain_cache) = (_greedy(exports[k], ids, mask) for k in ("contrib", "none"))
        err = float(np.abs(fused - plain).max())
        assert err <= REL_BOUND * float(np.abs(plain).max()), f"mask {mask.tolist()}: max |Δ| {err:.3g}"
        assert (fused.argmax(-1) == plain.argmax(-1)).all()
        # an unpadded row's cache is the same tensor (a padded row's is compacted by GroupQueryAttention)
        full = np.flatnonzero(mask.all(axis=1))
        assert full.size and all(
            np.allclose(f[full], p[full], atol=1e-5) for f, p in zip(fused_cache, plain_cache, strict=True)
        )


def test_fp16_fused_export_passes_validate(tmp_path: Path) -> None:
    """fp16 runs on ORT's CPU GroupQueryAttention / RotaryEmbedding / SkipSimplifiedLayerNorm kernels too:
    parity, route replay and both generation checks at the fp16 tolerance, on samples/goat. (tests/tiny.py's
    base is not used: its small logits make the fp16 bound tighter than fp16 itself, and the plain fp16
    decoder fails there as well: generation max |Δ| 0.0092 plain, 0.0066 fused, bound 0.0047.)"""
    loaded = moe_export.load(SAMPLES / "goat")
    out = tmp_path / "goat-fp16"
    moe_export.export_onnx(loaded, out, dtype="fp16", validate=False, progress=False, fusion="contrib")
    assert sum(n.op_type == "GroupQueryAttention" for n in _load(out).graph.node) == LAYERS
    report = moe_export.validate(out, new_tokens=8)
    assert report.passed, report.failures()
    assert len(report.generation) == 2 and all(g.passed for g in report.generation)


def test_sliding_window_bases_keep_the_plain_decoder(tmp_path: Path) -> None:
    """GroupQueryAttention windows a right-padded row's real tokens, transformers' mask its columns: a Mistral
    export falls back and says why in export.json; the llama3-rope sample (no window) is fused."""
    for sample, mode in (("goat_mistral", "none"), ("moe_peft_mola_llama3", "contrib")):
        export = tmp_path / sample
        moe_export.export_onnx(
            moe_export.load(SAMPLES / sample), export, validate=False, progress=False, fusion="contrib"
        )
        fusion = json.loads((export / "export.json").read_text())["fusion"]
        assert fusion["requested"] == "contrib" and fusion["mode"] == mode, (sample, fusion)
        gqa = sum(n.op_type == "GroupQueryAttention" for n in _load(export).graph.node)
        assert (gqa > 0) == (mode == "contrib")
        if mode == "none":
            assert "sliding window 16" in fusion["reason"]


def test_genai_generates_the_reference_tokens(rotary_exports: dict[str, Path]) -> None:
    """onnxruntime-genai runs the contrib decoder as it is and generates the PyTorch reference's tokens, for one
    row and a right-padded batch, with either rotary path."""
    exports = rotary_exports
    reference = reference_model_loader(Artifact.open(exports["contrib"]))().eval()
    pad = json.loads((exports["contrib"] / "genai_config.json").read_text())["model"]["pad_token_id"]
    for prompts in default_prompts(64, pad_id=pad, seed=7):
        assert_genai_matches_torch(exports["contrib"], reference, prompts, new_tokens=8)


MUTATED_UNIT = "model.layers.1.self_attn.v_proj"


def _left_padded_npz(path: Path) -> Path:
    """A batch whose second and third rows are left-padded (optimum's side) by different amounts."""
    ids = np.random.default_rng(11).integers(1, 64, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def test_left_padded_inputs_pass_validate(rotary_exports: dict[str, Path], tmp_path: Path) -> None:
    """The contrib graph's units run on each row's rotated tokens; validate maps their taps back to the caller's
    order (export/token_order.py), so route replay and every unit line up with the reference's."""
    report = moe_export.validate(rotary_exports["contrib"], inputs=_left_padded_npz(tmp_path / "in.npz"), new_tokens=4)
    assert report.passed, report.failures()
    assert report.generation and all(g.passed for g in report.generation)
    units = report.units["onnxruntime"]
    assert len(units) == 14 and all(u.passed and u.flip_count == 0 for u in units.values())
    # taps in the rotated order would hand the reference another token's routing at every padded row
    assert all(u.tokens == 3 * 9 - 8 for u in units.values())


def test_left_padded_inputs_still_name_a_mutated_expert(exports: dict[str, Path], tmp_path: Path) -> None:
    from onnx import numpy_helper

    model = _load(exports["contrib"])
    onnx.load_external_data_for_model(model, str(exports["contrib"]))
    node = next(n for n in model.graph.node if n.domain == DOMAIN and n.name == MUTATED_UNIT)
    b_input = node.input[3 if node.op_type in ROUTED_OP_TYPES else 4]  # B [E, D_out, R] (docs/op-contract.md)
    init = next(i for i in model.graph.initializer if i.name == b_input)
    b = numpy_helper.to_array(init).copy()
    b[:, 0, 0] += 5.0 * (np.abs(b).max() + 1.0)  # every expert: whichever a token picks is wrong
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    mutated = tmp_path / "mutated"
    shutil.copytree(exports["contrib"], mutated, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx.save_model(model, str(mutated / "model.onnx"))
    report = moe_export.validate(mutated, inputs=_left_padded_npz(tmp_path / "in.npz"), new_tokens=0)
    assert not report.passed
    failing = [name for name, u in report.units["onnxruntime"].items() if not u.passed]
    assert failing == [MUTATED_UNIT]


def test_int4_quantizes_the_packed_projections(tmp_path: Path) -> None:
    """--quantize int4 on the contrib decoder: one MatMulNBits per pack (the builder's count), and the export's own
    parity check (the reference with the dequantized weights, each pack's rows split back into its members) passes,
    with merged, folded and routed units among the members (GOAT, --merge-threshold 0.9)."""
    from typer.testing import CliRunner

    from moe_export.cli import app
    from moe_export.export.manifest import ExportManifest

    out = tmp_path / "int4"
    args = ["onnx", SAMPLES / "goat", "-o", out, "--merge-threshold", "0.9", "--quantize", "int4"]
    args += ["--fusion", "contrib"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-2000:]
    manifest = ExportManifest.load(out)
    assert manifest.quant_scheme is not None and manifest.fusion is not None
    packs = set(manifest.fusion["packed"])
    assert len(packs) == LAYERS and packs <= set(manifest.quant_scheme.weights)
    nbits = [n for n in _load(out).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * LAYERS + 1  # qkv, o, gate, up, down per layer; lm_head
    members = {m for group in manifest.fusion["packed"].values() for m, _ in group}
    assert not members & set(manifest.quant_scheme.weights)  # each member is quantized once, inside its pack
