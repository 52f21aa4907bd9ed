"""Merge math: exact folds, threshold / budget selection, plan round trip, apply_merge_plan determinism."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import moe_export
from moe_export.errors import MergeError
from moe_export.ir import Adapter, LinearMoE, Router, TaskGate
from moe_export.merging import MergePlan, apply_merge_plan, calibrate, merge, plan_merge
from moe_export.reference.loading import load_adapter
from moe_export.reference.model import moe_modules
from tests.conftest import SAMPLES
from tests.tiny import random_adapter


def save(adapter: Adapter, directory: Path, base: Path) -> Path:
    adapter.base_model = str(base)
    return adapter.save(directory)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def ids_for(model: torch.nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


def with_routers(adapter: Adapter, make: object, **changes: object) -> Adapter:
    """Replace every unit's router by make(unit) (a Router)."""
    units = [dataclasses.replace(u, router=make(u)) for u in adapter.units]  # type: ignore[operator]
    return dataclasses.replace(adapter, units=units, **changes)


def shared_only() -> Adapter:
    adapter = random_adapter(seed=2)
    return dataclasses.replace(
        adapter, units=[dataclasses.replace(u, experts=None, router=None) for u in adapter.units]
    )


def task_routed() -> Adapter:
    g = torch.Generator().manual_seed(4)
    gate = TaskGate("task", torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 2)
    router = Router(kind="task", num_experts=4, task_gate="task")
    return with_routers(random_adapter(seed=4), lambda u: router, task_gates={"task": gate})


def constant_router() -> Adapter:
    def make(u: LinearMoE) -> Router:
        row = torch.randn(1, u.in_features)
        return Router("linear", 4, select="dense", weight=row.repeat(4, 1), bias=torch.tensor([0.5, -1.0, 2.0, 0.0]))

    return with_routers(random_adapter(top_k=None, seed=6), make)


# One row per exact fold: (name, adapter factory or sample dir, task id, reason every routed unit must get).
EXACT_CASES = [
    ("shared-only", shared_only, None, None),
    ("routed-keeps-experts", lambda: random_adapter(seed=1), None, None),
    ("single-expert", lambda: random_adapter(num_experts=1, top_k=1, seed=3), None, "exact-single-expert"),
    ("task-0", task_routed, 0, "exact-task"),
    ("task-3", task_routed, 3, "exact-task"),
    ("constant-router", constant_router, None, "exact-constant"),
    ("sample-lora", SAMPLES / "lora", None, None),
    ("sample-goat", SAMPLES / "goat", None, None),
    ("sample-mmoelora-1", SAMPLES / "mmoelora", 1, "exact-task"),
    ("sample-mmoelora-2", SAMPLES / "mmoelora", 2, "exact-task"),
]


@pytest.mark.parametrize(("case", "source", "task_id", "reason"), EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_exact_folds_keep_the_logits(tmp_path, tiny_base, case, source, task_id, reason) -> None:
    ckpt = source if isinstance(source, Path) else save(source(), tmp_path / "ckpt", tiny_base)
    loaded = moe_export.load(ckpt, task_id=task_id)
    ids = ids_for(loaded.model)
    before = logits(loaded.model, ids)
    routed = [u.name for u in loaded.adapter.units if u.routed]
    result = merge(loaded, progress=False, evaluate=False)  # no threshold/budget: exact folds only
    after = logits(result.loaded.model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    entries = {e.name: e for e in result.plan.units}
    assert all(entries[u.name].fold_shared for u in loaded.adapter.units if getattr(u, "shared", None))
    if reason is None:
        assert all(not entries.get(n) or not entries[n].becomes_linear for n in routed)
        assert [u.name for u in result.loaded.adapter.units] == routed
        assert all(not getattr(u, "shared", []) for u in result.loaded.adapter.units)
    else:
        assert routed and all(entries[n].reason == reason for n in routed)
        assert result.loaded.adapter.units == [] and not list(moe_modules(result.loaded.model))
        assert result.report.logits_rel_error is None  # evaluate=False measures nothing


def dominated(bias: float) -> Adapter:
    """Every router: tiny weights plus a bias that makes one expert (a different one per unit) win."""

    def make(u: LinearMoE) -> Router:
        b = torch.zeros(4)
        b[len(u.name) % 4] = bias
        return dataclasses.replace(u.router, weight=u.router.weight * 0.01, bias=b)

    return with_routers(random_adapter(seed=8), make)


def test_threshold_merges_a_dominant_router_with_small_measured_error(tmp_path, tiny_base) -> None:
    loaded = moe_export.load(save(dominated(12.0), tmp_path / "ckpt", tiny_base))
    result = merge(loaded, threshold=0.9, samples=4, seq_len=12, progress=False)
    rows = {r.name: r for r in result.report.units}
    assert all(rows[u.name].action == "threshold" for u in loaded.adapter.units)
    for row in rows.values():
        assert row.dominance > 0.999
        assert 0.0 < row.error_measured < 1e-3, row  # measured on held-out tokens: non-zero but small
        assert 0.0 < row.error_predicted < 1e-3
    assert 0.0 < result.report.logits_rel_error < 1e-3
    assert result.report.top1_agreement == 1.0 and result.report.heldout_tokens == 48
    assert not list(moe_modules(result.loaded.model))


def test_uniform_router_is_not_merged(tmp_path, tiny_base) -> None:
    uniform = with_routers(
        random_adapter(top_k=None, seed=9), lambda u: dataclasses.replace(u.router, weight=u.router.weight * 1e-3)
    )
    loaded = moe_export.load(save(uniform, tmp_path / "ckpt", tiny_base))
    result = merge(loaded, threshold=0.9, samples=3, seq_len=8, progress=False)
    assert not result.plan.merged_units
    assert all(r.action == "routed" and r.dominance < 0.3 for r in result.report.units)
    assert len(result.loaded.adapter.units) == len(uniform.units)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_base):
    ckpt = save(random_adapter(seed=11), tmp_path_factory.mktemp("ckpt") / "c", tiny_base)
    loaded = moe_export.load(ckpt)
    return ckpt, loaded.adapter, calibrate(loaded, samples=4, seq_len=10, progress=False)


def test_budget_merges_lowest_error_first(calibrated) -> None:
    _, adapter, stats = calibrated
    errors = sorted((s.error, name) for name, s in stats.units.items())
    for budget in (0.0, errors[0][0], errors[0][0] + errors[1][0] + errors[2][0] * 0.5, sum(e for e, _ in errors) + 1):
        plan = plan_merge(adapter, stats, budget=budget)
        chosen = [u.name for u in plan.units if u.becomes_linear]
        taken = [name for _, name in errors[: len(chosen)]]
        assert sorted(chosen) == sorted(taken)  # a prefix of the ε ranking
        assert plan.predicted_error <= budget
        if len(chosen) < len(errors):
            assert plan.predicted_error + errors[len(chosen)][0] > budget  # the next one would not fit
        assert all(u.reason == "budget" for u in plan.units if u.becomes_linear)
        assert all(u.fold_shared for u in plan.units)  # random_adapter units all carry a shared LoRA
    thr = sorted(s.dominance for s in stats.units.values())[len(stats.units) // 2]
    plan = plan_merge(adapter, stats, threshold=thr)
    assert set(plan.merged_units) == {n for n, s in stats.units.items() if s.dominance >= thr}


def test_plan_round_trip(calibrated) -> None:
    _, adapter, stats = calibrated
    plan = plan_merge(adapter, stats, threshold=0.4, task_id=None)
    assert plan.merged_units
    assert MergePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.warns(UserWarning, match="newer_key"):
        assert MergePlan.from_dict(plan.to_dict() | {"newer_key": 1}) == plan
    with pytest.raises(MergeError):
        MergePlan.from_dict({"units": [{"name": "x", "reason": "guess"}]})


def test_apply_merge_plan_reproduces_merge_exactly(calibrated) -> None:
    ckpt, _, stats = calibrated
    result = merge(moe_export.load(ckpt), threshold=0.4, stats=stats, samples=2, seq_len=6, progress=False)
    assert result.plan.merged_units and result.loaded.adapter.units  # some merged, some still routed
    rebuilt = apply_merge_plan(
        moe_export.load(ckpt), MergePlan.from_dict(json.loads(json.dumps(result.plan.to_dict())))
    )
    want, got = result.loaded.model.state_dict(), rebuilt.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert rebuilt.adapter.tensors().keys() == result.loaded.adapter.tensors().keys()
    ids = ids_for(rebuilt.model)
    assert torch.equal(logits(rebuilt.model, ids), logits(result.loaded.model, ids))


def test_bad_requests_raise_before_mutating(calibrated, tiny_base) -> None:
    ckpt, adapter, stats = calibrated
    with pytest.raises(MergeError, match="exclude"):
        plan_merge(adapter, stats, threshold=0.5, budget=1.0)
    with pytest.raises(MergeError, match="threshold"):
        plan_merge(adapter, stats, threshold=1.5)
    with pytest.raises(MergeError, match="budget"):
        plan_merge(adapter, stats, budget=-1.0)
    with pytest.raises(MergeError, match="statistics"):
        plan_merge(adapter, None, threshold=0.5)
    with pytest.raises(MergeError, match="recalibrate"):
        merge(moe_export.load(ckpt, top_k=3), threshold=0.5, stats=stats, evaluate=False, progress=False)
    other = random_adapter(num_layers=1, seed=12)
    plan = plan_merge(adapter, stats, threshold=0.01)
    loaded = moe_export.load(ckpt)
    with pytest.raises(MergeError, match="not a linear unit"):
        apply_merge_plan(dataclasses.replace(loaded, adapter=other), plan)
    merged = apply_merge_plan(loaded, plan)
    with pytest.raises(MergeError):
        apply_merge_plan(merged, plan)  # already merged: its units are gone from the adapter


def test_ffn_units_are_skipped_with_a_notice() -> None:
    adapter, _ = load_adapter(SAMPLES / "mixlora")
    plan = plan_merge(adapter, None)
    ffn = [u.name for u in adapter.units if not isinstance(u, LinearMoE)]
    assert ffn and all(any(n in notice for notice in plan.notices) for n in ffn)
    assert not any(e.name in ffn for e in plan.units)


def test_blocked_fold_equals_the_whole_matrix_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """fold_into_weight works by row blocks (bounded memory); it must give the bits of one whole-matrix fold:
    cast(float(W) + sum_shared s B A + sum_e w_e s_e B_e A_e), written out here with plain matmuls."""
    import moe_export.ir.fold as fold_module
    from moe_export.ir import ExpertStack, SharedLoRA
    from moe_export.ir.fold import ROW_BLOCK, fold_into_weight
    from moe_export.merging.plan import UnitMerge

    g = torch.Generator().manual_seed(0)
    d_in, d_out = 96, 2 * ROW_BLOCK + 37  # three blocks, the last one partial
    stack = ExpertStack(torch.randn(4, 3, d_in, generator=g), torch.randn(4, d_out, 3, generator=g), torch.rand(4) + 1)
    router = Router("linear", 4, "topk", 2, renormalize=True, weight=torch.randn(4, d_in, generator=g))
    shared = [SharedLoRA(torch.randn(5, d_in, generator=g), torch.randn(d_out, 5, generator=g), 0.3)]
    unit = LinearMoE("u", d_in, d_out, stack, router, shared)
    weights = [0.55, 0.25, 0.15, 0.05]
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Linear(d_in, d_out, bias=False).to(dtype).weight.detach()
        blocked = weight.clone()
        shared_term = shared[0].scaling * (shared[0].B @ shared[0].A)  # [D_out, D_in]
        expert_terms = sum(
            w * float(s) * (b @ a) for w, s, b, a in zip(weights, stack.scaling, stack.B, stack.A, strict=True)
        )
        whole = (weight.float() + (shared_term + expert_terms)).to(dtype)
        fold_into_weight(blocked, unit, UnitMerge("u", "threshold", True, weights))
        assert torch.allclose(blocked.float(), whole.float(), rtol=0, atol=1e-4 if dtype == torch.float32 else 0.07)
        # Block by block equals the same code on the whole matrix at once, to the bit.
        unblocked = weight.clone()
        with monkeypatch.context() as patch:
            patch.setattr(fold_module, "ROW_BLOCK", d_out)
            fold_into_weight(unblocked, unit, UnitMerge("u", "threshold", True, weights))
        assert torch.equal(blocked, unblocked)
