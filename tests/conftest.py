"""Shared fixtures: tiny models built in the test, GPU skipping."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


def copy_sample(tmp_path: Path, name: str) -> Path:
    """A sample checkpoint copied to tmp_path, its base model reference made absolute (samples/tiny-llama)."""
    out = tmp_path / name
    shutil.copytree(SAMPLES / name, out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str((SAMPLES / "tiny-llama").resolve())
    cfg_path.write_text(json.dumps(cfg))
    return out


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread per test process (and per subprocess a test starts). The tiny models here are far too small
# to gain from intra-op threads, and on a busy 2-core machine the second thread's spin-waits made them slow:
# writing the goat sample took 0.15 s with one thread and 1.5-7.6 s (CPU time alike) with two. Under xdist
# each worker is one process, so the workers split the cores instead of contending for them.
TORCH_THREADS = 1
os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))
torch.set_num_threads(TORCH_THREADS)
if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET once, when its kernels are defined; torch.export and the TensorRT
    # plugin tests import triton early, so the choice must be made here, before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama (hidden 32, 2 layers, vocab 64) saved as a transformers directory, one per run."""
    from tests.artifacts import tiny_base_dir

    return tiny_base_dir(tmp_path_factory)


def native_library_or_skip() -> Path:
    """The native kernel library, built here; without a compiler or headers the test skips and says why, except
    in CI (CI=true), which builds the library first (.ci/run): there a failed build fails the test instead, so a
    green CI run always covers the native kernels."""
    from moe_export.runtimes import native

    try:
        return native.build()
    except native.KernelBuildError as exc:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"CI=true: the native kernel library must build here ({exc})", pytrace=False)
        pytest.skip(f"native kernels not buildable here: {exc}")
