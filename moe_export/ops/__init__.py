"""The op contract (docs/op-contract.md): names, torch custom ops, the Triton kernel.

Import the submodule you need: `ops.names` is plain strings; `ops.grouped_lora` / `ops.grouped_lora_slots`
register the torch ops on import.
"""
