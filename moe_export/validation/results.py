"""Run results: what one runner produced on the validation inputs, serializable so running and judging can happen in
different processes (Polygraphy's RunResults): `validate --save-results DIR` on a GPU box, `--load-results DIR` on
any other machine with the reference.

Layout of DIR/<runtime>/: `result.json` (runtime, labels, timings, notes, the op type of every tapped node) and one
`input_<i>.npz` per input with the feeds (`feed|name`), outputs (`out|name`) and taps (`tap|node|field`), plus
`gen_<j>.npz` per generation prompt batch (tokens, logits and per-step taps). Arrays numpy cannot store natively
(bfloat16) are widened to fp32, which is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError, MoeExportError
from moe_export.runtimes.base import Feeds
from moe_export.runtimes.taps import UnitCapture

FORMAT_VERSION = 1
SEP = "|"  # node names hold dots and slashes, never a bar


@dataclass
class DecodeResult:
    """A greedy decode of one prompt batch: tokens [B, N], the logits each step chose from [N, B, V], step taps."""

    label: str
    tokens: np.ndarray
    logits: np.ndarray
    step_taps: list[dict[str, UnitCapture]] = field(default_factory=list)
    step_feeds: list[Feeds] = field(default_factory=list)  # kept in memory only (not saved)


@dataclass
class RunResult:
    """One runtime's outputs (and per-unit taps, when it could tap) on every validation input."""

    runtime: str
    labels: list[str]
    feeds: list[Feeds]
    outputs: list[dict[str, np.ndarray]]
    taps: list[dict[str, UnitCapture]]
    seconds: list[float]
    tapped: bool = False
    notes: list[str] = field(default_factory=list)
    generation: list[DecodeResult] = field(default_factory=list)

    def save(self, directory: str | Path) -> Path:
        """Write DIR/<runtime>/ (refused if it exists: nothing the user made is overwritten); returns it."""
        target = Path(directory) / self.runtime
        if target.exists():
            raise MoeExportError(f"--save-results: {target} already exists; choose a new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.runtime}-", dir=target.parent))
        try:
            op_types: list[dict[str, str]] = []
            for i, (feeds, outputs, taps) in enumerate(zip(self.feeds, self.outputs, self.taps, strict=True)):
                arrays = {f"feed{SEP}{k}": v for k, v in feeds.items()} | {
                    f"out{SEP}{k}": v for k, v in outputs.items()
                }
                arrays |= _tap_arrays("tap", taps)
                np.savez(staging / f"input_{i}.npz", **{k: _storable(v) for k, v in arrays.items()})
                op_types.append({node: c.op_type for node, c in taps.items()})
            generation = []
            for j, decoded in enumerate(self.generation):
                arrays = {"tokens": decoded.tokens, "step_logits": decoded.logits}
                for step, taps in enumerate(decoded.step_taps):
                    arrays |= _tap_arrays(f"step{step}", taps)
                np.savez(staging / f"gen_{j}.npz", **{k: _storable(v) for k, v in arrays.items()})
                generation.append(
                    {
                        "label": decoded.label,
                        "op_types": [{n: c.op_type for n, c in t.items()} for t in decoded.step_taps],
                    }
                )
            meta = {
                "format_version": FORMAT_VERSION,
                "runtime": self.runtime,
                "labels": self.labels,
                "seconds": self.seconds,
                "tapped": self.tapped,
                "notes": self.notes,
                "op_types": op_types,
                "generation": generation,
            }
            (staging / "result.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path, runtime: str) -> RunResult:
        """Read DIR/<runtime>/ as written by `save`; a missing or foreign directory is one line, exit 2."""
        source = Path(directory) / runtime
        try:
            meta = json.loads((source / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"--load-results: {source}/result.json is not a saved run result ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION or meta.get("runtime") != runtime:
            raise FormatError(
                f"--load-results: {source} holds format {meta.get('format_version')} of runtime {meta.get('runtime')}; "
                f"this moe-export reads format {FORMAT_VERSION} of {runtime}"
            )
        result = cls(runtime, meta["labels"], [], [], [], meta["seconds"], meta["tapped"], meta["notes"])
        for i, op_types in enumerate(meta["op_types"]):
            arrays = _read_npz(source / f"input_{i}.npz")
            result.feeds.append(_strip("feed", arrays))
            result.outputs.append(_strip("out", arrays))
            result.taps.append(_captures("tap", arrays, op_types))
        for j, entry in enumerate(meta["generation"]):
            arrays = _read_npz(source / f"gen_{j}.npz")
            taps = [_captures(f"step{s}", arrays, ops) for s, ops in enumerate(entry["op_types"])]
            result.generation.append(DecodeResult(entry["label"], arrays["tokens"], arrays["step_logits"], taps))
        return result


def _storable(array: Any) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.kind == "V" or array.dtype.name == "bfloat16" else array


def _tap_arrays(prefix: str, taps: dict[str, UnitCapture]) -> dict[str, np.ndarray]:
    return {f"{prefix}{SEP}{node}{SEP}{k}": v for node, c in taps.items() for k, v in c.arrays().items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise FormatError(f"--load-results: {path} is not readable ({exc})") from exc


def _strip(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    head = prefix + SEP
    return {k[len(head) :]: v for k, v in arrays.items() if k.startswith(head) and k.count(SEP) == 1}


def _captures(prefix: str, arrays: dict[str, np.ndarray], op_types: dict[str, str]) -> dict[str, UnitCapture]:
    grouped: dict[str, dict[str, np.ndarray]] = {node: {} for node in op_types}  # keeps the saved node order
    for key, value in arrays.items():
        head, sep, rest = key.partition(SEP)
        if head == prefix and sep:
            node, _, name = rest.rpartition(SEP)
            if node not in grouped:
                raise FormatError(f"--load-results: tap {node!r} has no op type in result.json")
            grouped[node][name] = value
    return {node: UnitCapture.from_arrays(fields, op_types[node]) for node, fields in grouped.items()}
