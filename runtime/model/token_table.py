"""The token lookup of the static layouts (`manifest.TOKEN_LOOKUP`): their graphs take embeddings, not ids.

The (vocab, hidden) table stays in its .npy file and each lookup reads just the rows it needs (`os.preadv`
straight into the destination array), so no copy of the table is held for the lookup; where the LM head is tied
to it, onnxruntime's packed copy of the head, read from the same file, is the only one in the process. Memory-mapping the table instead was measured to cost ~1 MB of
resident memory per distinct token on Linux (the kernel maps whole large folios around each fault, MADV_RANDOM
or not): +68 MB after one 96-token GPT-2 generation, and growing. A read is ~2 µs per row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..manifest import TOKEN_EMBEDDINGS_FILE, Manifest, ManifestError


class TokenTable:
    """Rows of a (vocab, hidden) .npy table, read on demand; `table[ids]` -> ids.shape + (hidden,)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(file)
            self.offset = file.tell()
        if len(shape) != 2 or fortran_order or dtype.hasobject:
            raise ValueError(f"expected a C-ordered 2-D numeric table, got shape {shape} ({dtype})")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if os.path.getsize(self.path) < expected:
            raise ValueError(f"the file is shorter than its header says ({expected} bytes)")
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        # Windows has no positional reads: a read-only map there, resident pages and all.
        self._mapped = None if hasattr(os, "preadv") else np.load(self.path, mmap_mode="r")

    def lookup(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of `ids` (any shape), into `out` (ids.shape + (hidden,), the table's dtype, C-contiguous) when
        given. An id outside the table is an error, as onnxruntime's Gather made it, not a silently stale row."""
        ids = np.asarray(ids)
        shape = ids.shape + (self.shape[1],)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"lookup writes {self.dtype} rows of shape {shape} into a C-contiguous array; got {out.dtype} "
                f"{out.shape}{'' if out.flags.c_contiguous else ', not contiguous'}"
            )
        tokens = ids.reshape(-1).tolist()  # a step's few ids: Python's min/max beat two NumPy reductions
        if tokens and (min(tokens) < 0 or max(tokens) >= self.shape[0]):
            check_token_ids(ids, self.shape[0])
        if self._mapped is not None:
            out[...] = self._mapped[ids]
            return out
        for row, token in zip(out.reshape(-1, self.shape[1]), tokens):
            if os.preadv(self._fd, [row], self.offset + token * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.path}: short read of token {token}'s row (was the file truncated?)")
        return out

    def __getitem__(self, ids) -> np.ndarray:
        return self.lookup(np.asarray(ids))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def load_token_table(directory: Path, manifest: Manifest, dtype: np.dtype) -> TokenTable:
    """The directory's table; its shape and dtype must be what the graphs take."""
    path = Path(directory) / TOKEN_EMBEDDINGS_FILE
    try:
        table = TokenTable(path)
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
    """A prompt's ids index the table; a read outside it would return another row or fail obscurely."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab_size} ids (0 .. {vocab_size - 1})")
