"""Feeding a KV-cache decoder export (export/decoder.py) from token ids: positions and an empty cache.

The past shapes come from the manifest's input specs ([batch, kv_heads, past_sequence, head_dim], the
static dims recorded at export), so nothing needs the torch model to build a first step.
"""

from __future__ import annotations

import numpy as np

from moe_export.export.manifest import ExportManifest
from moe_export.runtimes.base import Feeds

PAST_PREFIX = "past_key_values."
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def past_specs(manifest: ExportManifest) -> list[tuple[str, int, int, str]]:
    """(name, kv_heads, head_dim, dtype) per past input, in graph order."""
    return [(t.name, int(t.shape[1]), int(t.shape[3]), t.dtype) for t in manifest.inputs if is_past(t.name)]


def position_ids(attention_mask: np.ndarray, past: int = 0) -> np.ndarray:
    """Positions of the last S = mask_len - past tokens: count of attended tokens before each, pads at 1.

    The same rule as transformers' generate and optimum, so right-padded rows continue at their own length.
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, past:].astype(np.int64)


def empty_past(manifest: ExportManifest, batch: int) -> Feeds:
    """Zero-length past key/values for a first step (past length 0)."""
    feeds = {}
    for name, heads, head_dim, dtype in past_specs(manifest):
        feeds[name] = np.zeros((batch, heads, 0, head_dim), dtype=_numpy_dtype(dtype))
    return feeds


def complete_feeds(feeds: Feeds, manifest: ExportManifest) -> Feeds:
    """input_ids / attention_mask -> the full first-step feeds of a decoder export (unchanged otherwise)."""
    if not manifest.kv_cache:
        return feeds
    out = dict(feeds)
    ids = out["input_ids"]
    mask = out.setdefault("attention_mask", np.ones_like(ids, dtype=np.int64))
    out.setdefault("position_ids", position_ids(mask))
    for name, value in empty_past(manifest, ids.shape[0]).items():
        out.setdefault(name, value)
    return out


def _numpy_dtype(name: str) -> type:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return NUMPY_DTYPES.get(name, np.float32)
