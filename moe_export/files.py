"""File helpers every stage shares: atomic writes, and reading JSON settings written by a newer version.

Atomic means a reader (or a failed run) never sees a half-written file or directory: data goes to a
temporary sibling in the same directory (same file system, so the rename is atomic) and is renamed
into place last.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from moe_export.errors import FormatError, MoeExportError

# The environment's faults, not the input's and not ours: what the user can do about each (exit 2).
ENVIRONMENT_FAULTS = {
    errno.ENOSPC: "no space left on the device: free some space or choose another output path",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another output path",
    errno.EROFS: "read-only file system: choose an output path on a writable one",
    errno.EACCES: "permission denied: choose a path you may write to, or change its permissions",
    errno.EPERM: "operation not permitted: choose a path you may write to, or change its permissions",
    errno.EBUSY: "busy (a mount point or a file in use): choose another output path",
}


def environment_fault(exc: OSError, output: str | Path | None = None) -> MoeExportError | None:
    """The one-line error for an OSError the environment caused (full disk, read-only mount, permissions,
    EBUSY): naming `output` and what to do while writing it, else the file the OSError names (a read, or a
    write no caller wrapped); None for any other OSError."""
    hint = ENVIRONMENT_FAULTS.get(exc.errno or 0)
    if hint is None:
        return None
    if output is not None:
        return MoeExportError(f"{output}: {hint}; nothing was written")
    reason = (exc.strerror or hint.split(":")[0]).lower()
    return MoeExportError(f"{exc.filename or 'a file'}: {reason}; check that file system's space and permissions")


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn an environment fault while writing the output `path` into its one-line error (exit 2).

    Wrap the whole write, staging included: the OSError then names the final output the user asked for, not
    a temporary file that the cleanup has already removed."""
    try:
        yield
    except OSError as exc:
        fault = environment_fault(exc, path)
        if fault is None:
            raise
        raise fault from exc


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling; on failure nothing is left behind."""
    path = Path(path)
    with output_errors(path):
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
    """An empty temporary directory to build a directory output in (see `replace_directory`): a sibling of
    `out_dir`, or inside it when `out_dir` is a mount point (a Docker volume), whose entries can only be
    renamed into it from the same file system."""
    with output_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        where = out_dir if out_dir.is_dir() and os.path.ismount(out_dir) else out_dir.parent
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=where))
        staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    return staging


def replace_directory(staging: Path, out_dir: Path) -> Path:
    """Rename a finished staging directory onto `out_dir`; a previous `out_dir` is removed only after the swap.

    An `out_dir` that must stay itself (a mount point, which cannot be renamed: EBUSY; or an existing empty
    directory, whose owner, permissions or bind mount the user chose) keeps its identity: its contents are
    replaced instead (see `_replace_contents`)."""
    if out_dir.is_dir() and (os.path.ismount(out_dir) or not any(p != staging for p in out_dir.iterdir())):
        return _replace_contents(staging, out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        try:
            out_dir.rename(old)
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # a bind mount on the same file system: ismount cannot tell
                raise
            return _replace_contents(staging, out_dir)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _replace_contents(staging: Path, out_dir: Path) -> Path:
    """Move the entries of `staging` into `out_dir`, which stays; its previous entries go first (callers
    refuse an out_dir that holds anything but an earlier output of theirs). Not atomic as a whole, unlike
    the swap: each entry is one rename."""
    for entry in out_dir.iterdir():
        if entry == staging:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in staging.iterdir():
        os.replace(entry, out_dir / entry.name)
    staging.rmdir()
    return out_dir


def check_writable(path: str | Path, option: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a one-line MoeExportError (exit 2).

    Probes by creating (and removing) a temporary file in the nearest existing ancestor: permission bits
    say nothing for root, read-only mounts or /sys, so only a real attempt answers. Creates nothing that stays.
    """
    path = Path(path)
    if path.exists() and directory != path.is_dir():
        kind = "a file" if directory else "a directory"
        raise MoeExportError(f"{option} {path}: is {kind}; expected {'a directory' if directory else 'a file'} path")
    # Outputs are built in a temporary sibling (the parent must take new entries); an existing output
    # directory may also get files replaced inside it.
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MoeExportError(f"{option} {path}: cannot be created, {ancestor} is a file")
    for directory_to_probe in [ancestor, *([path] if path.is_dir() else [])]:
        try:
            fd, probe = tempfile.mkstemp(prefix=".moe-export-probe-", dir=directory_to_probe)
        except OSError as exc:
            raise MoeExportError(
                f"{option} {path}: not writable ({exc.strerror or exc} in {directory_to_probe})"
            ) from None
        os.close(fd)
        os.unlink(probe)


def check_not_input(path: str | Path, option: str, inputs: list[str | Path | None], *, directory: bool = False) -> None:
    """Refuse (one line, exit 2) an output that is one of the command's inputs or lies inside an input
    directory: writing it would destroy what the command reads (`calibrate CKPT -o CKPT/adapter_config.json`,
    `validate OUT --report OUT/export.json`). A directory output (`directory=True`) replaced whole must not
    hold an input either. Compared after resolving symlinks and `..`, so no spelling gets around it."""
    target = Path(path).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src or (src.is_dir() and target.is_relative_to(src)):
            where = "is" if target == src else "is inside"
        elif directory and src.is_relative_to(target):
            where = "holds"
        else:
            continue
        raise MoeExportError(
            f"{option} {path}: {where} {source}, an input of this command; writing there would change or delete "
            "what it reads: choose an output outside the inputs"
        )


def replace_files(staging: Path, out_dir: Path, stale: set[str], last: str) -> Path:
    """Move every file of a finished `staging` directory into the existing `out_dir`, one atomic rename each,
    then delete the names in `stale` that the new output no longer has; nothing else in `out_dir` is touched.

    `last` (the manifest) is removed first and renamed in last, so an interrupted replace leaves a directory
    that no reader takes for a complete output. `--force` on an occupied output directory uses this: the
    user's own files next to ours survive.
    """
    # `stale` comes from the previous export.json: a name in it must not reach outside out_dir (`../x`, `/x`, or
    # a path through a symlinked directory), whatever that file says.
    inside = [name_inside(out_dir, name, f"{out_dir / last}: file name") for name in sorted(stale)]
    root = out_dir.resolve()
    (out_dir / last).unlink(missing_ok=True)
    new = {p.name for p in staging.iterdir()}
    for name in sorted(new - {last}):
        os.replace(staging / name, out_dir / name)
    for target in inside:
        if (target.name in new and target.parent == out_dir) or not target.parent.resolve().is_relative_to(root):
            continue
        if target.is_file() or target.is_symlink():
            target.unlink()
    os.replace(staging / last, out_dir / last)
    shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def name_inside(directory: str | Path, name: object, where: str) -> Path:
    """`directory / name` for a file name read from a file we did not write ourselves (export.json, a shard
    index); a one-line FormatError (exit 2) for anything that is not a plain relative name inside `directory`.

    The check is on the name, not the resolved target: a Hugging Face cache directory holds its shards as
    symlinks into a sibling blob store, which is fine to read; what must never happen is a name such as
    `../victim.txt` or `/etc/passwd` steering a read, or a delete, outside the directory."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise FormatError(f"{where}: {name!r} is not a file name")
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == "." or normal.split(os.sep)[0] == "..":
        raise FormatError(f"{where}: {name!r} is outside {directory}; only names inside it are allowed")
    return Path(directory) / normal


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


def check_field_types(obj: Any, where: str) -> None:
    """Every field of dataclass `obj` holds what its annotation says: a one-line FormatError otherwise.

    JSON written by hand (or by another tool) holds `"false"` where a bool belongs and `null` where an object
    does; Python would take the string as true and fail on the null somewhere far away. Checked where the
    JSON becomes a dataclass, in `__post_init__`."""
    hints = _field_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in hints and not _matches(value, hints[f.name]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise FormatError(f"{where}: '{f.name}' is {shown}, expected {_type_name(hints[f.name])}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass; a field whose annotation names a type imported only for type
    checking cannot be resolved at run time and is left unchecked rather than failing every load."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        hints = {}
        for f in fields(cls):
            try:
                hints[f.name] = typing.get_type_hints(
                    type("_One", (), {"__annotations__": {f.name: f.type}}), vars(sys.modules[cls.__module__])
                )[f.name]
            except NameError:
                continue
        return hints


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # JSON has no int/bool split: True is not a count, 2 is a fine float
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    return {list: "a list", dict: "an object"}.get(origin, getattr(hint, "__name__", str(hint)))


def known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The keys of `data` that dataclass `cls` has; warn (not fail) on others, written by a newer moe-export."""
    return known_keys({f.name for f in fields(cls)}, data, where)


def known_keys(names: set[str], data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` restricted to `names`, with one warning that lists every other key."""
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown} (written by a newer moe-export?)", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}
