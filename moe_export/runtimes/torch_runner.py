"""The PyTorch reference runner: the faithful MoE-LoRA forward (reference.py) that exports are checked against."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_export.errors import FormatError, RuntimeUnavailableError
from moe_export.export.dtypes import torch_dtype
from moe_export.export.interface import GraphInterface
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.reference.model import ReferenceUnit, force_routing, reference_units
from moe_export.reference.routing import ForcedRoute
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.registry import RunnerOptions
from moe_export.runtimes.taps import record_torch_routing


class TorchRunner(Runner):
    """Runs a transformers causal LM (usually with MoE-LoRA modules applied) and returns the interface's logits.

    The model is built by `model_loader` inside `activate()`, so constructing a runner is cheap.
    """

    name = "torch"

    def __init__(
        self,
        model_loader: Callable[[], torch.nn.Module],
        device: str = "cpu",
        threads: int | None = None,
        interface: GraphInterface | None = None,
    ) -> None:
        super().__init__()
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError("torch runner: device cuda requested but torch.cuda.is_available() is False")
        self.device = device
        self.threads = threads
        self._loader = model_loader
        # A decoder export's past inputs are empty on the first step: the reference runs without a cache.
        self.interface = interface or GraphInterface.scoring()
        self._input_names = tuple(self.interface.token_input_names())
        self.model: torch.nn.Module | None = None
        # unit name -> decisions to replay in every infer (validation's route replay); None: the model's own.
        self.forced_routes: dict[str, ForcedRoute] | None = None

    def request_taps(self) -> bool:
        self.taps_requested = True
        return True

    def units(self) -> dict[str, ReferenceUnit]:
        """The active model's adapter units (routers and expert weights), for comparators."""
        assert self.model is not None
        return reference_units(self.model)

    def input_names(self) -> tuple[str, ...]:
        return self._input_names[:1]  # attention_mask is optional for the reference

    def _activate(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.model = self._loader().to(self.device).eval()

    def _deactivate(self) -> None:
        self.model = None

    @torch.no_grad()
    def _infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        assert self.model is not None
        kwargs = {
            name: torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            for name in self._input_names
            if name in feeds
        }
        with contextlib.ExitStack() as stack:
            if self.forced_routes is not None:
                stack.enter_context(force_routing(self.model, self.forced_routes))
            if self.taps_requested:
                self.last_taps = stack.enter_context(record_torch_routing(self.model))
            out = self.model(**kwargs, use_cache=False)
        if self.device == "cuda":
            torch.cuda.synchronize()
        logits = out.logits
        # numpy has no bfloat16: bf16 results are widened to fp32 (exactly representable).
        if logits.dtype == torch.bfloat16:
            logits = logits.float()
        return {self.interface.logits_name: logits.cpu().numpy()}


def reference_model_loader(
    artifact: Artifact, dtype_name: str | None = None, base_weights: str = "export"
) -> Callable[[], torch.nn.Module]:
    """A deferred builder of the PyTorch reference for an export, following its manifest, in `dtype_name`
    (default: the export's dtype).

    `base_weights="export"`: for a quantized export the base linears carry the export's dequantized weights
    (the reference for the export's arithmetic); "original": the checkpoint's weights (the quantization's cost)."""
    manifest = artifact.manifest
    where = artifact.path / "export.json"
    dtype = torch_dtype(dtype_name or manifest.dtype)  # ExportManifest checked the name

    def load() -> torch.nn.Module:
        from moe_export.reference.loading import load_base_model
        from moe_export.reference.model import cast_reference_model

        if not Path(manifest.base_model).is_dir():
            raise FormatError(
                f"{where}: base model {manifest.base_model} not found; the torch reference needs it (--base DIR)"
            )
        substitute = manifest.quant_scheme is not None and base_weights == "export"
        if artifact.base_only:
            model = load_base_model(Path(manifest.base_model), torch.float32 if substitute else dtype)
            if substitute:
                _substitute_dequantized(model, None, artifact)
            return cast_reference_model(model, dtype) if substitute else model
        if not Path(manifest.source_checkpoint).is_dir():
            raise FormatError(
                f"{where}: source checkpoint {manifest.source_checkpoint} not found; the torch reference needs "
                "the original checkpoint (say where it is with --ckpt DIR, or leave torch out of --runtimes)"
            )
        loaded = _load_with_merge(manifest)
        if substitute:
            _substitute_dequantized(loaded.model, loaded.adapter, artifact)
        return cast_reference_model(loaded.model, dtype)

    return load


def _substitute_dequantized(model: torch.nn.Module, adapter: Any, artifact: Artifact) -> None:
    """The export's MatMulNBits weights, dequantized, in place of the reference's base linears (a packed
    projection's rows split back into its members: export/packing.py)."""
    from moe_export.export.packing import unpack_weights
    from moe_export.export.quantize import dequantized_weights
    from moe_export.reference.substitute import substitute_base_weights

    scheme = artifact.manifest.quant_scheme
    assert scheme is not None
    packed = (artifact.manifest.fusion or {}).get("packed")
    weights = unpack_weights(dequantized_weights(artifact.onnx_path, scheme), packed)
    substitute_base_weights(model, adapter, {k: torch.from_numpy(v) for k, v in weights.items()})


def _load_with_merge(manifest: ExportManifest) -> Any:
    """moe_export.load with the export's options, then the export's merge plan (merged units become Linear)."""
    import moe_export

    options = manifest.load_options or {}
    loaded = moe_export.load(
        manifest.source_checkpoint,
        base_model=manifest.base_model,
        family=manifest.family,
        top_k=options.get("top_k"),
        task_id=options.get("task_id"),
    )
    if manifest.merge_plan:
        from moe_export.merging.apply import MergePlan, apply_merge_plan

        loaded = apply_merge_plan(loaded, MergePlan.from_dict(manifest.merge_plan))
    return loaded


def runner_for_artifact(artifact: Artifact, options: RunnerOptions) -> TorchRunner:
    return TorchRunner(
        reference_model_loader(artifact, options.torch_dtype),
        device=options.device,
        threads=options.threads,
        interface=artifact.interface,
    )
