"""Copy-on-write model copies, so that export and merge never change the caller's `LoadedAdapter`.

A fold writes `W + Δ` into a weight. Done on the caller's model, a second export or a merge after an
export folds the same LoRA twice (issue 11). A full `deepcopy` avoids that at the price of a second
model in memory; `copy_for_edit` copies only the weights that will be edited: the module tree is new,
every other parameter is a new `Parameter` object over the same storage (so `.to(dtype)` on the copy
rebinds the copy's parameter, never the caller's), and buffers are shared (modules rebind them, they
are never written in place). Extra memory: the edited weights, which the export needs as new
constants anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def copy_for_edit(model: nn.Module, edited: Iterable[torch.Tensor]) -> nn.Module:
    """A new module tree over `model`'s weights; the tensors in `edited` are cloned, free to change in place."""
    cloned = {id(t) for t in edited}
    memo: dict[int, object] = {}
    for param in model.parameters():
        if id(param) not in cloned:
            memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        if buffer is not None and id(buffer) not in cloned:
            memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)
