"""Nothing gets through `validate`: one broken weight in an exported model fails with exit 1 naming its unit, on every
routing kind and in fp32 and fp16, while the unbroken exports pass (issue 20).

Each mutation edits one initializer of a copy of a shared sample export. The initializer is found by value: the
one (of the right shape, either orientation) closest to the reference's tensor, so the test does not depend on
how the exporter names or transposes it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.reference.model import reference_units
from tests.artifacts import SAMPLE_TASK_IDS, shared_dir
from tests.conftest import SAMPLES

# family kind -> (sample, the unit every mutation of that family breaks)
FAMILIES = {
    "per-linear-topk": ("goat", "model.layers.0.mlp.down_proj"),
    "top-p": ("mixlora_dynamic", "model.layers.0.mlp"),
    "mixlora-block": ("mixlora", "model.layers.0.mlp"),
    "dense-soft": ("hydralora", "model.layers.0.mlp.down_proj"),
    "task-gated": ("mmoelora", "model.layers.0.mlp.down_proj"),
}
MUTATIONS = ("scale-one-expert-B", "perturb-router-row", "drop-scaling", "swap-experts-A", "corrupt-residual-fold")


def _export(factory: pytest.TempPathFactory, sample: str, dtype: str) -> Path:
    def build(root: Path) -> None:
        loaded = moe_export.load(SAMPLES / sample, task_id=SAMPLE_TASK_IDS.get(sample))
        moe_export.export_onnx(loaded, root, dtype=dtype, validate=False, progress=False)

    return shared_dir(factory, f"sample-{sample}-{dtype}", build)


def _validate(directory: Path) -> tuple[int, dict]:
    args = ["validate", str(directory), "--batch", "2", "--seq", "9", "--new-tokens", "0", "--json"]
    result = CliRunner().invoke(app, args)
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}


def _closest(model: onnx.ModelProto, target: torch.Tensor) -> tuple[onnx.TensorProto, bool]:
    """The initializer closest to `target` (or its transpose), and whether it is stored transposed."""
    want = target.detach().double().numpy()
    best: tuple[float, onnx.TensorProto, bool] | None = None
    for init in model.graph.initializer:
        for transposed, ref in ((False, want), (True, want.T)) if want.ndim == 2 else ((False, want),):
            if tuple(init.dims) == ref.shape:
                err = float(np.abs(numpy_helper.to_array(init).astype(np.float64) - ref).max())
                if best is None or err < best[0]:
                    best = (err, init, transposed)
    assert best is not None and best[0] <= 1e-2 * float(np.abs(want).max()) + 1e-3, "no initializer holds the tensor"
    return best[1], best[2]


def _edit(model: onnx.ModelProto, target: torch.Tensor, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Apply `change` to the initializer holding `target`, in the reference's orientation."""
    init, transposed = _closest(model, target)
    value = numpy_helper.to_array(init).astype(np.float64)
    value = change(value.T.copy()).T if transposed else change(value.copy())
    init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), init.name))


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    """The unit's base weight as exported: a linear unit's W with its shared LoRAs folded in, or an FFN's gate_proj."""
    if hasattr(module, "gate_proj"):
        return module.gate_proj.weight
    weight = module.base.weight.detach().float().clone()
    for a, b, scaling in module.shared_pairs():
        weight += scaling * (b.float() @ a.float())
    return weight


def _mutate(model: onnx.ModelProto, sample: str, unit_name: str, mutation: str) -> None:
    loaded = moe_export.load(SAMPLES / sample, task_id=SAMPLE_TASK_IDS.get(sample))
    unit = reference_units(loaded.model)[unit_name]
    module = loaded.model.get_submodule(unit_name)
    expert_a, expert_b = unit.experts[0]  # [E_A, R, D_in], [E, D_out, R] (scaling folded in)
    ir = next(u for u in loaded.adapter.units if u.name == unit_name)
    stack = ir.experts if not isinstance(ir.experts, dict) else ir.experts[module.execution_order[0]]
    if mutation == "scale-one-expert-B":
        _edit(model, expert_b, lambda b: np.concatenate([3.0 * b[:1], b[1:]]))
    elif mutation == "drop-scaling":
        scaling = stack.scaling.double().numpy()
        assert not np.allclose(scaling, 1.0), "a scaling of 1 cannot be dropped"
        _edit(model, expert_b, lambda b: b / scaling[:, None, None])
    elif mutation == "swap-experts-A":
        if expert_a.shape[0] > 1:
            _edit(model, expert_a, lambda a: a[[1, 0, *range(2, a.shape[0])]])
        else:  # HydraLoRA shares one A: its experts differ by B only, so two experts' B are swapped instead
            _edit(model, expert_b, lambda b: b[[1, 0, *range(2, b.shape[0])]])
    elif mutation == "perturb-router-row":
        if unit.constant_route is not None:  # task routing: the router is the task's gate weights
            _edit(model, module.task_weights, lambda w: w + 0.5 * (np.arange(w.shape[0]) == 0))
        else:
            assert unit.router_weight is not None
            _edit(model, unit.router_weight, lambda w: np.concatenate([w[:1] + 2.0 * np.abs(w).max(), w[1:]]))
    else:  # corrupt-residual-fold: the folded base weight of the unit, a rank-1 change of its own scale
        weight = _base_weight(module)
        _edit(model, weight, lambda w: w + np.abs(w).max() * np.outer(np.sign(w[:, 0]), np.ones(w.shape[1])))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mutation_fails_naming_its_unit(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, family: str, dtype: str
) -> None:
    sample, unit = FAMILIES[family]
    export = _export(tmp_path_factory, sample, dtype)
    code, clean = _validate(export)
    assert code == 0, clean.get("failures")
    for mutation in MUTATIONS:
        copy = tmp_path / mutation
        shutil.copytree(export, copy)
        model = onnx.load(str(copy / "model.onnx"))
        _mutate(model, sample, unit, mutation)
        onnx.save_model(model, str(copy / "model.onnx"))
        code, report = _validate(copy)
        failures = " | ".join(report.get("failures", []))
        assert code == 1, f"{mutation} passed validation"
        assert unit in failures, f"{mutation}: the failures do not name {unit}: {failures}"
