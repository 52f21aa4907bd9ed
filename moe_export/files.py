"""File helpers every stage shares: atomic writes, and reading JSON settings written by a newer version.

Atomic means a reader (or a failed run) never sees a half-written file or directory: data goes to a
temporary sibling in the same directory (same file system, so the rename is atomic) and is renamed
into place last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from moe_export.errors import FormatError


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling; on failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def make_staging_dir(out_dir: Path) -> Path:
    """An empty temporary sibling of `out_dir` to build a directory output in (see `replace_directory`)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    return staging


def replace_directory(staging: Path, out_dir: Path) -> Path:
    """Rename a finished staging directory onto `out_dir`; a previous `out_dir` is removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_json_object(path: str | Path, missing_hint: str) -> dict[str, Any]:
    """A JSON file whose top level is an object; a one-line FormatError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: missing; {missing_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object at the top level")
    return data


def known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys of `data` that dataclass `cls` has; warn (not fail) on others, written by a newer moe-export."""
    return known_keys({f.name for f in fields(cls)}, data, where)


def known_keys(names: set[str], data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` restricted to `names`, with one warning that lists every other key."""
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown} (written by a newer moe-export?)", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}
