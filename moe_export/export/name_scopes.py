"""The module path torch.onnx records on each exported node (`pkg.torch.onnx.name_scopes`), read in one place."""

from __future__ import annotations

import ast

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
WRAPPER_PREFIX = "model."  # the export wrappers hold the causal LM as `.model`


def module_scopes(raw: str | None, prefix: str = WRAPPER_PREFIX) -> list[str]:
    """The scopes of one node, outermost first, the wrapper's prefix removed; the last entry names the op itself.
    Empty when the metadata is absent or unreadable."""
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [s[len(prefix) :] if s.startswith(prefix) else s for s in scopes if isinstance(s, str)]
