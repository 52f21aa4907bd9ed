"""One exception hierarchy: the CLI turns every MoeExportError into a one-line message and exit 2."""

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
