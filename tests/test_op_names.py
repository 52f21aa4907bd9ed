"""Every custom op type the package writes or runs has its name in ops/names.py and its contract in
docs/op-contract.md, and the op types the native library registers are exactly those."""

from __future__ import annotations

import re

from moe_export.ops import names
from tests.conftest import REPO


def _op_types() -> set[str]:
    return {
        value
        for key, value in vars(names).items()
        if key.startswith(("GROUPED_LORA", "ROUTED_GROUPED_LORA")) and isinstance(value, str)
    }


def test_every_op_type_is_in_the_contract() -> None:
    contract = (REPO / "docs" / "op-contract.md").read_text()
    assert {"GroupedLoRA", "GroupedLoRASlots", "GroupedLoRAAdd", "RoutedGroupedLoRA"} <= _op_types()
    missing = sorted(op for op in _op_types() if not re.search(rf"\b{op}\(", contract))
    assert not missing, f"docs/op-contract.md gives no signature for {missing}"


def test_native_kernels_register_the_named_op_types() -> None:
    """grouped_lora.cc registers its kernels by string; they must be the names the graphs use."""
    source = (REPO / "moe_export" / "runtimes" / "native" / "grouped_lora.cc").read_text()
    registered = set(re.findall(r'emplace_back\("(\w+)"', source))
    assert registered == _op_types()
