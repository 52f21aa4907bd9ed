"""Whose fault it is decides the exit code (README.md, Commands: exit codes 0 / 1 / 2 / 3).

MoeExportError: the input is wrong -> one line naming the file/option, exit 2 (ParityError: a gate failed, exit 1).
InternalError: our bug, or a library we drive crashed on input we accepted -> exit 3, a line saying so.
Any other exception reaching the CLI is treated like an InternalError.
"""

from __future__ import annotations


class MoeExportError(Exception):
    """Bad input or an unsupported request; the message says what, where and how to fix it."""

    exit_code = 2


class FormatError(MoeExportError):
    """A checkpoint or canonical adapter on disk cannot be read as claimed."""


class ExportError(MoeExportError):
    """A model cannot be exported (unsupported unit, missing runtime, bad option)."""


class MergeError(MoeExportError):
    """A merge request cannot be satisfied."""


class RuntimeUnavailableError(MoeExportError):
    """A requested runtime (onnxruntime provider, TensorRT, CUDA) is not installed or has no device."""


class ParityError(MoeExportError):
    """A parity or latency gate failed; carries the report so callers can print it."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class InternalError(Exception):
    """Not the user's fault: a bug in moe-export, or a third-party crash (torch.onnx.export, ORT at run time)
    on input we accepted. Deliberately not a MoeExportError, so no handler of bad input swallows it."""

    exit_code = 3
