"""MOELoRA (liuqidong07/MOELoRA-peft, medical multi-task): dense experts weighted by a global task gate.

docs/formats.md ("mmoelora"). One gate for the whole model, `softmax(GateL @ Emb[task_id])`, weighs
the E experts of every adapted linear; routing never looks at hidden states, so a task id must be given
(`--task-id`) and, for that task, each linear is an ordinary LoRA. Scaling is alpha / R with R the TOTAL
rank (each expert has rank R / E), as in `MMOELoraLinearS`.

The original runs on ChatGLM with sequence-first activations and broadcasts the gate as [1, batch, 1],
which is only right per sequence when batch = 1. Our base models are batch-first; we implement the
intended per-sequence gate (one task id for the whole batch) and do not reproduce that broadcast quirk.
Legend: E experts, R total rank, D_task task-embedding size.
Layout source: liuqidong07/MOELoRA-peft (MMOELORAS, adapter_model.bin).
"""

from __future__ import annotations

import torch

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import expert_linear, expert_pairs, require_float, require_int, split_module_keys
from moe_export.formats.registry import Family, Signature, register
from moe_export.ir import Adapter, Router, TaskGate

# The global gate, at the top level of the PeftModel (the one the `S` forward uses).
EMBEDDING_KEY = "lora_task_embedding.weight"  # [task_num + 1, D_task]
GATE_KEY = "lora_gate.GateL.weight"  # [E, D_task]
GATE_NAME = "task"

# Key tail after the module path -> part name. `Expert.weight = self.mlp.weight` registers each expert
# matrix twice; the per-layer gate copies are created by an inherited __init__ and never used.
PARTS: dict[str, str | None] = {
    r"lora_A\.loraA\.(?P<e>\d+)\.mlp\.weight": "A",
    r"lora_B\.loraB\.(?P<e>\d+)\.mlp\.weight": "B",
    r"lora_A\.loraA\.(?P<e>\d+)\.weight": "alias_A",
    r"lora_B\.loraB\.(?P<e>\d+)\.weight": "alias_B",
    r"lora_task_embedding\.weight": None,
    r"lora_gate\.GateL\.weight": None,
}


@register
class MMoELoRA(Family):
    name = "mmoelora"
    title = "MOELoRA (task-gated)"
    signature = Signature(("MMOELORAS",), keys=(r"\.loraA\.\d+\.mlp\.weight$", r"(^|\.)lora_task_embedding\.weight$"))

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        config = ckpt.require_config("r", "lora_alpha")
        where, weights_where = str(ckpt.config_path), str(ckpt.weights_path)
        rank, alpha = require_int(config, "r", where), require_float(config, "lora_alpha", where)
        tensors = dict(ckpt.tensors)
        missing = [k for k in (EMBEDDING_KEY, GATE_KEY) if k not in tensors]
        if missing:
            raise FormatError(f"{weights_where}: the global task gate {missing} is missing (top-level keys)")
        gate = TaskGate(GATE_NAME, embedding=tensors.pop(EMBEDDING_KEY), gate=tensors.pop(GATE_KEY))
        units = []
        for module, parts in split_module_keys(tensors, PARTS, weights_where, cls.title).items():
            a_list, b_list = expert_pairs(parts, module)
            _check_aliases(parts, a_list, b_list, module, weights_where)
            num_experts = len(b_list)
            if gate.gate.shape[0] != num_experts:
                raise FormatError(
                    f"{weights_where}: {module} has {num_experts} experts, the task gate routes over {gate.gate.shape[0]}"
                )
            if "expert_num" in config and require_int(config, "expert_num", where) != num_experts:
                raise FormatError(f"{where}: expert_num={config['expert_num']}, {module} holds {num_experts} experts")
            if a_list[0].shape[0] * num_experts != rank:
                raise FormatError(
                    f"{weights_where}: {module} has {num_experts} experts of rank {a_list[0].shape[0]}, "
                    f"adapter_config.json r={rank} is the total rank"
                )
            router = Router(kind="task", num_experts=num_experts, select="dense", task_gate=GATE_NAME)
            units.append(expert_linear(module, a_list, b_list, alpha / rank, router))
        adapter = Adapter(
            family=cls.name, units=units, task_gates={GATE_NAME: gate}, source_config={"adapter_config": config}
        )
        adapter.notices.append(
            f"routing depends only on the task id (0..{gate.embedding.shape[0] - 1}): pass --task-id; "
            "the gate is applied per sequence (ChatGLM's seq-first broadcast quirk is not reproduced)"
        )
        return adapter


def _check_aliases(
    parts: dict[str, torch.Tensor], a_list: list[torch.Tensor], b_list: list[torch.Tensor], module: str, where: str
) -> None:
    """The `loraA.{e}.weight` aliases must be the same tensors as `loraA.{e}.mlp.weight`; then drop them."""
    for role, stack in (("alias_A", a_list), ("alias_B", b_list)):
        for e, tensor in enumerate(stack):
            alias = parts.get(f"{role}{e}")
            if alias is not None and not torch.equal(alias, tensor):
                raise FormatError(f"{where}: {module} expert {e}: {role[-1]} alias differs from its .mlp.weight")
