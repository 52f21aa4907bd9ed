"""`moe_export.load`: checkpoint directory + base model -> canonical adapter + faithful reference model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_export.errors import FormatError, MoeExportError
from moe_export.formats import Family, LoadOptions, detect_family, get_family
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import open_checkpoint
from moe_export.formats.common import override_top_k
from moe_export.formats.hub_cache import parse_hub_id, resolve_hub_id
from moe_export.ir import Adapter, LinearMoE
from moe_export.ir.tensors import finish_adapter
from moe_export.reference.architectures import check_architecture
from moe_export.reference.base_check import check_base_model
from moe_export.reference.model import apply_adapter


@dataclass
class LoadedAdapter:
    """A checkpoint loaded into the canonical adapter, and the base model running its faithful forward."""

    adapter: Adapter
    model: Any  # transformers PreTrainedModel, eval mode, adapter modules applied
    checkpoint: Path
    base_model_path: Path
    task_id: int | None = None
    options: LoadOptions = field(default_factory=LoadOptions)
    # The family whose loader read `checkpoint`: `canonical` for a converted adapter whose `adapter.family`
    # still names the family it came from. Reloading needs this one.
    loader_family: str | None = None

    @property
    def family(self) -> str:
        return self.adapter.family


def resolve_base_model(ckpt_dir: Path, declared: str | None, override: str | Path | None) -> Path:
    """The local base-model directory: --base, else the checkpoint's own reference (a path relative to CKPT, or
    a hub id `ORG/NAME[@REVISION]` found in the Hugging Face cache, formats/hub_cache.py)."""
    if override is not None:
        spec, path, where = str(override), Path(override), "--base"
    elif declared:
        spec, path = declared, Path(declared)
        path = path if path.is_absolute() else ckpt_dir / path
        where = f"base_model_name_or_path in {ckpt_dir}"
    else:
        raise FormatError(f"{ckpt_dir}: the checkpoint names no base model; pass --base PATH")
    hub_id = parse_hub_id(spec)
    if not path.is_dir() and hub_id is not None:  # a local directory of that name wins, as in transformers
        path = resolve_hub_id(*hub_id, where)
    elif not path.is_dir():
        raise FormatError(
            f"{path}: base model directory not found ({where}); pass --base PATH to a local model directory or "
            "ORG/NAME[@REVISION] of a model in the Hugging Face cache"
        )
    if not (path / "config.json").is_file():
        raise FormatError(f"{path}: no config.json, not a transformers model directory ({where})")
    check_architecture(path)
    check_base_model(path)
    return path.resolve()


def load_base_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers causal LM from a local directory, in eval mode, never touching the network.

    transformers random-initialises a weight its files lack and only logs it: its load report is read here,
    and any missing or mis-shaped weight is our one-line error (check_base_model catches these earlier for
    safetensors bases; this is the guard for every other way a model gets here)."""
    import transformers

    try:
        model, report = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "mismatched" not in str(exc):
            raise  # only its refusal of mis-shaped weights is about the input
        raise FormatError(
            f"{path}: transformers cannot load this base model ({str(exc).splitlines()[0][:200]})"
        ) from exc
    for kind in ("missing_keys", "mismatched_keys"):
        faulty = sorted(str(k) for k in report.get(kind) or [])
        if faulty:
            raise FormatError(
                f"{path}: transformers reports {kind.replace('_', ' ')} when loading it ({faulty[0]}"
                f"{f' and {len(faulty) - 1} more' if len(faulty) > 1 else ''}); it would run with random weights "
                "there: config.json and the weights are from different models"
            )
    return model.eval()


def load_adapter(
    ckpt_dir: str | Path,
    base_model: str | Path | None = None,
    family: str | None = None,
    options: LoadOptions | None = None,
) -> tuple[Adapter, Path]:
    """Read a checkpoint into the canonical adapter; returns it with the resolved base-model directory."""
    adapter, base_path, _ = _read_checkpoint(ckpt_dir, base_model, family, options or LoadOptions())
    return adapter, base_path


def _read_checkpoint(
    ckpt_dir: str | Path, base_model: str | Path | None, family: str | None, options: LoadOptions
) -> tuple[Adapter, Path, str]:
    """(adapter, base-model directory, name of the family whose loader read the checkpoint)."""
    ckpt = open_checkpoint(ckpt_dir)
    fam = get_family(family) if family else detect_family(ckpt)
    declared = ckpt.config_value("base_model_name_or_path") or ckpt.config_value("base_model")
    base_path = resolve_base_model(ckpt.path, declared, base_model)
    base = BaseWeights(base_path) if fam.needs_base_weights else None
    try:
        with torch.no_grad():  # loaders compute on saved parameters that may still require grad
            adapter = finish_adapter(fam.load(ckpt, base))
    except FormatError as exc:
        # The IR's own checks (shapes, expert counts) do not know the file: name it here.
        if str(ckpt.path) in str(exc):
            raise
        raise FormatError(f"{ckpt.weights_path or ckpt.path}: {exc}") from exc
    apply_load_options(fam, adapter, options)
    try:
        weights = base or BaseWeights(base_path)
    except FormatError:
        weights = None  # not safetensors: apply_adapter still checks every module when the model is built
    if weights is not None:
        check_fits_base(adapter, weights)
    adapter.base_model = str(base_path)
    return adapter, base_path, fam.name


def apply_load_options(family: type[Family], adapter: Adapter, options: LoadOptions) -> None:
    """--top-k and --task-id, the same for every family: applied where the adapter has what they set, refused
    (one line, exit 2) where it has not, so no option is silently ignored."""
    if options.top_k is not None:
        selects = sorted({u.router.select for u in adapter.units if u.router is not None})
        if "topk" not in selects:
            raise FormatError(
                f"--top-k: the {family.title} checkpoint has no top-k router (routing: {', '.join(selects) or 'none'}); "
                "drop --top-k"
            )
        override_top_k(adapter, options.top_k)
    elif not family.top_k_saved:
        adapter.notices.append(
            f"{family.title} does not save top_k; defaulted to {family.default_top_k} in every layer "
            "(pass --top-k K or K1,K2,...)"
        )
    if options.task_id is not None:
        if not adapter.task_gates:
            raise FormatError(
                f"--task-id {options.task_id}: the {family.title} checkpoint has no task gate; drop --task-id"
            )
        for gate in adapter.task_gates.values():
            gate.weights(options.task_id)  # range check with a clear message, before any model is built


def require_task_id(adapter: Adapter, task_id: int | None, where: str | Path) -> None:
    """A task-routed adapter builds no model without a task id: say so before the base model loads."""
    if task_id is not None or not adapter.task_gates:
        return
    if any(u.router is not None and u.router.kind == "task" for u in adapter.units):
        ids = max(g.embedding.shape[0] for g in adapter.task_gates.values()) - 1
        raise FormatError(f"{where}: {adapter.family} routes by task id: pass --task-id N (0..{ids})")


def check_fits_base(adapter: Adapter, base: BaseWeights) -> None:
    """Every adapted linear exists in the base model with the adapter's shape (read from headers only)."""
    expected: dict[str, tuple[int, int]] = {}
    for unit in adapter.units:
        if isinstance(unit, LinearMoE):
            expected[f"{unit.name}.weight"] = (unit.out_features, unit.in_features)
        else:
            for proj, stack in unit.experts.items():
                expected[f"{unit.name}.{proj}.weight"] = (stack.B.shape[1], stack.A.shape[2])
    for key, shape in expected.items():
        found = base.shape(key)
        if found is None:
            raise FormatError(
                f"{base.directory}: the base model has no weight {key!r} that the adapter modifies; is it the model "
                "the adapter was trained on (--base)?"
            )
        if found != shape:
            raise FormatError(
                f"{base.directory}: {key} is {list(found)}, the adapter expects {list(shape)} [out, in]; is it the "
                "model the adapter was trained on (--base)?"
            )


def load(
    ckpt_dir: str | Path,
    base_model: str | Path | None = None,
    family: str | None = None,
    top_k: int | list[int] | None = None,
    task_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedAdapter:
    """Load a checkpoint and build the faithful reference model (README.md, Python API)."""
    return attach_model(load_without_model(ckpt_dir, base_model, family, top_k, task_id), dtype)


def attach_model(loaded: LoadedAdapter, dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """`loaded` with the base model built and the adapter applied (the whole-model reference)."""
    require_task_id(loaded.adapter, loaded.task_id, loaded.checkpoint)
    model = load_base_model(loaded.base_model_path, dtype)
    apply_adapter(model, loaded.adapter, task_id=loaded.task_id)
    return dataclasses.replace(loaded, model=model.eval())


def load_without_model(
    ckpt_dir: str | Path,
    base_model: str | Path | None = None,
    family: str | None = None,
    top_k: int | list[int] | None = None,
    task_id: int | None = None,
) -> LoadedAdapter:
    """`load` without building the base model (model=None): for the streaming merge writer and the
    layer-streamed reference (streamed.py), which read the base weights themselves."""
    options = LoadOptions(top_k=top_k, task_id=task_id)
    adapter, base_path, loader_family = _read_checkpoint(ckpt_dir, base_model, family, options)
    return LoadedAdapter(adapter, None, Path(ckpt_dir), base_path, task_id, options, loader_family)


def open_source(
    source: LoadedAdapter | str | Path,
    base_model: str | Path | None = None,
    family: str | None = None,
    top_k: int | list[int] | None = None,
    task_id: int | None = None,
) -> LoadedAdapter:
    """What the orchestrating API functions take: a LoadedAdapter as it is, or a checkpoint directory read
    without its model (the function builds the model, or streams it, as its options say)."""
    if isinstance(source, LoadedAdapter):
        given = [
            k
            for k, v in (("base_model", base_model), ("family", family), ("top_k", top_k), ("task_id", task_id))
            if v is not None
        ]
        if given:
            raise MoeExportError(f"{', '.join(given)}: load options go with a checkpoint path, not a LoadedAdapter")
        return source
    return load_without_model(source, base_model, family, top_k, task_id)
