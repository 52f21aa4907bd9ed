"""The reference forward one decoder layer at a time, for models that do not fit in memory.

GPTQ/AWQ-style: the transformers model is built on the meta device (no weights), the embeddings are
loaded and every calibration sample is embedded; then decoder layer i is loaded from the safetensors
shards (only its tensors), adapted with the same unit modules as the whole-model reference
(`apply_adapter`), every sample's hidden state is run through it, and it is freed before layer i+1.
A layer runs in two parts, attention then MLP, each loaded and freed in turn, so the process holds the
larger part's weights (the MLP: two thirds of a Llama layer), not the layer's. The final norm and head
are loaded only where logits are needed.

Rotary embeddings and causal masks are not re-derived here: each sample goes once through the model's
own forward with every decoder layer replaced by a probe that records the arguments the model passes it
(mask per layer type, sliding window, position embeddings), so a layer later gets exactly what it gets in
the whole model. Weights stay in the model's dtype (or the one asked for); routers keep their own.
Legend: N samples, L tokens per sample, D hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.ir import Adapter, Unit
from moe_export.reference.model import ReferenceUnit, apply_adapter, reference_units

LAYERS_PATH = "model.layers"  # the decoder stack of every supported architecture (architectures.py)
MLP = "mlp"  # a decoder layer's feed-forward block: loaded and run apart from the attention half
PARTS = ("attention", MLP)  # a decoder layer in the order it runs; one part's weights are in memory at a time


LayerCall = tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]  # (hidden state, other args, kwargs)


class _StopForward(Exception):
    """Raised by the last layer probe: the rest of the model (final norm, head) is not needed."""


class _LayerProbe(nn.Module):
    """Stands in for a decoder layer during embedding: records the call, passes the hidden state on."""

    def __init__(self, calls: list[LayerCall], last: bool) -> None:
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden


class _MLPProbe(nn.Module):
    """Stands in for the MLP while the attention half runs: keeps its input, adds nothing to the residual."""

    seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return torch.zeros_like(x)


@dataclasses.dataclass
class SampleState:
    """One calibration sample between layers: its hidden state and the arguments each layer is called with."""

    hidden: torch.Tensor  # [1, L, D]
    layer_calls: list[tuple[tuple[Any, ...], dict[str, Any]]]  # per decoder layer: its (args, kwargs) after hidden
    mlp_input: torch.Tensor | None = None  # [1, L, D] between a layer's attention part and its MLP part


def model_dtype(config: Any) -> torch.dtype:
    """The dtype the base model's weights are stored in (config `dtype`), fp32 when it names none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda' without CUDA is refused with one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FormatError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise FormatError(f"--device {device}: not a torch device (expected cpu, cuda, cuda:N or auto)") from exc


class StreamedReference:
    """A base model skeleton whose pieces are loaded from safetensors on demand, adapted like the reference."""

    def __init__(
        self,
        base_path: Path,
        adapter: Adapter,
        task_id: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """A task-routed adapter needs `task_id` (checked by the caller, who knows the checkpoint's name)."""
        import transformers

        self.base_path, self.adapter, self.task_id = Path(base_path), adapter, task_id
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.weights = BaseWeights(self.base_path)  # refuses non-safetensors bases with one line
        try:
            self.config = transformers.AutoConfig.from_pretrained(str(self.base_path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise FormatError(f"{self.base_path}: transformers cannot read this config ({str(exc)[:200]})") from exc
        self.dtype = dtype or model_dtype(self.config)
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).eval()
        self.layers: nn.ModuleList = self.model.get_submodule(LAYERS_PATH)
        self.units_by_layer = self._units_by_layer(adapter.units)

    def units(self) -> dict[str, ReferenceUnit]:
        """Every adapter unit's router and expert weights as the reference modules hold them, without any base
        weight: the adapter modules are built over a second weightless (meta) skeleton, kept apart from the one
        `part` loads layers into."""
        import transformers

        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        apply_adapter(skeleton, self.adapter, task_id=self.task_id)
        return reference_units(skeleton)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def _units_by_layer(self, units: list[Unit]) -> list[list[Unit]]:
        by_layer: list[list[Unit]] = [[] for _ in self.layers]
        for unit in units:
            head, _, rest = unit.name.partition(f"{LAYERS_PATH}.")
            index = rest.split(".", 1)[0]
            if head or not index.isdigit() or int(index) >= len(self.layers):
                raise FormatError(
                    f"unit {unit.name}: not inside a decoder layer ({LAYERS_PATH}.N), so it cannot be run layer by "
                    "layer; use --forward whole"
                )
            by_layer[int(index)].append(unit)
        return by_layer

    # ------------------------------------------------------------------------------------------ weights

    def _load_module(
        self, name: str, module: nn.Module, key_for: dict[str, str] | None = None, skip: str | None = None
    ) -> None:
        """Give `module` (at `name` in the model) its safetensors weights in self.dtype on self.device, except
        those of its child `skip`. The tensors map the shard files (copy-on-write): pages are read as used."""
        state = {}
        for local in module.state_dict(keep_vars=True):  # parameters and persistent buffers
            if skip is not None and local.startswith(f"{skip}."):
                continue
            key = (key_for or {}).get(local, f"{name}.{local}")
            if key not in self.weights:
                raise FormatError(f"{self.base_path}: the base model has no tensor {key!r}")
            value = self.weights.get(key)
            state[local] = value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
            del value
        missing, unexpected = module.load_state_dict(state, assign=True, strict=skip is None)
        assert not unexpected and all(k.startswith(f"{skip}.") for k in missing), (missing, unexpected)

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise AssertionError("module is not part of the model")

    def embed(self, inputs: list[torch.Tensor]) -> list[SampleState]:
        """Embed each [1, L] sample (every token attended) and record what the model passes every decoder layer for
        it; the embedding weights are freed afterwards (a tied head loads them again)."""
        return self.embed_calls([dict(input_ids=ids, attention_mask=torch.ones_like(ids)) for ids in inputs])

    @torch.no_grad()
    def embed_calls(self, inputs: list[dict[str, torch.Tensor]]) -> list[SampleState]:
        """`embed` for batches [B, L] with the keyword inputs the whole model would get (input_ids, and
        attention_mask / position_ids when given): padding and positions reach every layer as in the whole model."""
        embed = self.model.get_input_embeddings()
        inner = self.model.get_submodule(LAYERS_PATH.rpartition(".")[0])
        self._load_module(self._name_of(embed), embed)
        # The rotary tables are computed, not stored: build them for real (the skeleton's are on meta).
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is not None and any(b.is_meta for b in rotary.buffers()):
            inner.rotary_emb = type(rotary)(config=self.config).to(self.device)
        real_layers = list(self.layers)
        calls: list[list[LayerCall]] = [[] for _ in real_layers]
        try:
            for i in range(len(real_layers)):
                self.layers[i] = _LayerProbe(calls[i], last=i == len(real_layers) - 1)
            for kwargs in inputs:
                with contextlib.suppress(_StopForward):
                    inner(**{k: v.to(self.device) for k, v in kwargs.items()}, use_cache=False)
        finally:
            for i, layer in enumerate(real_layers):
                self.layers[i] = layer
            embed.to("meta")
        states = []
        for n in range(len(inputs)):
            per_layer = [layer_calls[n] for layer_calls in calls]
            states.append(SampleState(per_layer[0][0], [(args, kwargs) for _, args, kwargs in per_layer]))
        return states

    def _in_mlp(self, index: int, name: str) -> bool:
        mlp = f"{LAYERS_PATH}.{index}.{MLP}"
        return name == mlp or name.startswith(f"{mlp}.")

    def part_units(self, index: int, part: str) -> list[Unit]:
        """The units of decoder layer `index` inside `part` ('attention': everything but the MLP; 'mlp')."""
        return [u for u in self.units_by_layer[index] if self._in_mlp(index, u.name) == (part == "mlp")]

    @contextlib.contextmanager
    def part(self, index: int, part: str) -> Iterator[nn.Module]:
        """Decoder layer `index` with the weights of one part loaded and its adapted modules replaced; the part is
        freed on exit. Yields the layer (its other part stays on the meta device)."""
        layer, name = self.layers[index], f"{LAYERS_PATH}.{index}"
        module = getattr(layer, MLP) if part == "mlp" else layer
        try:
            self._load_module(f"{name}.{MLP}" if part == "mlp" else name, module, skip=None if part == "mlp" else MLP)
            units = self.part_units(index, part)
            if units:
                apply_adapter(self.model, dataclasses.replace(self.adapter, units=units), task_id=self.task_id)
            layer = self.layers[index]
            self._buffers_to_device(layer)
            yield layer
        finally:
            self.layers[index].to("meta")  # frees every weight and buffer the layer holds

    def _buffers_to_device(self, module: nn.Module) -> None:
        """The adapter modules' expert and router buffers are built on the CPU; the other part stays on meta."""
        for sub in module.modules():
            for name, buffer in list(sub.named_buffers(recurse=False)):
                if buffer is not None and not buffer.is_meta and buffer.device != self.device:
                    setattr(sub, name, buffer.to(self.device))

    @staticmethod
    def run(layer: nn.Module, index: int, part: str, state: SampleState) -> None:
        """One sample through one part of a loaded layer, as the whole model runs it.

        The attention part is the layer's own forward with the MLP replaced by a probe that keeps the MLP input and
        returns zeros: `residual + 0` is the residual exactly, so the MLP part finishes the layer with the same
        `residual + mlp(x)` the decoder layers of every supported architecture compute."""
        if part == "mlp":
            state.hidden = state.hidden + getattr(layer, MLP)(state.mlp_input)
            state.mlp_input = None
            return
        args, kwargs = state.layer_calls[index]
        mlp, probe = getattr(layer, MLP), _MLPProbe()
        setattr(layer, MLP, probe)
        try:
            state.hidden = layer(state.hidden, *args, **kwargs)
        finally:
            setattr(layer, MLP, mlp)
        state.mlp_input = probe.seen

    @contextlib.contextmanager
    def head(self) -> Iterator[nn.Module]:
        """The final norm + LM head, loaded, as one module mapping hidden states [1, L, D] to logits [1, L, V]."""
        inner = self.model.get_submodule(LAYERS_PATH.rpartition(".")[0])
        norm, lm_head = inner.norm, self.model.get_output_embeddings()
        tied = {}
        lm_name = self._name_of(lm_head)
        if f"{lm_name}.weight" not in self.weights and getattr(self.config, "tie_word_embeddings", False):
            tied = {"weight": f"{self._name_of(self.model.get_input_embeddings())}.weight"}
        try:
            self._load_module(self._name_of(norm), norm)
            self._load_module(lm_name, lm_head, tied)
            yield nn.Sequential(norm, lm_head)
        finally:
            norm.to("meta")
            lm_head.to("meta")
