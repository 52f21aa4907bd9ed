"""The comparator (validation/parity.py) and the per-unit routing statistics (validation/units.py) on synthetic arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_export.validation.parity import Tolerance, compare_func
from moe_export.validation.routing_capture import UnitCapture, match_unit
from moe_export.validation.units import UnitComparison, selection_mask, topk_margins


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 5, 11)).astype(np.float32)


def test_identical_outputs_pass(logits: np.ndarray) -> None:
    result = compare_func(atol=0, rtol=1e-6)({"logits": logits}, {"logits": logits.copy()})
    assert result and result.passed
    out = result.outputs["logits"]
    assert out.max_abs == 0 and out.top1_agreement == 1.0
    assert result.failures() == []
    json.dumps(result.to_dict())  # serialisable


def test_error_definition_is_relative_to_max_reference(logits: np.ndarray) -> None:
    scale = float(np.abs(logits).max())
    noisy = logits.copy()
    noisy[1, 2, 3] += 0.5e-3 * scale  # rel error 5e-4
    assert compare_func(atol=0, rtol=1e-3)({"logits": logits}, {"logits": noisy})
    result = compare_func(atol=0, rtol=1e-4)({"logits": logits}, {"logits": noisy})
    assert not result
    out = result.outputs["logits"]
    assert out.worst_index == [1, 2, 3]
    assert out.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert "logits" in result.failures()[0] and "exceeds" in result.failures()[0]


def test_every_failing_output_is_listed(logits: np.ndarray) -> None:
    ref = {"logits": logits, "hidden": np.ones((3, 4), np.float32), "ok": np.zeros(2, np.float32)}
    cand = {"logits": logits + 1.0, "hidden": np.full((3, 4), 2.0, np.float32), "ok": np.zeros(2, np.float32)}
    result = compare_func()(ref, cand)
    assert not result
    failing = {line.split(":")[0] for line in result.failures()}
    assert failing == {"logits", "hidden"}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_never_passes(logits: np.ndarray, bad: float) -> None:
    cand = logits.copy()
    cand[0, 0, 0] = bad
    # Even an infinite tolerance must not accept NaN/Inf.
    result = compare_func(atol=np.inf, rtol=np.inf)({"logits": logits}, {"logits": cand})
    assert not result
    out = result.outputs["logits"]
    assert out.nan_count + out.inf_count == 1
    # ... and a non-finite reference fails too.
    assert not compare_func(atol=np.inf, rtol=np.inf)({"logits": cand}, {"logits": logits})


def test_empty_comparisons_never_pass() -> None:
    assert not compare_func()({}, {})
    empty = np.zeros((0, 4), np.float32)
    result = compare_func(atol=1, rtol=1)({"logits": empty}, {"logits": empty})
    assert not result and "empty" in result.failures()[0]


def test_shape_mismatch_and_missing_output_fail(logits: np.ndarray) -> None:
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"logits": logits[:, :4]})
    assert not result and "shape mismatch" in result.failures()[0]
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"other": logits})
    assert not result and "missing" in result.failures()[0]


def test_dtype_kind_mismatch_fails(logits: np.ndarray) -> None:
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"logits": logits.astype(np.int64)})
    assert not result and "dtype" in result.failures()[0]


def test_per_output_override(logits: np.ndarray) -> None:
    ref = {"logits": logits, "aux": np.ones(4, np.float32)}
    cand = {"logits": logits, "aux": np.full(4, 1.01, np.float32)}
    assert not compare_func(atol=0, rtol=1e-4)(ref, cand)
    assert compare_func(atol=0, rtol=1e-4, per_output={"aux": Tolerance(0, 2e-2)})(ref, cand)


def test_top1_gate(logits: np.ndarray) -> None:
    cand = logits.copy()
    pos = np.unravel_index(np.argmin(cand[0, 0]), cand[0, 0].shape)
    cand[0, 0][pos] = 100.0  # changes argmax at one of 10 positions
    loose = compare_func(atol=1e3, rtol=0)({"logits": logits}, {"logits": cand})
    assert loose and loose.outputs["logits"].top1_agreement == pytest.approx(0.9)
    gated = compare_func(atol=1e3, rtol=0, min_top1=0.99)({"logits": logits}, {"logits": cand})
    assert not gated and "top-1" in gated.failures()[0]


def test_tolerance_rejects_negative() -> None:
    with pytest.raises(ValueError):
        Tolerance(-1.0, 0.0)


# --- routing statistics --------------------------------------------------------------------------


def test_selection_mask_and_margins() -> None:
    ids = np.array([[0, 2], [1, 3]])
    gates = np.array([[0.6, 0.4], [1.0, 0.0]])  # token 1 keeps only expert 1 (top-p style zero gate)
    mask = selection_mask(ids, gates, 4)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False]]
    probs = np.array([[0.5, 0.1, 0.3, 0.1], [0.1, 0.7, 0.15, 0.05]])
    assert topk_margins(probs, mask) == pytest.approx([0.3 - 0.1, 0.7 - 0.15])


def _capture(ids: list[list[int]], gates: list[list[float]], probs: list[list[float]] | None = None) -> UnitCapture:
    return UnitCapture(
        None, np.array(ids), np.array(gates), None if probs is None else np.array(probs, dtype=np.float32)
    )


def test_routing_agreement_separates_near_ties_from_bugs() -> None:
    probs = [[0.40, 0.35, 0.2499, 0.0001], [0.30, 0.29999, 0.29998, 0.10003]]
    ref = _capture([[0, 1], [0, 1]], [[0.53, 0.47], [0.5, 0.5]], probs)
    near_tie = _capture([[0, 1], [0, 2]], [[0.53, 0.47], [0.5, 0.5]])  # token 1 flips experts 1 <-> 2
    unit = UnitComparison("u", margin_tol=1e-3)
    unit.add_routing(ref, near_tie)
    unit.finish()
    assert unit.agreement == 0.5 and unit.passed
    assert unit.min_flip_margin == pytest.approx(1e-5, abs=2e-6)

    bug = _capture([[2, 3], [0, 1]], [[0.5, 0.5], [0.5, 0.5]])  # token 0 flips with margin 0.1
    unit = UnitComparison("u", margin_tol=1e-3)
    unit.add_routing(ref, bug)
    unit.finish()
    # End to end, a big-margin flip can come from upstream drift: reported, not blamed on this unit.
    assert unit.passed and unit.max_flip_margin == pytest.approx(0.35 - 0.2499, rel=1e-4)
    # The same flip on the same input is this unit's router's fault.
    unit = UnitComparison("u", margin_tol=1e-3)
    bug_with_x = UnitCapture(np.zeros((2, 3), np.float32), bug.expert_ids, bug.gates)
    unit.add_router_check(bug_with_x, lambda _x: (ref.expert_ids, ref.gates, ref.probs))
    unit.finish(gate_tol=1e-4)
    assert not unit.passed and "same input" in unit.messages[0] and unit.router_agreement == 0.5
    # A near-tie flip on the same input passes; the gates of agreeing tokens are compared too.
    unit = UnitComparison("u", margin_tol=1e-3)
    near_with_x = UnitCapture(np.zeros((2, 3), np.float32), near_tie.expert_ids, near_tie.gates + 1e-6)
    unit.add_router_check(near_with_x, lambda _x: (ref.expert_ids, ref.gates, ref.probs))
    unit.finish(gate_tol=1e-4)
    assert unit.passed and unit.gate_max_abs == pytest.approx(1e-6, rel=1e-3)


def test_padding_tokens_are_not_compared() -> None:
    ref = _capture([[0, 1], [0, 1]], [[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.4, 0.05, 0.05]] * 2)
    cand = _capture([[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    unit = UnitComparison("u")
    unit.add_routing(ref, cand, np.array([True, False]))
    assert unit.tokens == 1 and unit.agreement == 1.0


def test_op_check_names_a_wrong_weight() -> None:
    import torch

    from moe_export.ops.grouped_lora import grouped_lora_dense

    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(6, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.randn(4, 5, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    gates = torch.rand(6, 2, generator=g)
    y = grouped_lora_dense(x, ids, gates, a, b)
    good = UnitCapture(x.numpy(), ids.numpy(), gates.numpy(), output=y.numpy())
    unit = UnitComparison("u")
    unit.add_op_check(good, a, b, Tolerance(1e-6, 1e-4))
    assert unit.passed and unit.op_max_abs is not None and unit.op_max_abs < 1e-5
    wrong_b = b.clone()
    wrong_b[2, 1, 0] += 1.0
    unit = UnitComparison("u")
    unit.add_op_check(good, a, wrong_b, Tolerance(1e-6, 1e-4))
    assert not unit.passed and "GroupedLoRA output differs" in unit.messages[0]


def test_match_unit() -> None:
    units = {"model.layers.0.mlp", "model.layers.0.self_attn.q_proj"}
    assert match_unit("model.layers.0.self_attn.q_proj", units) == "model.layers.0.self_attn.q_proj"
    assert match_unit("model.layers.0.mlp.gate_proj", units) == "model.layers.0.mlp"
    assert match_unit("model.layers.1.mlp", units) is None
