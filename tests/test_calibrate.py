"""Calibration statistics: streaming sums vs a direct per-token computation, data splits, round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.errors import FormatError, MergeError
from moe_export.merging import calibrate
from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs
from moe_export.merging.statistics import CalibrationStats, UnitAccumulator
from moe_export.reference.loading import load_without_model
from tests.conftest import SAMPLES
from tests.loop_reference import LoopLinear
from tests.tiny import random_adapter


def save_checkpoint(directory: Path, base: Path, **kwargs: object) -> Path:
    adapter = random_adapter(**kwargs)  # type: ignore[arg-type]
    adapter.base_model = str(base)
    return adapter.save(directory)


@pytest.mark.parametrize("kwargs", [{"top_k": 2}, {"top_k": None, "shared_a": True}], ids=["top2", "dense-shared-a"])
def test_stats_match_direct_per_token_computation(tmp_path, tiny_base, kwargs) -> None:
    loaded = moe_export.load(save_checkpoint(tmp_path / "ckpt", tiny_base, seed=3, **kwargs))
    stats = calibrate(loaded, samples=3, seq_len=7, progress=False)
    inputs, source = calibration_inputs(loaded, CalibrationSet(None, 3, 7, 0))
    assert source == "random" and stats.tokens == 21  # tiny_base has no tokenizer

    name = "model.layers.1.mlp.down_proj"
    module = loaded.model.get_submodule(name)
    captured: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, m.in_features)))
    with torch.no_grad():
        for ids in inputs:
            loaded.model(input_ids=ids)
    hook.remove()
    x = torch.cat(captured)  # [T, D_in]
    unit = loaded.adapter.unit(name)
    num_experts = unit.experts.num_experts
    oracle = LoopLinear(module.base, unit, None)  # independent per-token routing
    gates = torch.zeros(x.shape[0], num_experts, dtype=torch.float64)  # [T, E]
    for t in range(x.shape[0]):
        for e, w in oracle.expert_weights(x[t]).items():
            gates[t, e] = w
    deltas = torch.stack([unit.experts.delta(e).double() for e in range(num_experts)])  # [E, D_out, D_in]
    xd = x.double()
    routed = torch.einsum("te,eoi,ti->to", gates, deltas, xd)  # [T, D_out]
    mean = gates.mean(0)  # [E]
    static = xd @ torch.einsum("e,eoi->oi", mean, deltas).T  # [T, D_out]
    with torch.no_grad():
        base_out = module.base(x).double()
    eps = float((routed - static).norm() / base_out.norm())
    probs = gates / gates.sum(-1, keepdim=True)
    entropy = float(-torch.special.xlogy(probs, probs).sum(-1).mean())

    got = stats.units[name]
    torch.testing.assert_close(torch.tensor(got.mean_gate, dtype=torch.float64), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(got.selection_frequency, dtype=torch.float64), (gates > 0).double().mean(0), rtol=0, atol=1e-9
    )
    assert got.error == pytest.approx(eps, rel=1e-5)
    assert got.entropy == pytest.approx(entropy, rel=1e-5, abs=1e-7)
    assert got.delta_rel == pytest.approx(float(routed.norm() / base_out.norm()), rel=1e-5)
    assert got.error > 1e-3, "a random router must not look static"


def test_accumulator_is_streaming_and_split_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    stack = random_adapter(num_layers=1, seed=1).units[0].experts
    x, out = torch.randn(40, 32, generator=g), torch.randn(40, 32, generator=g)
    gates = torch.softmax(torch.randn(40, 4, generator=g), -1)
    whole, halves = UnitAccumulator(stack), UnitAccumulator(stack)
    whole.update(x, gates, out)
    halves.update(x[:17], gates[:17], out[:17])
    halves.update(x[17:], gates[17:], out[17:])
    a, b = whole.to_stats("u", 4), halves.to_stats("u", 4)
    for key in ("p", "q", "r"):
        torch.testing.assert_close(torch.tensor(a.moments[key]), torch.tensor(b.moments[key]), rtol=1e-12, atol=1e-12)
        assert torch.tensor(a.moments[key]).numel() <= 16  # [E, E] sums: size independent of the token count
    assert a.error == pytest.approx(b.error, rel=1e-10)
    assert a.error_for(a.mean_gate) == a.error


def test_stats_round_trip_and_bad_files(tmp_path, tiny_base) -> None:
    loaded = moe_export.load(save_checkpoint(tmp_path / "ckpt", tiny_base))
    stats = calibrate(loaded, samples=2, seq_len=5, progress=False)
    path = stats.save(tmp_path / "stats.json")
    assert CalibrationStats.load(path) == stats
    assert CalibrationStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    data = stats.to_dict() | {"from_the_future": 1}
    with pytest.warns(UserWarning, match="from_the_future"):
        assert CalibrationStats.from_dict(data) == stats
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"bad\.json"):
        CalibrationStats.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"units": [{"name": "x"}]}))
    with pytest.raises(FormatError, match=r"other\.json"):
        CalibrationStats.load(tmp_path / "other.json")


def test_text_data_is_tokenized_and_split(tmp_path) -> None:
    loaded = moe_export.load(SAMPLES / "goat")  # the sample base model ships a tokenizer
    lines = [
        f"sample number {i} talks about {w}" for i, w in enumerate(["rivers", "bread", "code", "stars", "maps", "rain"])
    ]
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(lines) + "\n\n")
    stats_inputs, source = calibration_inputs(loaded, CalibrationSet(data, 10, 64, 0), split="stats")
    held_inputs, _ = calibration_inputs(loaded, CalibrationSet(data, 10, 64, 0), split="heldout")
    assert source == str(data) and len(stats_inputs) == 3 and len(held_inputs) == 3
    assert not {tuple(t[0].tolist()) for t in stats_inputs} & {tuple(t[0].tolist()) for t in held_inputs}
    short, _ = calibration_inputs(loaded, CalibrationSet(data, 2, 4, 0))
    assert len(short) == 2 and all(t.shape[1] <= 4 for t in short)
    stats = calibrate(loaded, data=data, samples=2, seq_len=8, progress=False)
    assert stats.source == str(data) and stats.samples == 2
    assert set(stats.units) == {u.name for u in loaded.adapter.units if u.routed}
    one = tmp_path / "one.txt"
    one.write_text("only one line\n")
    with pytest.raises(FormatError, match=r"one\.txt"):
        calibration_inputs(loaded, CalibrationSet(one, 4, 8, 0), split="heldout")
    with pytest.raises(FormatError, match=r"missing\.txt"):
        calibration_inputs(loaded, CalibrationSet(tmp_path / "missing.txt", 4, 8, 0))


def test_calibration_set_refuses_no_tokens() -> None:
    """Checked when the set is built: `calibrate` names the option before it looks for a model."""
    with pytest.raises(MergeError, match="--samples 0: must be >= 1"):
        calibrate(load_without_model(SAMPLES / "goat"), samples=0)
    with pytest.raises(MergeError, match="--seq-len -1: must be >= 1"):
        CalibrationSet(seq_len=-1)


def test_data_without_tokenizer_is_refused(tmp_path, tiny_base) -> None:
    loaded = moe_export.load(save_checkpoint(tmp_path / "ckpt", tiny_base))
    (tmp_path / "d.txt").write_text("a line\nanother line\n")
    with pytest.raises(FormatError, match="no tokenizer"):
        calibrate(loaded, data=tmp_path / "d.txt", progress=False)


def test_calibrate_cli(tmp_path, tiny_base) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_base)
    out = tmp_path / "stats.json"
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", str(ckpt), "-o", str(out), "--samples", "2", "--seq-len", "5", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert CalibrationStats.load(out).to_dict() == printed and printed["tokens"] == 10
    bad = runner.invoke(
        app, ["calibrate", str(ckpt), "-o", str(tmp_path / "x.json"), "--data", str(tmp_path / "no.txt")]
    )
    assert bad.exit_code == 2 and "no.txt" in bad.output
    assert not (tmp_path / "x.json").exists()
