"""Routing statistics on calibration text: mean gates, selection frequency, gate entropy, static-merge error.

Legend: T tokens, E experts, E_A experts owning an A (E or 1), R rank, D_in / D_out linear sizes.

For a routed unit with per-token delta Δ(x) = Σ_e g_e(x) s_e B_e A_e x and a static replacement
Δ̄ = Σ_e w_e s_e B_e A_e (w = the mean gates ḡ for a merge), the merge error (docs/merging.md) is

    ε(w) = sqrt(Σ_t ‖Δ(x_t) − Δ̄ x_t‖²) / sqrt(Σ_t ‖W x_t‖²)      (W x_t = the base linear's output)

With u_te = s_e B_e A_e x_t and M_t[e, f] = <u_te, u_tf>, the numerator squared is
Σ_ef P[e, f] − 2 w·q + wᵀ R w where P = Σ_t M_t ⊙ g_t g_tᵀ, q = Σ_t M_t g_t and R = Σ_t M_t. Those are
[E, E] running sums (fp64, so the subtraction keeps precision down to tiny ε), so the statistics stream
over any number of tokens in constant memory, and ε can be re-evaluated later for any static weights w.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_export.errors import FormatError, MergeError
from moe_export.files import known_fields, read_json_object, write_text_atomic
from moe_export.ir import Adapter, ExpertStack, LinearMoE
from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs
from moe_export.ops.grouped_lora import dense_gates
from moe_export.progress import progress_bar
from moe_export.reference.model import MoELoRALinear, moe_modules

if TYPE_CHECKING:
    from moe_export.reference.loading import LoadedAdapter

STATS_VERSION = 1


class UnitAccumulator:
    """Streaming sums for one routed LinearMoE unit (see the module docstring for the algebra)."""

    def __init__(self, stack: ExpertStack, device: torch.device | str = "cpu") -> None:
        self.num_experts = stack.num_experts
        f64 = {"dtype": torch.float64, "device": device}
        self.a = stack.A.to(**f64)  # [E_A, R, D_in]
        scaled_b = stack.B.to(**f64) * stack.scaling.to(**f64)[:, None, None]  # [E, D_out, R]
        self.gram = torch.einsum("eor,fos->efrs", scaled_b, scaled_b)  # [E, E, R, R] s_e s_f B_eᵀ B_f
        e = self.num_experts
        self.tokens = 0
        self.gate_sum = torch.zeros(e, **f64)  # [E]
        self.selected = torch.zeros(e, **f64)  # [E]
        self.entropy_sum = 0.0
        self.p = torch.zeros(e, e, **f64)  # [E, E]
        self.q = torch.zeros(e, **f64)  # [E]
        self.r = torch.zeros(e, e, **f64)  # [E, E]
        self.base_sq = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, gates: torch.Tensor, base_out: torch.Tensor) -> None:
        """x [T, D_in], dense gates [T, E] (zero where not selected), base_out = W x (+ b) [T, D_out]."""
        x, g = x.double(), gates.double()
        if self.a.shape[0] == 1:
            h = (x @ self.a[0].T)[:, None, :].expand(-1, self.num_experts, -1)  # [T, E, R]
        else:
            h = torch.einsum("ti,eri->ter", x, self.a)  # [T, E, R]
        m = torch.einsum("ter,efrs,tfs->tef", h, self.gram, h)  # [T, E, E] <u_te, u_tf>
        self.p += torch.einsum("te,tf,tef->ef", g, g, m)
        self.q += torch.einsum("tef,tf->e", m, g)
        self.r += m.sum(0)
        self.base_sq += float(base_out.double().pow(2).sum())
        self.tokens += x.shape[0]
        self.gate_sum += g.sum(0)
        self.selected += (g > 0).double().sum(0)
        mass = g.sum(-1, keepdim=True).clamp_min(1e-300)  # top-p gates need not sum to one
        probs = g / mass  # [T, E]
        self.entropy_sum += float(-torch.special.xlogy(probs, probs).sum())

    def drop_inputs(self) -> None:
        """Free the fp64 copies of A and the B Gram matrix once no more tokens come; the sums stay."""
        self.a = self.gram = torch.empty(0)

    def to_stats(self, name: str, slots: int) -> UnitStats:
        n = max(self.tokens, 1)
        return UnitStats(
            name=name,
            num_experts=self.num_experts,
            slots=slots,
            tokens=self.tokens,
            mean_gate=(self.gate_sum / n).tolist(),
            selection_frequency=(self.selected / n).tolist(),
            entropy=self.entropy_sum / n,
            moments={"p": self.p.tolist(), "q": self.q.tolist(), "r": self.r.tolist(), "base_sq": self.base_sq},
        )


def static_error(moments: dict[str, Any], weights: torch.Tensor | list[float]) -> float | None:
    """ε(w) from a unit's streaming moments; None when no token (or a zero base output) was seen."""
    p, q, r = (torch.tensor(moments[k], dtype=torch.float64) for k in ("p", "q", "r"))
    w = torch.as_tensor(weights, dtype=torch.float64)  # [E]
    base_sq = float(moments["base_sq"])
    if base_sq <= 0.0:
        return None
    sq = float(p.sum() - 2.0 * (w @ q) + w @ r @ w)
    return math.sqrt(max(sq, 0.0) / base_sq)


@dataclass
class UnitStats:
    """Routing statistics of one routed linear unit over the calibration tokens."""

    name: str = field(metadata={"help": "unit (HF module path)"})
    num_experts: int = field(metadata={"help": "E"})
    slots: int = field(metadata={"help": "K, experts selected per token when the stats were taken"})
    tokens: int = field(metadata={"help": "calibration tokens seen"})
    mean_gate: list[float] = field(metadata={"help": "[E] mean dense gate ḡ_e (zero when not selected)"})
    selection_frequency: list[float] = field(metadata={"help": "[E] fraction of tokens that select expert e"})
    entropy: float = field(metadata={"help": "mean per-token entropy of the (normalised) gates, nats"})
    moments: dict[str, Any] = field(repr=False, metadata={"help": "fp64 running sums P, q, R, Σ‖Wx‖²"})

    def __post_init__(self) -> None:
        if len(self.mean_gate) != self.num_experts or len(self.selection_frequency) != self.num_experts:
            raise FormatError(f"stats for {self.name}: {self.num_experts} experts but {len(self.mean_gate)} mean gates")

    @property
    def dominance(self) -> float:
        """max_e ḡ_e: how much one expert dominates the unit."""
        return max(self.mean_gate)

    @property
    def error(self) -> float | None:
        """ε of replacing the routed experts by their mean-gate static delta Δ̄ (predicted merge error)."""
        return static_error(self.moments, self.mean_gate)

    @property
    def delta_rel(self) -> float | None:
        """‖Δ(x)‖ / ‖Wx‖: the size of the routed delta itself (ε of dropping the experts)."""
        return static_error(self.moments, [0.0] * self.num_experts)

    def error_for(self, weights: torch.Tensor | list[float]) -> float | None:
        return static_error(self.moments, weights)


@dataclass
class CalibrationStats:
    """Per-unit routing statistics of one checkpoint on one calibration set; round-trips JSON."""

    checkpoint: str = field(metadata={"help": "checkpoint directory the stats were taken on"})
    family: str = field(metadata={"help": "checkpoint family"})
    source: str = field(metadata={"help": "calibration data: file path, 'builtin' text or 'random' tokens"})
    samples: int = field(metadata={"help": "calibration samples run"})
    seq_len: int = field(metadata={"help": "max tokens per sample"})
    seed: int = field(metadata={"help": "seed of the sample order / random tokens"})
    tokens: int = field(metadata={"help": "tokens run through the model"})
    units: dict[str, UnitStats] = field(default_factory=dict, metadata={"help": "unit name -> stats"})
    task_id: int | None = field(default=None, metadata={"help": "MOELoRA task id the model was routed with"})
    version: int = STATS_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = [asdict(u) for u in self.units.values()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "stats") -> CalibrationStats:
        data = known_fields(cls, data, where)
        try:
            units = [UnitStats(**u) for u in data.pop("units", [])]
            return cls(**data, units={u.name: u for u in units})
        except TypeError as exc:
            raise FormatError(f"{where}: not a moe-export calibration stats file ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp sibling, then rename)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        data = read_json_object(path, "stats file not found (write one with `moe-export calibrate -o`)")
        return cls.from_dict(data, where=str(path))

    def check_matches(self, adapter: Adapter, where: str = "stats") -> None:
        """Refuse stats taken on another checkpoint or routing setup (names, E, K must agree)."""
        for unit in adapter.units:
            if not (isinstance(unit, LinearMoE) and unit.routed) or unit.name not in self.units:
                continue
            s, router = self.units[unit.name], unit.router
            assert router is not None and unit.experts is not None
            if s.num_experts != unit.experts.num_experts or s.slots != router.slots:
                raise MergeError(
                    f"{where}: unit {unit.name} has E={s.num_experts}, K={s.slots} in the stats but E="
                    f"{unit.experts.num_experts}, K={router.slots} in the checkpoint; recalibrate with the same --top-k"
                )


def fewer_samples_notice(stats: CalibrationStats, asked: int) -> str | None:
    """Said when calibration ran fewer samples than --samples asked for (the text ran out), else None."""
    if stats.samples >= asked:
        return None
    source = "the built-in text" if stats.source == "builtin" else stats.source
    return (
        f"--samples {asked}: {source} gave {stats.samples} calibration samples (calibration takes every other "
        "non-empty line, the held-out check the others); pass --data FILE with more lines for more"
    )


# --------------------------------------------------------------------------------------------- running


def routed_linear_units(adapter: Adapter) -> dict[str, LinearMoE]:
    return {u.name: u for u in adapter.units if isinstance(u, LinearMoE) and u.routed}


@contextmanager
def recording(model: torch.nn.Module, accumulators: dict[str, UnitAccumulator]) -> Iterator[None]:
    """Feed every routed MoELoRALinear named in `accumulators` into it during forward passes."""
    modules = {name: m for name, m in moe_modules(model) if isinstance(m, MoELoRALinear) and name in accumulators}
    base_out: dict[str, torch.Tensor] = {}
    handles = []

    def record(unit_name: str, flat: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> None:
        acc = accumulators[unit_name]
        out = base_out.pop(unit_name)
        dense = dense_gates(ids, gates, acc.num_experts, torch.float64)  # [T, E]
        acc.update(flat, dense, out.reshape(flat.shape[0], -1))

    for name, module in modules.items():
        # The base Linear runs just before routing in MoELoRALinear.forward: keep its output for ‖Wx‖.
        handles.append(module.base.register_forward_hook(lambda _m, _i, out, n=name: base_out.__setitem__(n, out)))
        module.record_routing = record
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in modules.values():
            module.record_routing = None


@torch.no_grad()
def run_samples(
    model: torch.nn.Module,
    inputs: list[torch.Tensor],
    progress: bool,
    description: str,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Run the model over each [1, L] sample (no padding, so every recorded token is real)."""
    device = next(model.parameters()).device
    with progress_bar(progress, description, len(inputs)) as advance:
        for i, ids in enumerate(inputs):
            ids = ids.to(device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            if on_logits is not None:
                on_logits(i, logits)
            advance()


def calibrate_whole(loaded: LoadedAdapter, calib: CalibrationSet, progress: bool = True) -> CalibrationStats:
    """Calibration on the whole reference model (`loaded.model`); layerwise.py streams it instead, and
    `moe_export.calibrate` (run.py) chooses."""
    if loaded.model is None:
        raise MergeError(f"{loaded.checkpoint}: calibration needs the reference model (load it with moe_export.load)")
    units = routed_linear_units(loaded.adapter)
    inputs, source = calibration_inputs(loaded, calib, split="stats")
    device = next(loaded.model.parameters()).device
    accumulators = {name: UnitAccumulator(u.experts, device) for name, u in units.items() if u.experts is not None}
    with recording(loaded.model, accumulators):
        run_samples(loaded.model, inputs, progress, "calibrating")
    return collect_stats(loaded, accumulators, inputs, source, calib)


def collect_stats(
    loaded: LoadedAdapter,
    accumulators: dict[str, UnitAccumulator],
    inputs: list[torch.Tensor],
    source: str,
    calib: CalibrationSet,
) -> CalibrationStats:
    """The statistics file of a calibration run, units in the adapter's order (whole-model or layer-streamed)."""
    units = routed_linear_units(loaded.adapter)
    stats = {
        name: accumulators[name].to_stats(name, unit.router.slots)  # type: ignore[union-attr]
        for name, unit in units.items()
        if name in accumulators
    }
    return CalibrationStats(
        checkpoint=str(loaded.checkpoint),
        family=loaded.adapter.family,
        source=source,
        samples=len(inputs),
        seq_len=calib.seq_len,
        seed=calib.seed,
        tokens=sum(int(i.numel()) for i in inputs),
        units=stats,
        task_id=loaded.task_id,
    )
