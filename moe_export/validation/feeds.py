"""Model inputs for validation and benchmarks: random token ids of given shapes, or a user's .npz file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from moe_export.errors import FormatError, MoeExportError
from moe_export.export.interface import GraphInterface
from moe_export.runtimes.base import Feeds

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (3, 33))


def random_feeds(interface: GraphInterface, batch: int, seq: int, vocab_size: int, seed: int = 0) -> Feeds:
    """Token ids uniform in [0, vocab) and an all-ones attention mask, both int64 [batch, seq]."""
    if batch < 1 or seq < 1:
        raise MoeExportError(f"input shape {batch}x{seq}: batch and sequence must be >= 1")
    rng = np.random.default_rng([seed, batch, seq])  # a different draw per shape, reproducible per seed
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    return {interface.tokens_name: ids, interface.mask_name: np.ones((batch, seq), dtype=np.int64)}


def load_npz_feeds(path: str | Path, interface: GraphInterface, vocab_size: int | None = None) -> Feeds:
    """Feeds from an .npz holding the token ids [B, S] (and optionally the attention mask; ones when absent);
    token ids must lie in [0, vocab_size) when the vocabulary size is known."""
    path = Path(path)
    tokens, mask = interface.tokens_name, interface.mask_name
    if not path.is_file():
        raise FormatError(f"{path}: inputs file not found")
    # np.load guesses the format from the first bytes and calls anything unknown "pickled data": check first.
    if not zipfile.is_zipfile(path):
        raise FormatError(f"{path}: not an .npz archive (save the inputs with np.savez(f, {tokens}=...))")
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable .npz file ({exc})") from None
    if tokens not in feeds:
        raise FormatError(f"{path}: no '{tokens}' array (found {sorted(feeds)}); save with np.savez(f, {tokens}=...)")
    ids = feeds[tokens]
    if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise FormatError(
            f"{path}: {tokens} must be a non-empty integer array [batch, seq], got {ids.dtype} {ids.shape}"
        )
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise FormatError(
            f"{path}: {tokens} range {int(ids.min())}..{int(ids.max())} is outside the vocabulary 0..{vocab_size - 1}"
        )
    feeds.setdefault(mask, np.ones_like(ids))
    allowed = interface.token_input_names()  # a first step: the empty past is derived, never read
    unknown = sorted(set(feeds) - set(allowed))
    if unknown:
        raise FormatError(f"{path}: arrays {unknown} are not model inputs ({', '.join(allowed)})")
    for name, value in feeds.items():
        if value.shape != ids.shape:
            raise FormatError(f"{path}: {name} has shape {list(value.shape)}, {tokens} {list(ids.shape)}")
    check_mask(feeds[mask], path, mask)
    return {k: v.astype(np.int64) for k, v in feeds.items()}


def check_mask(mask: np.ndarray, path: Path, name: str) -> None:
    """An attention mask of 0s and 1s with at least one attended token per row: a row of zeros has no
    position whose logits mean anything (and no last token to generate from), so it is bad input, not a
    parity result."""
    if mask.dtype.kind not in "iub" or not np.isin(mask, (0, 1)).all():
        raise FormatError(f"{path}: {name} must hold only 0 and 1")
    empty = np.flatnonzero(~mask.astype(bool).any(axis=1))
    if empty.size:
        raise FormatError(f"{path}: {name} row {int(empty[0])} is all zeros: a row needs at least one attended token")


def shape_label(feeds: Feeds, interface: GraphInterface) -> str:
    batch, seq = feeds[interface.tokens_name].shape
    return f"{batch}x{seq}"
