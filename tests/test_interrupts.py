"""SIGINT / SIGTERM in the middle of export, merge and calibrate: exit 130, no output, no temporary files.

The CLI runs in a subprocess (signals need a real process). `onnx` is signalled once its staging directory
exists (the export is being written); `merge` and `calibrate` are given enough calibration text to run for
minutes and are signalled a few CPU seconds in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

START_TIMEOUT = 120.0  # seconds to reach the point where the signal is sent (imports, model load)


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    code = "from moe_export.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner started in the background (`cmd &`, nohup, some CI agents) ignores SIGINT, and a child inherits
        # that: Python then installs no KeyboardInterrupt handler and the SIGINT cases could never pass.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished (exit {proc.returncode}) before the signal could be sent:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("never reached the point to signal")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("did not stop after the signal")
    return proc.returncode, err


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_onnx_export_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _spawn(["onnx", str(SAMPLES / "goat"), "-o", str(tmp_path / "out"), "--no-validate"], tmp_path)
    _wait_for(lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()), proc)
    code, err = _finish(proc, sig)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("command", "sig"),
    [("merge", signal.SIGINT), ("merge", signal.SIGTERM), ("calibrate", signal.SIGINT)],
)
def test_interrupted_merge_or_calibrate_leaves_nothing(tmp_path: Path, command: str, sig: signal.Signals) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / ("merged" if command == "merge" else "stats.json")
    extra = ["--merge-threshold", "0.9", "--no-eval"] if command == "merge" else []
    # 3000 calibration samples take minutes on 2 cores: the signal always arrives before the output is due.
    data = tmp_path / "calibration.txt"
    data.write_text("".join(f"sample {i} about experts and routers in a mixture model\n" for i in range(3000)))
    args = [command, str(SAMPLES / "goat"), "-o", str(out), "--data", str(data), "--samples", "3000", *extra]
    proc = _spawn(args, work)
    # Mid-run: a few CPU seconds in, past the imports, while the model loads or calibrates.
    _wait_for(lambda: _cpu_seconds(proc.pid) > 6.0, proc)
    code, err = _finish(proc, sig)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _leftovers(work) == []


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
