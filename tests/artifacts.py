"""Export directories shared by the test modules, each made once per test run.

Exports dominate the suite's time (~7 s of CPU each even on the tiny models: torch.export traces every op),
so each distinct export is made once and read by every test that needs it. Under pytest-xdist every worker
is a pytest session of its own: the entries live in the temporary directory all workers of a run share,
and a file lock lets one worker build an entry while any other that needs it waits (no partial entry is
ever read: `<name>.done` is written after the build returned). Entries are read-only: a test that changes
one copies it first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_export.export.manifest import ExportManifest
from moe_export.export.onnx import ExportResult
from tests.conftest import SAMPLES
from tests.tiny import random_adapter, save_tiny_llama

STORE = "shared-artifacts"


def _store(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    # xdist gives each worker <run's temp dir>/popen-gwN; the directory above is common to the run's workers.
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / STORE
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_dir(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """<store>/<name>, made by `build(<store>/<name>)` the first time any test of the run asks for it."""
    root = _store(factory)
    path, done = root / name, root / f"{name}.done"
    if done.exists():
        return path
    with _locked(root / f"{name}.lock"):
        if not done.exists():
            if path.exists():  # a build that failed half way (in an earlier test): start again
                shutil.rmtree(path)
            build(path)
            done.write_text("")
    return path


@dataclass(frozen=True)
class CliRun:
    """A `moe-export` command line run once per test run: its export directory and what it printed."""

    out_dir: Path
    exit_code: int
    stdout: str
    stderr: str


def shared_cli_run(factory: pytest.TempPathFactory, name: str, args: Callable[[Path], list[str]]) -> CliRun:
    """`moe-export *args(out_dir)` in process (typer's CliRunner), once; the record sits next to the output."""

    def build(root: Path) -> None:
        from typer.testing import CliRunner

        from moe_export.cli import app

        root.mkdir()
        result = CliRunner().invoke(app, [str(a) for a in args(root / "out")])
        record = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
        (root / "run.json").write_text(json.dumps(record))

    root = shared_dir(factory, name, build)
    record = json.loads((root / "run.json").read_text())
    return CliRun(root / "out", record["exit_code"], record["stdout"], record["stderr"])


def tiny_base_dir(factory: pytest.TempPathFactory) -> Path:
    """The random-init tiny Llama (tests/tiny.py), one directory for every worker."""
    return shared_dir(factory, "tiny-llama", save_tiny_llama)


def save_tiny_checkpoint(directory: Path, base: Path, seed: int = 0) -> Path:
    """A canonical-layout checkpoint over the tiny Llama at `base`."""
    adapter = random_adapter(seed=seed)
    adapter.base_model = str(base)
    return adapter.save(directory)


def export_tiny(
    ckpt: Path, base: Path, out: Path, base_only: bool = False, dtype: str = "fp32", fusion: str = "none"
) -> Path:
    """`moe_export.export_onnx` of the checkpoint (validation off: the tests run it themselves)."""
    import moe_export

    loaded = moe_export.load(ckpt, base_model=base)
    moe_export.export_onnx(loaded, out, dtype=dtype, base_only=base_only, validate=False, progress=False, fusion=fusion)
    return out


def shared_export(factory: pytest.TempPathFactory, base: Path) -> Path:
    """The KV-cache decoder export of the tiny checkpoint (seed 0), once per run; callers must not modify it."""

    def build(root: Path) -> None:
        ckpt = save_tiny_checkpoint(root / "ckpt", base)
        export_tiny(ckpt, base, root / "onnx")

    return shared_dir(factory, "export-adapter", build) / "onnx"


def shared_fused_export(factory: pytest.TempPathFactory, base: Path) -> Path:
    """The same decoder export with `fusion="contrib"` (export/decoder_fused.py), once per run."""

    def build(root: Path) -> None:
        ckpt = save_tiny_checkpoint(root / "ckpt", base)
        export_tiny(ckpt, base, root / "onnx", fusion="contrib")

    return shared_dir(factory, "export-adapter-contrib", build) / "onnx"


def shared_scoring_run(factory: pytest.TempPathFactory, base: Path) -> CliRun:
    """`moe-export onnx --no-kv-cache --json` of the tiny checkpoint (seed 0), validation included, once per run."""

    def args(out: Path) -> list[str]:
        ckpt = save_tiny_checkpoint(out.parent / "ckpt", base)
        return ["onnx", ckpt, "--base", base, "-o", out, "--no-kv-cache", "--json"]

    return shared_cli_run(factory, "export-scoring", args)


def export_result(out: Path) -> ExportResult:
    """The ExportResult of an export directory, as read back from its export.json."""
    manifest = ExportManifest.load(out)
    return ExportResult(out, out / manifest.model_file, manifest, seconds=0.0)


# Task-routed samples (MOELoRA) need a task id to load; the others take none.
SAMPLE_TASK_IDS = {"mmoelora": 0}


def sample_export(factory: pytest.TempPathFactory, sample: Path) -> ExportResult:
    """`moe_export.export_onnx` of a shipped sample, no merge, once per run; read only."""

    def build(root: Path) -> None:
        import moe_export

        loaded = moe_export.load(sample, task_id=SAMPLE_TASK_IDS.get(sample.name))
        moe_export.export_onnx(loaded, root, validate=False, progress=False)

    return export_result(shared_dir(factory, f"sample-{sample.name}", build))


def merged_sample_run(factory: pytest.TempPathFactory, sample: Path) -> CliRun:
    """The quick start's `moe-export onnx SAMPLE --merge-threshold 0.9` (validation included), once per run."""
    task = SAMPLE_TASK_IDS.get(sample.name)
    options = ["--task-id", str(task)] if task is not None else []
    return shared_cli_run(
        factory,
        f"merged-{sample.name}",
        lambda out: ["onnx", SAMPLES / sample.name, "-o", out, "--merge-threshold", "0.9", *options],
    )
