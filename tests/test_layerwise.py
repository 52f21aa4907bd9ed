"""The layer-streamed reference (one decoder layer in memory at a time) against the whole-model reference.

The whole model (transformers' own forward with the adapter applied, fp32) is the oracle: the streamed run
must give the same logits, the same routing statistics and the same merge report. Both run the same fp32
kernels on the same [1, L, D] tensors in the same order, so they agree to rounding; the tolerances below
(1e-6 relative) only leave room for a BLAS that blocks a product differently between two calls.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.merging import calibrate, merge
from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs
from moe_export.merging.layerwise import Streaming, calibrate_layerwise
from moe_export.merging.statistics import CalibrationStats
from moe_export.reference.loading import load_without_model
from moe_export.reference.streamed import PARTS, StreamedReference
from tests.conftest import SAMPLES

TASK_IDS = {"mmoelora": 1}  # task-routed: calibrated for one task
FAMILY_SAMPLES = sorted(
    p.name for p in SAMPLES.iterdir() if (p / "adapter_config.json").is_file() or p.name == "canonical"
)
RTOL = 1e-6


def _load(name: str, dtype: torch.dtype = torch.float32, base: Path | None = None) -> moe_export.LoadedAdapter:
    return moe_export.load(SAMPLES / name, base_model=base, task_id=TASK_IDS.get(name), dtype=dtype)


@torch.no_grad()
def streamed_logits(stream: StreamedReference, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    states = stream.embed(inputs)
    for i in range(stream.num_layers):
        for part in PARTS:
            with stream.part(i, part) as layer:
                for state in states:
                    stream.run(layer, i, part, state)
    with stream.head() as head:
        return [head(s.hidden) for s in states]


def assert_stats_close(got: CalibrationStats, want: CalibrationStats, rtol: float, atol: float) -> None:
    assert list(got.units) == list(want.units) and got.tokens == want.tokens
    for name, w in want.units.items():
        g = got.units[name]
        for field in ("mean_gate", "selection_frequency"):
            torch.testing.assert_close(
                torch.tensor(getattr(g, field)), torch.tensor(getattr(w, field)), rtol=0, atol=atol
            )
        assert g.entropy == pytest.approx(w.entropy, rel=rtol, abs=atol)
        for key in ("p", "q", "r", "base_sq"):
            a, b = torch.tensor(g.moments[key], dtype=torch.float64), torch.tensor(w.moments[key], dtype=torch.float64)
            scale = float(b.abs().max()) if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale + 1e-30, msg=f"{name} moment {key}")


@pytest.mark.parametrize("name", FAMILY_SAMPLES)
def test_streamed_logits_and_stats_equal_the_whole_model(name: str) -> None:
    loaded = _load(name)
    inputs, _ = calibration_inputs(loaded, CalibrationSet(None, 3, 11, 0))
    with torch.no_grad():
        want = [loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for ids in inputs]
    stream = StreamedReference(loaded.base_model_path, loaded.adapter, loaded.task_id)
    assert stream.dtype == torch.float32  # the sample bases are stored in fp32
    for got, ref in zip(streamed_logits(stream, inputs), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))

    whole = calibrate(loaded, samples=3, seq_len=11, progress=False)
    streamed = calibrate_layerwise(loaded, CalibrationSet(samples=3, seq_len=11), progress=False)
    assert_stats_close(streamed, whole, RTOL, 1e-7)


def test_families_with_routers_are_covered() -> None:
    """The parametrization above sees every sample with routed linear units (a new sample is picked up)."""
    routed = {n for n in FAMILY_SAMPLES if any(u.routed for u in _load(n).adapter.units)}
    assert {"goat", "goat_mistral", "mola", "moelora", "hydralora", "loramoe", "mmoelora"} <= routed


def _variant_base(tmp_path: Path, sample: str, dtype: torch.dtype | None = None, **config: object) -> Path:
    """A copy of a sample base with config changes and, optionally, its weights cast (the adapter's base)."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / f"{sample}-variant"
    shutil.copytree(SAMPLES / sample, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in load_file(str(base / "model.safetensors")).items()}
        save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    (base / "config.json").write_text(json.dumps(cfg))
    return base


@pytest.mark.parametrize(
    ("sample", "adapter", "config"),
    [
        ("tiny-mistral", "goat_mistral", {"sliding_window": 4}),
        # Qwen2 with its last layer on sliding-window attention: a different mask per layer type.
        (
            "tiny-qwen2",
            "mixlora_qwen2",
            {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["full_attention", "sliding_attention"]},
        ),
    ],
    ids=["mistral-sliding-window", "qwen2-per-layer-masks"],
)
def test_sliding_window_masks_match(tmp_path: Path, sample: str, adapter: str, config: dict[str, object]) -> None:
    base = _variant_base(tmp_path, sample, **config)
    loaded = _load(adapter, base=base)
    layer_types = getattr(loaded.model.config, "layer_types", None)
    assert layer_types is None or "sliding_attention" in layer_types
    inputs, _ = calibration_inputs(loaded, CalibrationSet(None, 2, 12, 0))  # 12 tokens > the window
    with torch.no_grad():
        want = [loaded.model(input_ids=ids).logits for ids in inputs]
        plain = moe_export.load(SAMPLES / adapter, task_id=TASK_IDS.get(adapter)).model(input_ids=inputs[0]).logits
    assert not torch.allclose(plain, want[0], atol=1e-4), "the window must change the output, or this tests nothing"
    stream = StreamedReference(loaded.base_model_path, loaded.adapter, loaded.task_id)
    for got, ref in zip(streamed_logits(stream, inputs), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


def test_merge_report_agrees_with_the_whole_model() -> None:
    loaded = _load("goat")
    whole = merge(loaded, threshold=0.9, samples=4, seq_len=12, progress=False)
    adapter_only = load_without_model(SAMPLES / "goat")
    streamed = merge(adapter_only, threshold=0.9, samples=4, seq_len=12, progress=False, streaming=Streaming())
    assert streamed.loaded.model is None  # nothing built the whole model
    assert streamed.plan.to_dict() == whole.plan.to_dict()
    merged = [r for r in whole.report.units if r.error_measured is not None]
    assert len(merged) >= 2, "the goat sample merges some units at 0.9"
    for got, want in zip(streamed.report.units, whole.report.units, strict=True):
        assert (got.name, got.action) == (want.name, want.action)
        if want.error_measured is not None:
            assert got.error_measured == pytest.approx(want.error_measured, rel=RTOL)
    assert streamed.report.heldout_tokens == whole.report.heldout_tokens > 0
    assert streamed.report.top1_agreement == whole.report.top1_agreement
    assert streamed.report.logits_rel_error == pytest.approx(whole.report.logits_rel_error, rel=RTOL)
    assert whole.report.logits_rel_error > 1e-3  # the merge changes the logits: the comparison is not vacuous

    # `onnx --forward layers`: the caller holds the model (to export it); the streamed check leaves it merged the same.
    held = merge(loaded, threshold=0.9, samples=4, seq_len=12, progress=False, streaming=Streaming())
    ids = torch.arange(2, 14)[None]  # [1, 12]
    with torch.no_grad():
        torch.testing.assert_close(held.loaded.model(input_ids=ids).logits, whole.loaded.model(input_ids=ids).logits)
    assert held.report.to_dict() == streamed.report.to_dict()


@pytest.mark.parametrize("name", ["mola", "moelora", "hydralora", "loramoe", "mmoelora", "moe_peft_mola", "mixlora"])
def test_merge_reports_agree_on_every_family(name: str) -> None:
    whole = merge(_load(name), threshold=0.5, samples=3, seq_len=10, progress=False)
    adapter_only = load_without_model(SAMPLES / name, task_id=TASK_IDS.get(name))
    streamed = merge(adapter_only, threshold=0.5, samples=3, seq_len=10, progress=False, streaming=Streaming())
    assert streamed.plan.to_dict() == whole.plan.to_dict()
    for got, want in zip(streamed.report.units, whole.report.units, strict=True):
        if want.error_measured is None:
            assert got.error_measured is None
        else:
            assert got.error_measured == pytest.approx(want.error_measured, rel=RTOL)
    assert streamed.report.top1_agreement == whole.report.top1_agreement
    assert streamed.report.logits_rel_error == pytest.approx(whole.report.logits_rel_error, rel=RTOL, abs=1e-9)


def test_only_one_part_of_one_layer_is_in_memory_at_a_time() -> None:
    loaded = load_without_model(SAMPLES / "goat")
    stream = StreamedReference(loaded.base_model_path, loaded.adapter)
    inputs = [torch.randint(0, stream.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))]
    assert all(p.is_meta for p in stream.model.parameters())
    seen = []

    def check(*_args: object) -> None:
        """Which (layer, part) hold real weights while a part runs."""
        real = {n for n, p in stream.model.named_parameters() if not p.is_meta}
        seen.append(sorted({(n.split(".")[2], ".mlp." in n) for n in real}))
        assert all(n.startswith("model.layers.") for n in real)  # embeddings and head are freed

    for layer in stream.layers:
        layer.register_forward_pre_hook(check)
        layer.mlp.register_forward_pre_hook(check)
    streamed_logits(stream, inputs)
    assert seen == [[("0", False)], [("0", True)], [("1", False)], [("1", True)]]
    assert all(p.is_meta for p in stream.model.parameters()) and all(b.is_meta for _, b in _layer_buffers(stream))
    assert len({id(m) for m in stream.model.modules() if getattr(m, "unit_name", None)}) == 14  # adapted as it ran


def _layer_buffers(stream: StreamedReference) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for layer in stream.layers for n, b in layer.named_buffers()]


def test_bf16_base_runs_in_bf16_with_fp64_statistics(tmp_path: Path) -> None:
    base = _variant_base(tmp_path, "tiny-llama", torch.bfloat16)
    adapter_only = load_without_model(SAMPLES / "goat", base)
    stream = StreamedReference(adapter_only.base_model_path, adapter_only.adapter)
    assert stream.dtype == torch.bfloat16
    dtypes: set[torch.dtype] = set()
    routers: set[torch.dtype] = set()
    for part in PARTS:
        with stream.part(0, part) as layer:
            dtypes.update(p.dtype for p in layer.parameters() if not p.is_meta)
            routers.update(b.dtype for n, b in layer.named_buffers() if n.endswith("router_weight") and not b.is_meta)
    assert dtypes == {torch.bfloat16} and routers == {torch.float32}  # GOAT routes in fp32

    streamed = calibrate_layerwise(adapter_only, CalibrationSet(samples=3, seq_len=11), progress=False)
    same_dtype = calibrate(_load("goat", torch.bfloat16, base), samples=3, seq_len=11, progress=False)
    # Same bf16 weights, same ops: the streamed run equals the whole bf16 model to rounding.
    assert_stats_close(streamed, same_dtype, RTOL, 1e-7)
    # Against the fp32 oracle the bf16 model differs by its weights' rounding (8 mantissa bits, ~0.4% per
    # weight), so gates move slightly and a near-tie top-2 choice can flip. Measured on these 33 tokens: 0.0023 max
    # on mean gates, 0.030 on selection frequency (one token flips one choice), 3% relative on ε; the bounds
    # leave about 3x room.
    fp32 = calibrate(_load("goat"), samples=3, seq_len=11, progress=False)
    for name, want in fp32.units.items():
        got = streamed.units[name]
        torch.testing.assert_close(torch.tensor(got.mean_gate), torch.tensor(want.mean_gate), rtol=0, atol=0.01)
        torch.testing.assert_close(
            torch.tensor(got.selection_frequency), torch.tensor(want.selection_frequency), rtol=0, atol=0.1
        )
        assert got.error == pytest.approx(want.error, rel=0.1)
        assert isinstance(got.moments["base_sq"], float)  # fp64 sums, stored as Python floats


def test_cli_forward_layers_and_whole_write_the_same_stats(tmp_path: Path) -> None:
    runner = CliRunner()
    outs = {}
    for forward in ("layers", "whole"):
        out = tmp_path / f"{forward}.json"
        args = ["calibrate", str(SAMPLES / "goat"), "-o", str(out), "--samples", "3", "--seq-len", "9"]
        result = runner.invoke(app, [*args, "--forward", forward, "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.output
        outs[forward] = CalibrationStats.load(out)
    assert_stats_close(outs["layers"], outs["whole"], RTOL, 1e-7)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--forward", "sideways"], "--forward 'sideways'"),
        (["--device", "tpu"], "--device tpu"),
        (["--forward", "whole", "--device", "cuda"], "--device cuda"),
    ],
)
def test_cli_bad_forward_or_device_exit_2_writing_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    if torch.cuda.is_available() and args[-1] == "cuda":
        args = ["--forward", "whole", "--device", "cuda"]  # still refused: the whole model runs on the CPU
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_without_cuda_refuses_device_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(out), "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not out.exists()


@pytest.mark.gpu
def test_cuda_streamed_stats_match_cpu() -> None:
    loaded = load_without_model(SAMPLES / "goat")
    calib = CalibrationSet(samples=3, seq_len=11)
    cpu = calibrate_layerwise(loaded, calib, progress=False)
    gpu = calibrate_layerwise(loaded, calib, progress=False, streaming=Streaming("cuda"))
    # Different kernels (cuBLAS, TF32 off by default for fp32 matmuls): agreement to fp32 rounding.
    assert_stats_close(gpu, cpu, 1e-4, 1e-5)


def test_auto_runs_the_whole_model_for_a_base_without_safetensors(tmp_path: Path) -> None:
    """Streaming reads safetensors only: auto falls back to the whole model, an explicit `layers` says why."""
    from transformers import LlamaForCausalLM

    from tests.tiny import random_adapter, tiny_llama_config

    base = tmp_path / "bin-base"
    model = LlamaForCausalLM(tiny_llama_config())
    model.config.save_pretrained(str(base))
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    adapter = random_adapter()
    adapter.base_model = str(base)
    ckpt = adapter.save(tmp_path / "ckpt")
    runner = CliRunner()
    out = tmp_path / "stats.json"
    args = ["calibrate", str(ckpt), "-o", str(out), "--samples", "2", "--seq-len", "5", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert CalibrationStats.load(out).tokens == 10
    refused = runner.invoke(app, [*args[:3], str(tmp_path / "x.json"), "--forward", "layers"])
    assert refused.exit_code == 2 and "safetensors" in refused.output and str(base) in refused.output
    assert not (tmp_path / "x.json").exists()


def test_cli_calibrate_and_merge_never_build_the_whole_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the whole base model was built")

    monkeypatch.setattr("moe_export.reference.loading.load_base_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    runner = CliRunner()
    stats, out = tmp_path / "stats.json", tmp_path / "merged"
    tokens = ["--samples", "2", "--seq-len", "8"]
    result = runner.invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(stats), *tokens])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", str(SAMPLES / "goat"), "--merge-threshold", "0.9", "-o", str(out), *tokens])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "moe_export_merge.json").read_text())["report"]
    assert report["heldout_tokens"] == 16 and report["top1_agreement"] is not None
    whole = runner.invoke(
        app, ["calibrate", str(SAMPLES / "goat"), "-o", str(tmp_path / "w.json"), "--forward", "whole"]
    )
    assert whole.exit_code != 0  # the patch is live: the whole-model path would have been caught
