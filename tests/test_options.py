"""Options as data (config.py): every command's options round-trip through JSON, refuse keys a newer version
wrote, check their values when built (before anything loads), and the API takes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_export.errors import MoeExportError
from moe_export.export.options import ExportOptions
from moe_export.merging.options import CalibrateOptions, MergeOptions
from moe_export.validation.options import ValidateOptions


def _examples(tmp_path: Path) -> list[object]:
    data = tmp_path / "calib.txt"
    data.write_text("one line\nanother\n")
    calibration = CalibrateOptions(data=str(data), samples=4, seq_len=16, seed=3, device="cpu", forward="layers")
    merge = MergeOptions(threshold=0.9, evaluate=False, calibration=calibration)
    return [
        CalibrateOptions(),
        calibration,
        MergeOptions(budget=0.5),
        merge,
        ExportOptions(),
        ExportOptions(dtype="fp16", opset=21, kv_cache=False, merge=merge, validate=False, force=True),
        ExportOptions(quantize="int4", block_size=64, max_top1_drop=0.1),
        ValidateOptions(),
        ValidateOptions(runtimes=("onnxruntime", "torch"), batch=2, seq=9, atol=0.1, min_top1=0.9, threads=1),
    ]


def test_round_trip_through_json(tmp_path: Path) -> None:
    for options in _examples(tmp_path):
        data = json.loads(json.dumps(options.to_dict()))  # type: ignore[attr-defined]
        assert type(options).from_dict(data) == options, options


@pytest.mark.parametrize("cls", [CalibrateOptions, MergeOptions, ExportOptions, ValidateOptions])
def test_unknown_keys_from_a_newer_version_are_refused(cls: type) -> None:
    data = cls().to_dict() | {"from_the_future": 1}
    with pytest.raises(MoeExportError, match=r"unknown .* keys \['from_the_future'\].*newer moe-export"):
        cls.from_dict(data)


def test_nested_unknown_keys_are_refused_too() -> None:
    data = ExportOptions(merge=MergeOptions(threshold=0.5)).to_dict()
    data["merge"]["calibration"]["later"] = True
    with pytest.raises(MoeExportError, match=r"merge\.calibration: unknown CalibrateOptions keys \['later'\]"):
        ExportOptions.from_dict(data)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CalibrateOptions(samples=0), "--samples 0"),
        (lambda: CalibrateOptions(seq_len=-1), "--seq-len -1"),
        (lambda: CalibrateOptions(data="/nonexistent/calib.txt"), "--data /nonexistent/calib.txt"),
        (lambda: CalibrateOptions(forward="sideways"), "--forward"),
        (lambda: CalibrateOptions(device="tpu"), "--device tpu"),
        (lambda: CalibrateOptions(forward="whole", device="cuda"), "--forward whole runs on the CPU"),
        (lambda: MergeOptions(threshold=0.5, budget=0.1), "exclude each other"),
        (lambda: MergeOptions(threshold=1.5), "--merge-threshold 1.5"),
        (lambda: MergeOptions(stats="/nonexistent/stats.json"), "--stats"),
        (lambda: ExportOptions(dtype="int8"), "--dtype"),
        (lambda: ExportOptions(opset=12), "--opset 12"),
        (lambda: ExportOptions(opset=99), "--opset 99: torch's ONNX exporter writes opsets 18..23"),
        (lambda: ExportOptions(dtype="bf16"), "pass --no-validate"),
        (lambda: ExportOptions(base_only=True, merge=MergeOptions(threshold=0.9)), "--base-only"),
        (lambda: ExportOptions(quantize="int3"), "--quantize"),
        (lambda: ExportOptions(max_top1_drop=0.1), "--max-top1-drop"),
        (lambda: ValidateOptions(runtimes=("torch",)), "at least two runtimes"),
        (lambda: ValidateOptions(inputs="x.npz", batch=2), "exclusive"),
        (lambda: ValidateOptions(new_tokens=-1), "--new-tokens -1"),
        (lambda: ValidateOptions(min_top1=2.0), "--min-top1"),
        (lambda: ValidateOptions(device="tpu"), "--device"),
    ],
)
def test_values_are_checked_when_built(build: object, message: str) -> None:
    with pytest.raises(MoeExportError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build()  # type: ignore[operator]


def test_export_keywords_map_onto_the_options() -> None:
    """moe_export.export_onnx's older keyword spelling still means the same options."""
    built = ExportOptions.build(None, {"dtype": "fp16", "merge_threshold": 0.9, "progress": False})
    assert built.dtype == "fp16" and built.merge == MergeOptions(
        threshold=0.9, calibration=CalibrateOptions(progress=False)
    )
    with pytest.raises(MoeExportError, match="unknown options"):
        ExportOptions.build(None, {"dtpye": "fp16"})
    with pytest.raises(MoeExportError, match="--data is calibration text"):
        ExportOptions.build(None, {"calibration_data": "x.txt"})


def test_validate_options_say_what_validate_runs() -> None:
    """validate takes ValidateOptions (tests/test_validate_streamed.py runs it both ways); the values are checked."""
    assert ValidateOptions(batch=2).shapes() == [(2, 32)] and ValidateOptions().reference == "streamed"
    with pytest.raises(MoeExportError, match="--reference 'half'"):
        ValidateOptions(reference="half")
    with pytest.raises(MoeExportError, match="--optimization"):
        ValidateOptions(optimization="max")
    # No --optimization: basic for fp16 on the CPU (ORT's `all` stores fp16 weights in fp32), all otherwise.
    assert ValidateOptions().optimization_for("fp16") == "basic" and ValidateOptions().optimization_for("fp32") == "all"
    assert ValidateOptions(device="cuda").optimization_for("fp16") == "all"
    assert ValidateOptions(optimization="extended").optimization_for("fp16") == "extended"


def test_bf16_without_validation_is_fine() -> None:
    assert ExportOptions(dtype="bf16", validate=False).dtype == "bf16"


def test_api_refuses_outputs_onto_inputs_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The -o checks live in the API, so a Python caller gets them too (the CLI only passes its flags on)."""
    import moe_export
    from moe_export.merging import save_merged
    from tests.conftest import copy_sample

    ckpt = copy_sample(tmp_path, "lora")
    before = sorted(p.name for p in ckpt.iterdir())
    with monkeypatch.context() as patch:
        patch.setattr("moe_export.export.onnx.load_without_model", lambda *a, **k: pytest.fail("loaded first"))
        with pytest.raises(MoeExportError, match="an input of this command"):
            moe_export.export_onnx(ckpt, ckpt / "onnx", validate=False, progress=False)
    result = moe_export.merge(ckpt, evaluate=False, progress=False)
    with pytest.raises(MoeExportError, match="an input of this command"):
        save_merged(result, ckpt / "merged", progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_api_checks_out_dir_against_the_declared_base_before_loading_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base a checkpoint names is known once its config is read: -o is checked against it before any weight
    of the base loads (attach_model), not after."""
    import shutil

    import moe_export
    from tests.conftest import SAMPLES, copy_sample

    base = Path(shutil.copytree(SAMPLES / "tiny-llama", tmp_path / "base"))
    ckpt = copy_sample(tmp_path, "lora")
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("moe_export.export.onnx.attach_model", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(MoeExportError, match="an input of this command"):
        moe_export.export_onnx(ckpt, base / "onnx", validate=False, progress=False)
