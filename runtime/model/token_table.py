"""The token lookup of the static layouts (`manifest.TOKEN_LOOKUP`): their graphs take embeddings, not ids.

The (vocab, hidden) table is memory-mapped, so a process holds only the pages of the rows it has read (a few
hundred tokens' worth) instead of the whole table, and the graphs' tied LM head, which reads the same file, is
the only full copy (onnxruntime's packed one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import TOKEN_EMBEDDINGS_FILE, Manifest, ManifestError


def load_token_table(directory: Path, manifest: Manifest, dtype: np.dtype) -> np.ndarray:
    """The directory's table, mapped read-only; its shape and dtype must be what the graphs take."""
    path = Path(directory) / TOKEN_EMBEDDINGS_FILE
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable .npy token table ({exc})") from None
    expected = (manifest.vocab_size, manifest.hidden_size)
    if table.shape != expected or table.dtype != dtype:
        raise ManifestError(
            f"{path}: the token table is {table.dtype} {table.shape}; the graphs take {np.dtype(dtype)} rows of "
            f"a {expected} table; re-export the model"
        )
    return table


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """A prompt's ids index the table; numpy would wrap a negative one around instead of failing."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab_size} ids (0 .. {vocab_size - 1})")
