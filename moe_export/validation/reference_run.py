"""The reference side of validate: the reference run on the candidates' inputs with their routing replayed.

Run, then compare: the candidates have run (and freed their sessions); the reference then runs a list of jobs
(feeds, and the routing decisions to force) and returns, per job, its outputs and per-unit taps. Two ways:
- streamed (the default): the PyTorch reference one decoder layer part at a time (reference/streamed.py, as
  `calibrate` runs), every job through each part while it is loaded, so the process holds one part's weights, the
  embeddings or the head, never the model: validating fits where the export fits;
- whole: any reference runner (the whole PyTorch model, or another runtime) run job by job.
Both run the same faithful modules with the same route override (reference/model.py force_routing) and taps
(runtimes/taps.py record_torch_routing); tests/test_validate_streamed.py checks they agree.
Legend: B batch, S sequence, V vocabulary, D hidden size.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.export.manifest import Artifact
from moe_export.reference.model import ReferenceUnit, force_routing
from moe_export.reference.routing import ForcedRoute
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.registry import RunnerOptions
from moe_export.runtimes.taps import UnitCapture, record_torch_routing

REFERENCE_MODES = ("streamed", "whole")
Taps = dict[str, UnitCapture]


@dataclass
class Job:
    """One reference run: the feeds and, for route replay, the decisions to force (None: its own routing)."""

    feeds: Feeds
    routes: dict[str, ForcedRoute] | None = None


@dataclass
class Replayed:
    """The reference's outputs on one job and its per-unit taps (empty without route replay)."""

    outputs: dict[str, np.ndarray]
    taps: Taps


class Reference(ABC):
    """The reference model for one validation: enter it, read `units`, `run` job lists, exit (frees it)."""

    name = "torch"
    replays = False  # whether it can run with forced routing and tap its units (known before it is entered)

    def __init__(self) -> None:
        self.units: dict[str, ReferenceUnit] = {}  # empty: this reference cannot replay routing

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    def run(self, jobs: list[Job]) -> list[Replayed]:
        """Each job's outputs and taps."""


class WholeReference(Reference):
    """A reference runner (normally the whole PyTorch model) run job by job."""

    def __init__(self, runner: Runner, replay: bool) -> None:
        super().__init__()
        self.runner, self.name = runner, runner.name
        self.replay = self.replays = replay and callable(getattr(runner, "units", None))

    def __enter__(self) -> WholeReference:
        if self.replay:
            self.runner.request_taps()
        self.runner.activate()
        self.units = self.runner.units() if self.replay else {}  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.deactivate()

    def run(self, jobs: list[Job]) -> list[Replayed]:
        results = []
        for job in jobs:
            if self.replay:
                self.runner.forced_routes = job.routes  # type: ignore[attr-defined]
            outputs = self.runner.infer(job.feeds)
            results.append(Replayed(outputs, dict(self.runner.last_taps) if self.replay else {}))
        if self.replay:
            self.runner.forced_routes = None  # type: ignore[attr-defined]
        return results


class StreamedReference(Reference):
    """The PyTorch reference of an export, layer-streamed (module docstring); always replays routing."""

    replays = True

    def __init__(self, artifact: Artifact, options: RunnerOptions) -> None:
        super().__init__()
        self.artifact, self.options = artifact, options
        self.loaded: Any = None

    def __enter__(self) -> StreamedReference:
        from moe_export.ir.fold import unmap_large_frees
        from moe_export.reference.loading import load_without_model, require_task_id

        manifest = self.artifact.manifest
        load_options = manifest.load_options or {}
        self.loaded = load_without_model(
            manifest.source_checkpoint,
            base_model=manifest.base_model,
            family=manifest.family,
            top_k=load_options.get("top_k"),
            task_id=load_options.get("task_id"),
        )
        require_task_id(self.loaded.adapter, self.loaded.task_id, self.loaded.checkpoint)
        unmap_large_frees()  # freed parts go back to the OS instead of staying in the heap
        self.units = self._stream().units()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loaded, self.units = None, {}

    def _stream(self) -> Any:
        """A fresh skeleton per pass: `part` leaves adapter modules in the layers it ran."""
        import torch

        from moe_export.export.dtypes import torch_dtype
        from moe_export.reference.streamed import StreamedReference as Stream

        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        dtype = torch_dtype(self.options.torch_dtype or self.artifact.dtype)
        return Stream(self.loaded.base_model_path, self.loaded.adapter, self.loaded.task_id, dtype, self.options.device)

    def run(self, jobs: list[Job]) -> list[Replayed]:
        """One pass over the weights: each part is loaded once and every job runs through it."""
        import torch

        from moe_export.reference.streamed import PARTS

        stream, interface = self._stream(), self.artifact.interface
        names = [n for n in interface.token_input_names()]
        calls = [{n: torch.from_numpy(np.ascontiguousarray(j.feeds[n])) for n in names if n in j.feeds} for j in jobs]
        taps: list[Taps] = [{} for _ in jobs]
        with torch.no_grad():
            states = stream.embed_calls(calls)
            for i in range(stream.num_layers):
                for part in PARTS:
                    with stream.part(i, part) as layer:
                        for job, state, tapped in zip(jobs, states, taps, strict=True):
                            with contextlib.ExitStack() as stack:
                                if job.routes is not None:
                                    stack.enter_context(force_routing(layer, job.routes))
                                captured = stack.enter_context(record_torch_routing(layer))
                                stream.run(layer, i, part, state)
                            tapped.update(captured)  # in execution order, part after part
            with stream.head() as head:
                logits = [head(state.hidden).float().cpu().numpy() for state in states]
        return [Replayed({interface.logits_name: v}, t) for v, t in zip(logits, taps, strict=True)]


def streamable(artifact: Artifact) -> str:
    """Why this export's reference is not layer-streamed ('' when it is): the whole-model runner handles these (and
    names a missing source checkpoint or base model)."""
    from moe_export.formats.base_weights import INDEX_FILE, SINGLE_FILE

    manifest = artifact.manifest
    base, source = Path(manifest.base_model), Path(manifest.source_checkpoint or "")
    if manifest.quant_scheme is not None:
        return "a quantized export's reference carries its dequantized base weights"
    if manifest.merge_plan:
        return "the export's merge plan is folded into the whole reference model"
    if artifact.base_only or not source.is_dir() or not base.is_dir():
        return "base-only export" if artifact.base_only else "a source directory is missing"
    if not ((base / SINGLE_FILE).is_file() or (base / INDEX_FILE).is_file()):
        return f"the base model {base} has no safetensors weights (streaming reads safetensors)"
    return ""
