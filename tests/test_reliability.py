"""Issue 14: bad input found by a new user, each refused with one line and exit 2 before any work, and
outputs that never lose a user's file. Table-driven: each case is (command line, words the one line holds).

Unwritable outputs point under /sys: creating a file there fails even for root (which ignores permission
bits), so the case holds on a developer machine, in a root container and on a CI runner alike.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.export.manifest import ExportManifest, portable_path
from moe_export.formats.checkpoint import read_tensor_file
from tests.artifacts import merged_sample_run, sample_export, shared_dir
from tests.conftest import SAMPLES, copy_sample

UNWRITABLE = Path("/sys/moe-export-test/out")
BASE = (SAMPLES / "tiny-llama").resolve()


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(args: list[str], *needles: str) -> None:
    code, out, err = run(args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def retype(dtype: torch.dtype) -> Callable[[Path], Path]:
    """A goat checkpoint whose tensors were converted to `dtype` (a broken conversion script)."""

    def build(tmp_path: Path) -> Path:
        from safetensors.torch import save_file

        ckpt = copy_sample(tmp_path, "goat")
        path = ckpt / "adapter_model.safetensors"
        tensors = {k: (v.float() * 100).to(dtype) for k, v in read_tensor_file(path).items()}
        save_file(tensors, str(path))
        return ckpt

    return build


@pytest.mark.parametrize(("dtype", "name"), [(torch.int32, "int32"), (torch.bool, "bool"), (torch.float64, "float64")])
@pytest.mark.parametrize("command", ["inspect", "onnx"])
def test_non_float_adapter_weights_are_refused_at_load(
    tmp_path: Path, dtype: torch.dtype, name: str, command: str
) -> None:
    ckpt = retype(dtype)(tmp_path)
    extra = ["-o", tmp_path / "out", "--no-validate"] if command == "onnx" else []
    assert_one_line_error([command, ckpt, *extra], "adapter_model.safetensors", name, "float32, float16 or bfloat16")
    assert not (tmp_path / "out").exists()


def _fake_export(tmp_path: Path, vocab: int = 128) -> Path:
    """An export directory as far as option and input checks read it (no model: they run before one loads)."""
    out = tmp_path / "export"
    out.mkdir()
    ExportManifest("0", str(SAMPLES / "goat"), str(BASE), "goat", "fp32", 20).save(out)
    (out / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return out


# (command line with {tmp}, {export} placeholders, words the error line must hold)
UNWRITABLE_CASES = {
    "onnx -o": (["onnx", SAMPLES / "goat", "-o", UNWRITABLE], ["-o", "not writable"]),
    "onnx -o under a file": (["onnx", SAMPLES / "goat", "-o", SAMPLES / "goat" / "adapter_config.json" / "x"], ["-o"]),
    "merge -o": (["merge", SAMPLES / "goat", "-o", UNWRITABLE, "--no-eval"], ["-o", "not writable"]),
    "calibrate -o": (["calibrate", SAMPLES / "goat", "-o", UNWRITABLE / "s.json"], ["-o", "not writable"]),
    "validate --report": (["validate", "{export}", "--report", UNWRITABLE / "r.json"], ["--report", "not writable"]),
    "validate --junit": (["validate", "{export}", "--junit", UNWRITABLE / "j.xml"], ["--junit", "not writable"]),
    "bench --plot": (["bench", "{export}", "--plot", UNWRITABLE / "p.png"], ["--plot", "not writable"]),
}


@pytest.mark.parametrize("case", list(UNWRITABLE_CASES))
def test_unwritable_output_is_refused_before_the_work(tmp_path: Path, case: str) -> None:
    if case == "bench --plot":
        pytest.importorskip("matplotlib")
    args, needles = UNWRITABLE_CASES[case]
    export = _fake_export(tmp_path)
    args = [str(export) if a == "{export}" else a for a in args]
    assert_one_line_error(args, *needles)


OPTION_CASES = {
    # mmoelora needs --task-id: a bad option must still be the one reported (checked before loading).
    "dtype before task id": (["onnx", SAMPLES / "mmoelora", "--dtype", "fp33"], ["--dtype", "fp33"]),
    "threshold before task id": (["onnx", SAMPLES / "mmoelora", "--merge-threshold", "2"], ["--merge-threshold"]),
    "merge threshold": (["merge", SAMPLES / "mmoelora", "-o", "{tmp}/m", "--merge-threshold", "0"], ["threshold"]),
    "top-k 0": (["onnx", SAMPLES / "mola", "--top-k", "0"], ["--top-k 0"]),
    "top-k 0 in a list": (["calibrate", SAMPLES / "mola", "-o", "{tmp}/s.json", "--top-k", "2,0"], ["--top-k 0"]),
    "top-k above E": (["inspect", SAMPLES / "mola", "--top-k", "100"], ["--top-k 100", "experts"]),
    "top-k on a family without top-k": (["inspect", SAMPLES / "loramoe", "--top-k", "1"], ["--top-k", "drop"]),
    "missing task id": (["onnx", SAMPLES / "mmoelora", "-o", "{tmp}/o"], ["--task-id N", "0..3"]),
    "calibrate samples": (["calibrate", SAMPLES / "goat", "-o", "{tmp}/s.json", "--samples", "0"], ["--samples"]),
    "validate rtol": (["validate", "{export}", "--rtol", "-1"], ["--rtol"]),
    "validate min-top1": (["validate", "{export}", "--min-top1", "1.5"], ["--min-top1"]),
    "validate device": (["validate", "{export}", "--device", "tpu"], ["--device", "tpu"]),
    "validate batch": (["validate", "{export}", "--batch", "0"], ["--batch"]),
    "validate ckpt moved away": (["validate", "{export}", "--ckpt", "{tmp}/gone"], ["--ckpt", "not found"]),
    "bench iters": (["bench", "{export}", "--iters", "0"], ["--iters"]),
    "bench batch": (["bench", "{export}", "--batch", "1,0"], ["--batch"]),
    "bench max-ratio": (["bench", "{export}", "--max-ratio", "-1"], ["--max-ratio"]),
    # issue 23: options checked only after loading (or not at all) before
    "opset above the exporter's": (["onnx", SAMPLES / "mmoelora", "--opset", "99"], ["--opset 99", "18..23"]),
    "bf16 with validation": (["onnx", SAMPLES / "mmoelora", "--dtype", "bf16", "-o", "{tmp}/o"], ["--no-validate"]),
    "validate new-tokens -1": (["validate", "{export}", "--new-tokens", "-1"], ["--new-tokens -1"]),
    "generate threads -3": (
        ["generate", "{export}", "--prompt-ids", "1,2", "--threads", "-3", "--runtime", "torch"],
        ["--threads -3"],
    ),
    "generate max-new-tokens -1": (["generate", "{export}", "--prompt-ids", "1", "--max-new-tokens", "-1"], ["-1"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_is_refused_before_the_model_loads(tmp_path: Path, case: str) -> None:
    args, needles = OPTION_CASES[case]
    export = _fake_export(tmp_path)
    args = [str(export) if a == "{export}" else str(a).replace("{tmp}", str(tmp_path)) for a in args]
    assert_one_line_error(args, *needles)
    assert not any(p.name in ("o", "m", "s.json") for p in tmp_path.iterdir())


def test_task_id_message_names_the_option_not_the_keyword() -> None:
    code, _, err = run(["onnx", SAMPLES / "mmoelora", "--no-validate", "-o", "/nonexistent-dir-for-test/o"])
    assert code == 2 and "(task_id=)" not in err


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"this is not an npz archive at all", ["not an .npz archive"]),
        (None, ["input_ids range", "outside the vocabulary 0..127"]),
    ],
)
def test_validate_inputs_garbage_or_out_of_vocab(tmp_path: Path, content: bytes | None, needles: list[str]) -> None:
    export = _fake_export(tmp_path, vocab=128)
    npz = tmp_path / "inputs.npz"
    if content is None:
        np.savez(npz, input_ids=np.array([[1, 2, 128]], dtype=np.int64))
    else:
        npz.write_bytes(content)
    assert_one_line_error(["validate", export, "--inputs", npz], str(npz), *needles)


@pytest.mark.parametrize("mask", [[[0, 0, 0]], [[1, 1, 1], [0, 0, 0]], [[1, 2, 1]]])
def test_validate_inputs_mask_without_tokens_is_bad_input(tmp_path: Path, mask: list[list[int]]) -> None:
    """An all-zero attention-mask row has no token to compare: it was exit 1, 'nothing to compare' (a failed gate)."""
    export = _fake_export(tmp_path, vocab=128)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, input_ids=np.ones((len(mask), 3), dtype=np.int64), attention_mask=np.array(mask, dtype=np.int64))
    assert_one_line_error(["validate", export, "--inputs", npz], str(npz), "attention_mask")


def test_help_shows_conventional_usage_and_plain_flags() -> None:
    code, out, _ = run(["onnx", "--help"])
    assert code == 0
    assert "{ckpt}" not in out and "{CKPT}" not in out and "CKPT" in out
    assert "<bool>" not in out
    json_line = next(line for line in out.splitlines() if "--json" in line)
    assert "bool" not in json_line


@pytest.mark.parametrize("debug", [False, True])
def test_debug_never_changes_the_exit_code_of_bad_input(tmp_path: Path, debug: bool) -> None:
    ckpt = retype(torch.int32)(tmp_path)
    code, _, _ = run([*(["--debug"] if debug else []), "inspect", ckpt])
    assert code == 2


def test_portable_path_is_relative_inside_a_tree_and_absolute_across_roots(tmp_path: Path) -> None:
    assert portable_path(tmp_path / "a" / "ckpt", tmp_path / "b" / "out") == "../../a/ckpt"
    assert Path(portable_path("/", tmp_path / "out")).is_absolute()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project tree: the lora sample and its base model copied in, exported next to them, once per run.

    export/ starts as a copy of the run's plain export of samples/lora (tests/artifacts.py), and the tree's
    `onnx` (no --force) is written over it: test_reexport_over_our_own_export_needs_no_force checks that run.
    """
    previous = sample_export(tmp_path_factory, SAMPLES / "lora").out_dir

    def build(root: Path) -> None:
        tree = root / "tree"
        shutil.copytree(SAMPLES / "tiny-llama", tree / "tiny-llama")
        shutil.copytree(SAMPLES / "lora", tree / "lora")
        shutil.copytree(previous, tree / "export")
        code, _, err = run(["onnx", tree / "lora", "-o", tree / "export", "--no-validate"])
        (root / "reexport.json").write_text(json.dumps({"exit_code": code, "stderr": err}))

    return shared_dir(tmp_path_factory, "reliability-project", build) / "tree"


def test_export_records_relative_sources_and_validate_takes_overrides(project: Path, tmp_path: Path) -> None:
    # The fixture exported inside its tree (export/ beside lora/ and tiny-llama/). In a copy of that tree the
    # absolute source paths are pointed at the copy, as an export made there records them, so that moving the
    # copy below leaves nothing at the recorded absolute paths (the fixture's tree must stay for other tests).
    tree = shutil.copytree(project, tmp_path / "tree")
    manifest_path = tree / "export" / "export.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["source_checkpoint"] == str((project / "lora").resolve())
    assert manifest["base_model"] == str((project / "tiny-llama").resolve())
    manifest.update(source_checkpoint=str(tree / "lora"), base_model=str(tree / "tiny-llama"))
    manifest_path.write_text(json.dumps(manifest))
    relative = manifest["relative_sources"]
    assert relative == {"source_checkpoint": "../lora", "base_model": "../tiny-llama"}
    moved = tmp_path / "moved"
    shutil.move(tree, moved)  # the whole tree moves (the absolute paths are gone): nothing to say
    assert run(["validate", moved / "export"])[0] == 0
    shutil.move(moved / "lora", tmp_path / "elsewhere")  # only the checkpoint moves: say where
    code, _, err = run(["validate", moved / "export"])
    assert code == 2 and "--ckpt" in err
    assert run(["validate", moved / "export", "--ckpt", tmp_path / "elsewhere"])[0] == 0


def test_reexport_never_deletes_a_users_file(project: Path, tmp_path: Path) -> None:
    export = shutil.copytree(project / "export", tmp_path / "export")
    (export / "notes.txt").write_text("mine")
    old_model = (export / "model.onnx").stat().st_mtime_ns
    args = ["onnx", project / "lora", "-o", export, "--no-validate"]
    assert_one_line_error(args, "notes.txt", "--force")
    assert (export / "notes.txt").read_text() == "mine"
    assert (export / "model.onnx").stat().st_mtime_ns == old_model  # refused before writing anything
    code, _, err = run([*args, "--force"])
    assert code == 0, err
    assert (export / "notes.txt").read_text() == "mine"
    assert (export / "model.onnx").stat().st_mtime_ns != old_model
    assert (export / "export.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_reexport_over_our_own_export_needs_no_force(project: Path) -> None:
    """The fixture's `onnx` ran over an earlier export of ours (of samples/lora) without --force."""
    reexport = json.loads((project.parent / "reexport.json").read_text())
    assert reexport["exit_code"] == 0, reexport["stderr"]
    manifest = json.loads((project / "export" / "export.json").read_text())
    assert manifest["source_checkpoint"] == str((project / "lora").resolve())  # replaced: was samples/lora's
    assert not [p for p in project.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_non_tty_tables_are_not_cut_and_onnx_run_has_no_merge_titled_table(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The quick start's command line, run once per test run (test_onnx_export checks the same export's parity).
    quick_start = merged_sample_run(tmp_path_factory, SAMPLES / "goat")
    code, out, err = quick_start.exit_code, quick_start.stdout, quick_start.stderr
    assert code == 0, err
    assert "…" not in out + err
    assert "moe-export merge" not in out + err
    # The quick start shows the product: some routers collapsed (merged), others mixed (kept), then next steps.
    found = re.search(r"(\d+) GroupedLoRA units, (\d+) folded/merged", out)
    assert found and int(found.group(1)) > 0 and int(found.group(2)) > 0, out
    assert "next: moe-export validate" in out
    # Tables on stdout as for validate and merge (they were on stderr), each message one line in a log (the
    # routing line was cut mid-sentence at 200 columns), and no empty lines left by progress bars on stderr.
    assert "Merge plan" in out and "Parity of the fp32 export" in out and "PASSED parity passed" in out
    routing = [line for line in out.splitlines() if line.startswith("routing (")]
    assert routing and all(line.endswith("all units pass") for line in routing), routing
    assert not err.startswith("\n") and "\n\n" not in err, repr(err[:300])


@pytest.mark.parametrize("name", ["mola", "hydralora"])
def test_fp16_export_passes_its_own_gate_against_the_fp32_reference(tmp_path: Path, name: str) -> None:
    """mola: a .half() torch model is 0.128 off its fp32 self while the fp16 export is 0.006 off it, so the
    gate compares with fp32; hydralora: a dense router's tiny gates underflow to 0 in fp16 and must not
    read as routing flips."""
    out = tmp_path / "o"
    code, _, err = run(["onnx", SAMPLES / name, "-o", out, "--dtype", "fp16", "--no-validate"])
    assert code == 0, err
    code, stdout, err = run(["validate", out, "--json"])
    assert code == 0, stdout + err
    report = json.loads(stdout)
    assert report["passed"]


def test_underflowed_dense_gate_is_not_a_routing_flip() -> None:
    from moe_export.validation.units import selection_mask

    ids = np.array([[0, 1, 2]])
    probs = np.array([[0.6, 0.4 - 1e-9, 1e-9]], dtype=np.float32)
    reference = selection_mask(ids, probs, 3)
    candidate = selection_mask(ids, np.array([[0.6, 0.4, 0.0]], dtype=np.float16), 3)
    assert (reference == candidate).all()
    dropped = selection_mask(ids, np.array([[0.6, 0.0, 0.0]], dtype=np.float16), 3)  # a real flip still counts
    assert not (reference == dropped).all()


def test_shape_error_from_the_adapter_ir_names_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ckpt = copy_sample(tmp_path, "goat")
    path = ckpt / "adapter_model.safetensors"
    tensors = read_tensor_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_gating.weight"))
    tensors[key] = tensors[key][:3].clone()  # 3 router rows for 4 experts
    save_file(tensors, str(path))
    assert_one_line_error(["inspect", ckpt], "adapter_model.safetensors")
