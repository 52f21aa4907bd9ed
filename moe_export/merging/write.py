"""Write a merged model as a standard transformers directory, streaming the base model shard by shard.

Each base shard is copied by the kernel (no bytes through Python), then the byte ranges of the merged
weights are rewritten in place: a merged tensor keeps its name, dtype and shape, so the safetensors
header and the index stay valid as they are. Peak memory is the adapter plus one merged weight and a
block of its fp32 delta: not a shard, never the model. The units that stay routed go to OUT/adapter in the canonical layout,
with base_model ".." (OUT itself), so `moe-export onnx OUT/adapter` consumes the pair.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_export.errors import FormatError, MergeError
from moe_export.files import check_not_input, check_writable, make_staging_dir, output_errors, replace_directory
from moe_export.formats.base_weights import FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, BaseWeights
from moe_export.ir import LinearMoE
from moe_export.ir.fold import fold_into_weight
from moe_export.merging.plan import UnitMerge
from moe_export.progress import progress_bar

if TYPE_CHECKING:
    from moe_export.merging.report import MergeResult

ADAPTER_DIR = "adapter"
MERGE_MANIFEST = "moe_export_merge.json"
# Other weight formats of the base model would hold stale, unmerged weights: never copied.
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|data)$|\.index\.json$")


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, offset of the data section) without reading any tensor."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise FormatError(f"{path}: not a safetensors file (header claims {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: corrupt safetensors header ({exc})") from exc
    return header, 8 + size


def base_shards(base_dir: Path) -> list[Path]:
    """The base model's safetensors files (every shard of the index, or the single file), checked by BaseWeights."""
    if not (base_dir / INDEX_FILE).is_file() and not (base_dir / SINGLE_FILE).is_file():
        raise MergeError(f"{base_dir}: no {SINGLE_FILE} or {INDEX_FILE}; merging streams safetensors base models only")
    return BaseWeights(base_dir).shards()


def _locate(result: MergeResult, shards: list[Path]) -> dict[Path, list[tuple[str, LinearMoE, UnitMerge]]]:
    """Which merged weight lives in which shard; every check happens here, before anything is written."""
    where: dict[str, tuple[Path, dict[str, Any]]] = {}
    for shard in shards:
        header, _ = read_header(shard)
        for key, info in header.items():
            if key != "__metadata__":
                where[key] = (shard, info)
    units = {u.name: u for u in result.source_adapter.units if isinstance(u, LinearMoE)}
    todo: dict[Path, list[tuple[str, LinearMoE, UnitMerge]]] = {}
    for entry in result.plan.units:
        unit = units[entry.name]
        key = f"{entry.name}.weight"
        if key not in where:
            raise MergeError(f"{result.loaded.base_model_path}: no tensor {key!r} to merge unit {entry.name} into")
        shard, info = where[key]
        if info["dtype"] not in FLOAT_DTYPES or list(info["shape"]) != [unit.out_features, unit.in_features]:
            raise MergeError(f"{shard}: {key} is {info['dtype']}{info['shape']}, not a float [out, in] weight to merge")
        todo.setdefault(shard, []).append((key, unit, entry))
    return todo


def _patch_shard(path: Path, merges: list[tuple[str, LinearMoE, UnitMerge]]) -> None:
    """Rewrite the merged tensors of a copied shard in place, with the same fold as the in-memory merge."""
    header, data_start = read_header(path)
    with open(path, "r+b") as f:
        for key, unit, entry in merges:
            info = header[key]
            start, end = info["data_offsets"]
            f.seek(data_start + start)
            raw = bytearray(end - start)
            if f.readinto(raw) != len(raw):
                raise FormatError(f"{path}: truncated safetensors data for {key}")
            weight = torch.frombuffer(raw, dtype=FLOAT_DTYPES[info["dtype"]]).view(*info["shape"])  # shares `raw`
            fold_into_weight(weight, unit, entry)
            f.seek(data_start + start)
            f.write(raw)


def check_merge_output(out: Path, inputs: list[str | Path | None]) -> None:
    """Refuse, before any work, an -o that exists (an empty directory, such as a mount point, is fine), cannot
    be written, or is, holds or lies inside one of the merge's `inputs`: a merge never replaces anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"-o {out}: already exists; pass a new -o directory or remove it first")
    check_writable(out, "-o", directory=True)
    check_not_input(out, "-o", inputs, directory=True)


def save_merged(result: MergeResult, out_dir: str | Path, progress: bool = True) -> Path:
    """Write OUT: the base model with every fold of the plan merged into its weights (safetensors shards,
    index, config, generation config, tokenizer), plus OUT/adapter with the units that stay routed."""
    out = Path(out_dir)
    base_dir = Path(result.loaded.base_model_path)
    check_merge_output(out, [result.loaded.checkpoint, base_dir])
    shards = base_shards(base_dir)
    todo = _locate(result, shards)
    with output_errors(out):  # a full disk or read-only -o: one line naming -o, exit 2
        tmp = make_staging_dir(out)
        try:
            with progress_bar(progress, "writing merged shards", len(shards)) as advance:
                for shard in shards:
                    shutil.copyfile(shard, tmp / shard.name)  # copy_file_range/sendfile: no user-space buffer
                    _patch_shard(tmp / shard.name, todo.get(shard, []))
                    advance()
            for item in sorted(base_dir.iterdir()):
                if item.is_file() and not item.name.startswith(".") and not _WEIGHT_FILE.search(item.name):
                    shutil.copy2(item, tmp / item.name)
            if (base_dir / INDEX_FILE).is_file():
                shutil.copy2(base_dir / INDEX_FILE, tmp / INDEX_FILE)
            remaining = result.loaded.adapter
            if remaining.units:
                dataclasses.replace(remaining, base_model="..").save(tmp / ADAPTER_DIR)
            manifest = {"source": str(result.loaded.checkpoint), "base_model": str(base_dir)}
            manifest.update(plan=result.plan.to_dict(), report=result.report.to_dict())
            (tmp / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
            replace_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
