"""Row moves in the static layouts' key/value buffers: the lineage shortcut must leave every row holding exactly
what a full copy would have given it."""

import numpy as np
import pytest

from onnxgen.model.buffers import Lineage, move_rows


def _buffer(rows: int, capacity: int) -> np.ndarray:
    return np.zeros((2, 2, rows, 3, capacity, 4), dtype=np.float32)  # (layers, k/v, rows, heads, positions, size)


def test_move_rows_reads_every_source_before_overwriting_it():
    rng = np.random.default_rng(0)
    buffer = rng.standard_normal((2, 2, 5, 3, 8, 4)).astype(np.float32)
    want = buffer.copy()
    rows = np.array([2, 0, 1, 1, 3])  # a cycle 0 <- 2 <- 1 <- 0, a duplicate, a row kept in place
    want[:, :, :, :, :6] = buffer[:, :, rows, :, :6]
    moved = np.flatnonzero(rows != np.arange(5))
    move_rows(buffer, moved, rows[moved], 6)
    np.testing.assert_array_equal(buffer[:, :, :, :, :6], want[:, :, :, :, :6])


def test_move_rows_copies_only_from_each_start():
    buffer = np.arange(2 * 2 * 3 * 3 * 6 * 4, dtype=np.float32).reshape(2, 2, 3, 3, 6, 4)
    before = buffer.copy()
    move_rows(buffer, np.array([0, 1]), np.array([1, 0]), 5, starts=np.array([2, 5]))
    np.testing.assert_array_equal(buffer[:, :, 0, :, :2], before[:, :, 0, :, :2])  # below its start: untouched
    np.testing.assert_array_equal(buffer[:, :, 0, :, 2:5], before[:, :, 1, :, 2:5])
    np.testing.assert_array_equal(buffer[:, :, 1], before[:, :, 1])  # start == used: nothing to copy
    np.testing.assert_array_equal(buffer[:, :, :, :, 5:], before[:, :, :, :, 5:])  # past `used`: untouched


@pytest.mark.parametrize("seed", range(6))
def test_moves_that_skip_shared_positions_give_what_full_copies_give(seed):
    """Beam-like runs: each step computes one new position per row (data unique to that row and call), then rows
    are reordered, duplicated, dropped. The buffer moved with the lineage's shortcut must match, on every position
    a row holds, a buffer moved by full copies; and the shortcut must skip at least the shared prompt."""
    rng = np.random.default_rng(seed)
    rows, capacity, prompt = 6, 40, 5
    fast, full = _buffer(rows, capacity), _buffer(rows, capacity)
    lineage = Lineage(1, capacity)
    lengths = np.array([prompt])
    fast[:, :, 0, :, :prompt] = full[:, :, 0, :, :prompt] = rng.standard_normal((2, 2, 3, prompt, 4))
    skipped = held_moves = 0
    for _ in range(30):
        count = int(rng.integers(1, rows + 1))
        keep = rng.integers(0, lengths.shape[0], count)
        if rng.random() < 0.7:  # in order, as beams mostly come; else shuffled
            keep = np.sort(keep)
        # the move, as StaticDecoderState.select makes it
        lineage.settle(lengths)
        moved = np.flatnonzero(keep != np.arange(count))
        if moved.size:
            sources = keep[moved]
            used = int(lengths[sources].max())
            held = np.zeros(count, dtype=np.int64)
            held[: min(count, lengths.shape[0])] = lengths[:count]
            limit = np.minimum(held[moved], lengths[sources])
            starts = lineage.shared(np.where(moved < lengths.shape[0], moved, 0), sources, limit)
            move_rows(fast, moved, sources, used, starts)
            full[:, :, :count, :, :used] = full[:, :, keep, :, :used].copy()
            skipped += int(starts.sum())
            held_moves += int(np.count_nonzero(held[moved]))
        lineage.select(keep)
        lengths = lengths[keep]
        for r in range(count):
            np.testing.assert_array_equal(fast[:, :, r, :, : lengths[r]], full[:, :, r, :, : lengths[r]])
        if lengths.max() >= capacity:
            break
        step = rng.standard_normal((2, 2, count, 3, 4)).astype(np.float32)  # every row computes a new position
        for r in range(count):
            fast[:, :, r, :, lengths[r]] = full[:, :, r, :, lengths[r]] = step[:, :, r]
        lengths = lengths + 1
    # Every row descends from the one prompt row by copies: a move into a held row never copies the prompt again.
    assert held_moves and skipped >= prompt * held_moves


def test_rows_with_equal_stamps_only_through_copies():
    """Two rows computed apart never look shared, even from the same call; a copy makes them share up to there."""
    lineage = Lineage(2, 8)
    lineage.settle(np.array([3, 3]))  # a prompt of 3 in each row
    assert lineage.shared(np.array([0]), np.array([1]), np.array([3])).tolist() == [0]
    lineage.select(np.array([0, 0]))
    lineage.settle(np.array([4, 4]))  # each row computed its own 4th position
    assert lineage.shared(np.array([1]), np.array([0]), np.array([4])).tolist() == [3]
    lineage.settle(np.array([4, 4]))  # nothing new: the stamps stay
    assert lineage.shared(np.array([1]), np.array([0]), np.array([4])).tolist() == [3]
    other = Lineage(1, 8)
    other.settle(np.array([3]))
    lineage.extend(other, 8)
    assert lineage.shared(np.array([2]), np.array([0]), np.array([3])).tolist() == [0]  # another state's rows
    lineage.grow(12)
    assert lineage.stamps.shape == (3, 12) and lineage.shared(np.array([1]), np.array([0]), np.array([4])).tolist() == [3]
