"""The kernel cache is optional (issue 23): an unusable cache never fails `onnx`, `validate` or `generate`.

The cases: MOE_EXPORT_CACHE a file, MOE_EXPORT_CACHE on a read-only file system, HOME on a read-only file system
(the default cache is ~/.cache/moe-export). With the headers present, sessions build the library in a temporary
folder and say so once; `kernels build` exits 2 with one line. Read-only means a real read-only bind mount in a
private mount namespace (`unshare -m`; chmod would not stop root): those tests skip where unshare is not allowed.
Before this, each case exited 3 (an OSError from mkdir or mkstemp in the cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.runtimes.native import library as native_library
from tests.artifacts import save_tiny_checkpoint, shared_export
from tests.conftest import REPO, native_library_or_skip

NOTICE = "building the native kernels in"


@pytest.fixture
def headers(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real headers named by MOE_EXPORT_ORT_INCLUDE (the issue's "with headers present"), fresh process state."""
    native_library_or_skip()
    found = native_library.find_headers()
    assert found is not None
    monkeypatch.setenv("MOE_EXPORT_ORT_INCLUDE", str(found))
    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)
    _fresh_process_state(monkeypatch)
    return found


def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's library outcome and temporary build, as a new `moe-export` process would."""
    monkeypatch.setattr(native_library, "_session_library", {})
    monkeypatch.setattr(native_library, "_temp_dirs", {})


def _cli(args: list[object]) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr


def _read_only(folder: Path, args: list[object], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`moe-export *args` in a private mount namespace where `folder` is a read-only bind mount of itself."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a real read-only mount")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}'"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private read-only mount here ({probe.stderr.strip()[:100]})")
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    code = "from moe_export.cli import main; main()"
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(folder), sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **env},
        timeout=600,
    )


def test_cache_is_a_file(
    headers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
) -> None:  # fmt: skip
    export = shared_export(tmp_path_factory, tiny_base)  # made (if not yet) with the usual cache
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    monkeypatch.setenv("MOE_EXPORT_CACHE", str(cache))
    _fresh_process_state(monkeypatch)
    code, out = _cli(["kernels", "build"])
    assert code == 2, out
    assert f"kernel cache {cache} is not usable" in out and "MOE_EXPORT_CACHE" in out
    code, out = _cli(["kernels", "build", "--fetch-headers"])  # fetching would have nowhere to go either
    assert code == 2 and "is not usable" in out, out
    assert cache.read_text() == "not a folder"
    code, out = _cli(["kernels"])  # status says why and what sessions do instead
    assert code == 0 and f"the kernel cache {cache} is a file: sessions build it in a temporary folder" in out, out

    code, out = _cli(["validate", export, "--batch", "1", "--seq", "4", "--new-tokens", "2"])
    assert code == 0, out
    assert out.count(NOTICE) == 1 and "unavailable" not in out, out
    assert "onnxruntime: native GroupedLoRA kernels" in " ".join(out.split()), out  # the temporary build ran


def test_read_only_cache(
    headers: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path
) -> None:
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    env = {"MOE_EXPORT_CACHE": str(cache), "MOE_EXPORT_ORT_INCLUDE": str(headers)}
    done = _read_only(cache, ["kernels", "build"], env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "is not usable (Read-only file system" in lines[0], done.stderr
    done = _read_only(cache, ["kernels"], env)
    assert done.returncode == 0 and f"{cache} is not writable" in done.stdout, done.stdout + done.stderr

    export = shared_export(tmp_path_factory, tiny_base)
    done = _read_only(cache, ["generate", export, "--prompt-ids", "3,17,42", "--max-new-tokens", "3"], env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(NOTICE) == 1 and "unavailable" not in done.stderr, done.stderr
    assert not any(cache.iterdir())


def test_read_only_home_onnx_exports_and_ships_the_library(headers: Path, tmp_path: Path, tiny_base: Path) -> None:
    """The default cache under a read-only HOME: `onnx` (validation included) exits 0, its export is complete and
    ships the temporary build; nothing is written under HOME."""
    home = tmp_path / "home"
    home.mkdir()
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", tiny_base)
    out = tmp_path / "out"
    env = {"HOME": str(home), "MOE_EXPORT_ORT_INCLUDE": str(headers), "MOE_EXPORT_CACHE": "", "XDG_CACHE_HOME": ""}
    done = _read_only(home, ["onnx", ckpt, "--base", tiny_base, "-o", out], env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(NOTICE) == 1 and f"kernel cache {home}/.cache/moe-export" in done.stderr, done.stderr
    config = json.loads((out / "genai_config.json").read_text())
    assert (out / config["model"]["decoder"]["session_options"]["custom_ops_library"]).is_file()
    assert not any(home.iterdir())


def test_no_headers_and_no_cache_runs_the_bodies_with_one_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path
) -> None:
    """Nothing to build with (the cache, which would hold fetched headers, is a file): generate runs the bodies."""
    export = shared_export(tmp_path_factory, tiny_base)  # made (if not yet) with the usual cache
    cache = tmp_path / "cache-file"
    cache.write_text("")
    monkeypatch.setenv("MOE_EXPORT_CACHE", str(cache))
    monkeypatch.setenv("MOE_EXPORT_ORT_INCLUDE", "")
    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)
    _fresh_process_state(monkeypatch)
    monkeypatch.setattr(native_library, "find_headers", lambda: None)  # no system headers either
    code, out = _cli(["generate", export, "--prompt-ids", "3,17,42", "--max-new-tokens", "3"])
    assert code == 0, out
    assert out.count("native GroupedLoRA kernels unavailable") == 1, out
