"""Issue 23 item 2: no path read from a file escapes its directory, no output overwrites an input, config
values are type-checked. Each case is refused with one line and exit 2, and the file it threatened is intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_export.errors import FormatError
from moe_export.export.manifest import ExportManifest
from moe_export.reference.loading import load_adapter
from tests.artifacts import sample_export
from tests.conftest import SAMPLES, copy_sample
from tests.test_reliability import _fake_export, assert_one_line_error, run

VICTIM_TEXT = "the user's file"


def _plant_victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    return victim


def _export_copy(tmp_path: Path, factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(sample_export(factory, SAMPLES / "lora").out_dir, tmp_path / "export"))


def _edit_manifest(export: Path, **changes: object) -> None:
    path = export / "export.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# every file-name field of export.json, each pointed at the victim (relative and absolute)
PATH_FIELDS = {
    "model_file-relative": lambda v: {"model_file": "../victim.txt"},
    "model_file-absolute": lambda v: {"model_file": str(v)},
    "external_data-relative": lambda v: {"external_data": "../victim.txt"},
    "external_data-absolute": lambda v: {"external_data": str(v)},
    "copied_files-relative": lambda v: {"copied_files": ["config.json", "../victim.txt"]},
    "copied_files-absolute": lambda v: {"copied_files": [str(v)]},
    "copied_files-not-a-list": lambda v: {"copied_files": "../victim.txt"},
}


@pytest.mark.parametrize("field", list(PATH_FIELDS))
@pytest.mark.parametrize("command", ["validate", "triton", "bench"])
def test_manifest_paths_outside_the_export_are_refused(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, field: str, command: str
) -> None:
    victim = _plant_victim(tmp_path)
    export = _export_copy(tmp_path, tmp_path_factory)
    _edit_manifest(export, **PATH_FIELDS[field](victim))
    extra = ["-o", tmp_path / "repo"] if command == "triton" else []
    assert_one_line_error([command, export, *extra], "export.json")
    assert victim.read_text() == VICTIM_TEXT
    assert not (tmp_path / "repo").exists()


def test_reexport_with_force_never_deletes_outside_the_export(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The issue's case: `copied_files: ["../victim.txt"]` made `onnx -o X --force` delete the victim.
    Also a name through a symlinked directory inside the export, which is lexically inside it."""
    victim = _plant_victim(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    linked_victim = _plant_victim(tmp_path / "elsewhere")
    export = _export_copy(tmp_path, tmp_path_factory)
    (export / "link").symlink_to(tmp_path / "elsewhere")
    (export / "notes.txt").write_text("mine")  # a user's file: the replace needs --force
    manifest = json.loads((export / "export.json").read_text())
    for copied in (["../victim.txt"], [str(victim)], ["link/victim.txt"]):
        _edit_manifest(export, copied_files=[*manifest["copied_files"], *copied])
        code, _, err = run(["onnx", SAMPLES / "lora", "-o", export, "--force", "--no-validate"])
        assert code in (0, 2), err
        assert victim.read_text() == VICTIM_TEXT and linked_victim.read_text() == VICTIM_TEXT
        assert (export / "notes.txt").read_text() == "mine"


def test_relative_sources_null_is_bad_input(tmp_path: Path) -> None:
    export = _fake_export(tmp_path)
    _edit_manifest(export, relative_sources=None)
    assert_one_line_error(["validate", export], "export.json", "relative_sources", "null")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"base_only": "false"}, "'base_only' is 'false', expected true or false"),
        ({"custom_ops": "GroupedLoRA"}, "'custom_ops' is 'GroupedLoRA', expected a list"),
        ({"opset": "20"}, "'opset'"),
        ({"relative_sources": {"base_model": 3}}, "'relative_sources'"),
        ({"units": [{"name": "x", "kind": "linear_moe", "status": "routed", "num_experts": "4"}]}, "num_experts"),
    ],
)
def test_manifest_values_are_type_checked(tmp_path: Path, changes: dict, needle: str) -> None:
    export = _fake_export(tmp_path)
    _edit_manifest(export, **changes)
    assert_one_line_error(["validate", export], "export.json", needle)


def test_manifest_round_trips_and_accepts_what_we_write(tmp_path: Path) -> None:
    export = _fake_export(tmp_path)
    manifest = ExportManifest.load(export)
    assert ExportManifest.from_dict(manifest.to_dict()) == manifest


@pytest.mark.parametrize(("sample", "flag"), [("lora", "use_rslora"), ("moelora", "use_rslora"), ("lora", "use_dora")])
@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_config_booleans_are_booleans(tmp_path: Path, sample: str, flag: str, value: object) -> None:
    """`"use_rslora": "false"` was read as true: scaling alpha/sqrt(r) instead of alpha/r, exit 0."""
    ckpt = copy_sample(tmp_path, sample)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg[flag] = value
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=f"'{flag}' is {value!r}, expected true or false"):
        load_adapter(ckpt)
    assert_one_line_error(["inspect", ckpt], "adapter_config.json", flag)


@pytest.mark.parametrize("sample", ["moe_peft_mola", "mixlora"])
def test_moe_peft_config_booleans_are_booleans(tmp_path: Path, sample: str) -> None:
    ckpt = copy_sample(tmp_path, sample)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["use_rslora"] = "false"
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", ckpt], "adapter_config.json", "use_rslora")


# Outputs that resolve to an input of the same command, or into an input directory: (args, the threatened file)
def _overwrite_cases(tmp_path: Path) -> dict[str, tuple[list, Path]]:
    export = _fake_export(tmp_path)
    ckpt = copy_sample(tmp_path, "goat")
    npz = tmp_path / "inputs.npz"
    npz.write_bytes(b"not read: refused before")
    config = ckpt / "adapter_config.json"
    return {
        "validate --report export.json": (
            ["validate", export, "--report", export / "export.json"],
            export / "export.json",
        ),
        "validate --junit into the export": (["validate", export, "--junit", export / "j.xml"], export / "export.json"),
        "validate --report onto --inputs": (["validate", export, "--inputs", npz, "--report", npz], npz),
        "calibrate -o adapter_config.json": (["calibrate", ckpt, "-o", config], config),
        "calibrate -o via ..": (["calibrate", ckpt, "-o", ckpt / "x" / ".." / "adapter_config.json"], config),
        "bench --plot model.onnx": (["bench", export, "--plot", export / "model.onnx"], export / "export.json"),
        "bench --report export.json": (["bench", export, "--report", export / "export.json"], export / "export.json"),
        "onnx -o inside the checkpoint": (["onnx", ckpt, "-o", ckpt / "onnx"], config),
        "onnx -o the checkpoint": (["onnx", ckpt, "-o", ckpt, "--force"], config),
        "onnx -o holding the checkpoint": (["onnx", ckpt, "-o", tmp_path, "--force"], config),
        "merge -o inside the checkpoint": (["merge", ckpt, "-o", ckpt / "m", "--no-eval"], config),
        "triton -o inside the export": (["triton", export, "-o", export / "repo"], export / "export.json"),
    }


CASE_NAMES = [
    "validate --report export.json",
    "validate --junit into the export",
    "validate --report onto --inputs",
    "calibrate -o adapter_config.json",
    "calibrate -o via ..",
    "bench --plot model.onnx",
    "bench --report export.json",
    "onnx -o inside the checkpoint",
    "onnx -o the checkpoint",
    "onnx -o holding the checkpoint",
    "merge -o inside the checkpoint",
    "triton -o inside the export",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_output_onto_an_input_is_refused_before_the_work(tmp_path: Path, case: str) -> None:
    args, threatened = _overwrite_cases(tmp_path)[case]
    before = threatened.read_bytes()
    assert_one_line_error(args, "an input of this command")
    assert threatened.read_bytes() == before


def test_onnx_into_the_declared_base_is_refused(tmp_path: Path) -> None:
    """The base a checkpoint names is known only once it is read: export_onnx checks -o against it too."""
    base = Path(shutil.copytree(SAMPLES / "tiny-llama", tmp_path / "base"))
    ckpt = copy_sample(tmp_path, "lora")
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["onnx", ckpt, "-o", base / "onnx", "--no-validate"], "an input of this command")
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in (SAMPLES / "tiny-llama").iterdir())


def test_field_type_check_leaves_unresolvable_annotations_alone() -> None:
    """A field annotated with a name imported only for type checkers is skipped; the others are still checked."""
    from moe_export.files import check_field_types

    namespace: dict = {}
    source = "from __future__ import annotations\nfrom dataclasses import dataclass\n"
    source += "@dataclass\nclass Options:\n    count: int\n    engine: OnlyForTypeCheckers\n"
    exec(source, namespace)
    check_field_types(namespace["Options"](3, object()), "options")
    with pytest.raises(FormatError, match="'count' is '3', expected an integer"):
        check_field_types(namespace["Options"]("3", object()), "options")
