"""Whose fault decides the exit code: bad input 2, a failed gate 1, our bug or a library crash 3.

`--debug` adds the traceback and never changes the exit code (README.md, Commands).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.errors import InternalError, MoeExportError
from tests.conftest import SAMPLES

GOAT = SAMPLES / "goat"


def _crash(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom: something inside a library\nsecond line")


@pytest.mark.parametrize("debug", [False, True])
def test_a_crash_is_a_bug_exit_3(monkeypatch: pytest.MonkeyPatch, debug: bool) -> None:
    monkeypatch.setattr("moe_export.reference.loading.detect_family", _crash)
    result = CliRunner().invoke(app, [*(["--debug"] if debug else []), "inspect", str(GOAT)])
    assert result.exit_code == 3, result.output
    assert "internal error" in result.output and "not your input" in result.output
    assert "RuntimeError: boom: something inside a library" in result.output
    assert "second line" not in result.output.split("Traceback")[0]  # the message is one line
    assert ("Traceback (most recent call last)" in result.output) == debug


@pytest.mark.parametrize("debug", [False, True])
def test_bad_input_is_exit_2_with_or_without_debug(tmp_path: Path, debug: bool) -> None:
    result = CliRunner().invoke(app, [*(["--debug"] if debug else []), "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2, result.output
    assert "error" in result.output and "internal error" not in result.output
    assert ("Traceback (most recent call last)" in result.output) == debug


def test_torch_onnx_export_crash_is_internal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A crash inside torch.onnx.export on a checkpoint we accepted is not the user's input problem."""
    loaded = moe_export.load(SAMPLES / "lora")
    monkeypatch.setattr(torch.onnx, "export", _crash)
    with pytest.raises(InternalError, match=r"torch\.onnx\.export crashed: RuntimeError: boom") as info:
        moe_export.export_onnx(loaded, tmp_path / "out", validate=False, progress=False)
    assert not isinstance(info.value, MoeExportError)  # no bad-input handler may swallow it
    assert not (tmp_path / "out").exists()
