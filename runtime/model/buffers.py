"""Row moves inside the preallocated key/value buffers of the static layouts (beam reordering, dropping rows), and
the lineage that lets a move skip the positions a row already shares with its source."""

from __future__ import annotations

import itertools

import numpy as np

_EVENTS = itertools.count(1)  # one per model call, process-wide: states that merge never share a stamp
_ROW_BITS = 20  # a stamp is event << _ROW_BITS | row


def move_rows(buffer: np.ndarray, targets: np.ndarray, sources: np.ndarray, used: int, starts=None) -> None:
    """buffer[:, :, t, :, start:used] = buffer[:, :, s, :, start:used] for each target row t, its source s and its
    start (0 when `starts` is None), in a (layers, 2, rows, heads, positions, head_size) buffer, in place.

    One (layer, key/value) plane at a time and one direct copy per moved row, so each byte moves once: twice as
    fast as gathering the sources and scattering them, and than copying a row through every plane at once (NumPy
    walks that 5-D view slowly). A source that is itself overwritten is read into a temporary first.
    """
    starts = [0] * len(targets) if starts is None else [int(a) for a in starts]
    moves = [(t, s, a) for t, s, a in zip(targets.tolist(), sources.tolist(), starts) if a < used]
    if not moves:
        return
    overwritten = {t for t, _, _ in moves}
    read_from: dict[int, int] = {}  # overwritten source -> the first position any target reads of it
    for _, s, a in moves:
        if s in overwritten:
            read_from[s] = min(a, read_from.get(s, used))
    for plane in buffer.reshape(-1, *buffer.shape[2:]):  # a view: the buffer is C-contiguous
        staged = {s: plane[s, :, a:used].copy() for s, a in read_from.items()}
        for t, s, a in moves:
            if s in staged:
                plane[t, :, a:used] = staged[s][:, a - read_from[s] :]
            else:
                plane[t, :, a:used] = plane[s, :, a:used]


class Lineage:
    """For each row and position of a key/value buffer, a stamp naming the model call (and row) that computed it.

    A row move copies stamps with the keys and values, and a position is never recomputed in place, so two rows
    whose stamps agree on positions 0 .. p-1 hold the same bytes there. Beams of one prompt share the prompt and
    usually most of what they generated; reordering them then copies only the positions past that shared prefix
    (`shared`), a fraction of the whole. Equal tokens are not enough: rows computed apart may differ in the last
    bits (int8 scales are per batch), so only copies count.

    Steps cost nothing here: between two moves each row computes its own positions, so `settle` stamps them all
    at once (one stamp per row and settle) just before the next move needs them.
    """

    def __init__(self, rows: int, capacity: int):
        self.stamps = np.zeros((rows, capacity), dtype=np.int64)
        self.settled = np.zeros(rows, dtype=np.int64)  # positions below are stamped; the rest are the row's own

    def settle(self, lengths: np.ndarray) -> None:
        """Stamp every row's positions from `settled` up to `lengths` (what it holds) as computed by that row."""
        if np.array_equal(self.settled, lengths):
            return
        rows, capacity = self.stamps.shape
        positions = np.arange(capacity)
        fresh = (positions >= self.settled[:, None]) & (positions < lengths[:, None])
        stamps = (next(_EVENTS) << _ROW_BITS) + np.arange(rows, dtype=np.int64)
        np.copyto(self.stamps, np.broadcast_to(stamps[:, None], self.stamps.shape), where=fresh)
        self.settled = lengths.copy()

    def shared(self, targets: np.ndarray, sources: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """For each (target, source) pair, how many leading positions (at most `limit`, what both rows hold) the
        target already has identical to its source. Call `settle` first."""
        width = int(limit.max(initial=0))
        if width == 0:
            return np.zeros(targets.shape[0], dtype=np.int64)
        differ = self.stamps[targets, :width] != self.stamps[sources, :width]
        first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
        return np.minimum(first, limit)

    def select(self, rows: np.ndarray) -> None:
        """Follow a move of settled rows: row i is now what row `rows[i]` was."""
        self.stamps, self.settled = self.stamps[rows], self.settled[rows]

    def grow(self, capacity: int) -> None:
        wider = np.zeros((self.stamps.shape[0], capacity), dtype=np.int64)
        wider[:, : self.stamps.shape[1]] = self.stamps
        self.stamps = wider

    def extend(self, other: Lineage, capacity: int) -> None:
        """Append `other`'s rows (both settled) below these, at `capacity` positions."""
        self.grow(capacity)
        below = np.zeros((other.stamps.shape[0], capacity), dtype=np.int64)
        below[:, : other.stamps.shape[1]] = other.stamps
        self.stamps = np.concatenate([self.stamps, below])
        self.settled = np.concatenate([self.settled, other.settled])
