"""Issue 23 item 3: the environment's faults (a full disk, a read-only mount, permissions, a busy mount point,
a closed stdout) end with exit 2 and one line naming the path and what to do, or, for a closed stdout, quietly
with the command's own exit code; nothing is left behind. `-o` may be a mount point or an existing empty dir.

Real file systems where the machine allows it: a tmpfs mounted in a private user+mount namespace
(`unshare -rm`, no root needed where user namespaces are enabled; skipped where they are not). The errors no
unprivileged test can provoke for real (EACCES as root, EBUSY) are raised by a patched os.replace.
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.errors import MoeExportError
from moe_export.files import make_staging_dir, replace_directory, write_text_atomic
from tests.conftest import REPO, SAMPLES

CLI = f"{shlex.quote(sys.executable)} -c 'from moe_export.cli import main; main()'"


def _shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "MOE": CLI}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _in_private_mount(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`script` run as root of a new user+mount namespace, where it may mount a tmpfs that vanishes with it."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces unavailable (unshare -rm): cannot mount a tmpfs without root")
    return _shell(f"unshare -rm bash -c {shlex.quote('set -u; ' + script)}", cwd)


def _error_lines(stderr: str) -> list[str]:
    # transformers' weight-loading bar goes to stderr in a subprocess; it is not our message. Nor are our "note: "
    # lines (where no native kernel library can be built, a fresh clone's case, a session says it runs the bodies).
    return [
        line
        for line in stderr.strip().splitlines()
        if "Loading weights" not in line and not line.startswith("note: ") and line.strip()
    ]


def test_full_disk_is_exit_2_naming_o_and_leaves_nothing(tmp_path: Path) -> None:
    """The issue's case: a 64 KiB tmpfs as -o's parent; `onnx` ran out of space and said 'a bug' (exit 3)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    result = _in_private_mount(
        f"mount -t tmpfs -o size=64k tmpfs {disk} && eval $MOE onnx {SAMPLES / 'lora'} -o {disk}/out --no-validate;"
        f" echo rc=$?; ls -A {disk}",
        tmp_path,
    )
    lines = result.stdout.strip().splitlines()
    assert "rc=2" in lines, result.stdout + result.stderr
    assert lines[-1] == "rc=2", f"left behind: {lines[lines.index('rc=2') + 1 :]}"
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert f"{disk}/out" in errors[0] and "no space left" in errors[0] and "internal error" not in errors[0]


def test_mount_point_and_empty_dir_as_o_keep_the_directory(tmp_path: Path) -> None:
    """`-o` is a mount point (a Docker volume): the export replaces its contents, twice, and the mount stays."""
    volume = tmp_path / "volume"
    volume.mkdir()
    onnx = f"eval $MOE onnx {SAMPLES / 'lora'} -o {volume} --no-validate >/dev/null"
    result = _in_private_mount(
        f"mount -t tmpfs tmpfs {volume} && {onnx}; echo rc=$?; {onnx}; echo rc=$?; mountpoint -q {volume} && "
        f"echo mounted; ls -A {volume}",
        tmp_path,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[:3] == ["rc=0", "rc=0", "mounted"], result.stdout + result.stderr
    assert "export.json" in lines and "model.onnx" in lines
    assert not [name for name in lines if name.startswith(".")], lines  # no staging left inside the volume


def test_existing_empty_dir_as_o_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    os.chmod(out, 0o750)
    inode = out.stat().st_ino
    staging = make_staging_dir(out)
    (staging / "export.json").write_text("{}")
    replace_directory(staging, out)
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "export.json").is_file()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.EBUSY, "busy"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_environment_fault_while_writing_is_one_line_naming_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr("moe_export.files.os.replace", refuse)
    target = tmp_path / "stats.json"
    with pytest.raises(MoeExportError, match=f"{target}: {words}") as info:
        write_text_atomic(target, "{}")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file went too


def test_calibrate_on_a_full_disk_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name

    monkeypatch.setattr("moe_export.files.os.replace", full)
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(out), "--samples", "2"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: no space left"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unhandled_environment_oserror_is_exit_2_not_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError of the environment raised anywhere (here: reading the checkpoint) is not 'a bug'."""

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(SAMPLES / "goat" / "adapter_config.json"))

    monkeypatch.setattr("moe_export.cli.inspect_cmd.load_adapter", denied, raising=False)
    monkeypatch.setattr("moe_export.reference.loading.load_adapter", denied)
    result = CliRunner().invoke(app, ["inspect", str(SAMPLES / "goat")])
    assert result.exit_code == 2, result.output
    assert "permission denied" in result.stderr and "adapter_config.json" in result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["inspect", str(SAMPLES / "goat")], 0),
        (["inspect", str(SAMPLES / "goat"), "--json"], 0),
        (["inspect", "/nonexistent/ckpt"], 2),
    ],
)
def test_closed_stdout_ends_quietly_with_the_real_exit_code(tmp_path: Path, args: list[str], code: int) -> None:
    """`moe-export inspect CKPT | true`: the reader is gone before anything is written (was exit 1, silently)."""
    result = _shell(f"eval $MOE {' '.join(shlex.quote(a) for a in args)} | true; echo rc=${{PIPESTATUS[0]}}", tmp_path)
    assert result.stdout.strip() == f"rc={code}", result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
