"""Selection, the last step: turn processed scores into token ids, greedily or by a seeded draw.

Randomness always comes from an explicit ``numpy.random.Generator``, one per sequence, derived from the request's
seed and the sequence's index within the request (:func:`make_row_rng`), so a seeded request produces the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import numpy as np

from .processors import pack


def make_row_rng(seed: int | None, index: int) -> np.random.Generator:
    """The generator of sequence `index` of a request seeded with `seed` (None: fresh OS entropy).

    Equal to ``SeedSequence(seed).spawn(index + 1)[index]``: streams for different indices are independent.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def greedy(scores: np.ndarray) -> np.ndarray:
    """(R, V) scores -> (R,) int64 argmax; the first maximum wins a tie, as with ``torch.argmax``."""
    return np.argmax(scores, axis=1).astype(np.int64, copy=False)


def sample(scores: np.ndarray, rngs) -> np.ndarray:
    """One draw per row from softmax(scores[row]), using one uniform from ``rngs[row]`` -> (R,) int64.

    Inverse CDF: the uniform picks a point of the row's cumulative weight, found first among blocks of entries
    and then inside one block, so no per-vocabulary random numbers and no full cumulative sum. When most scores
    are -inf (after top-k/top-p) each row's finite entries are first packed into a small block. A row with a
    single finite entry returns it; a row with none is an error.
    """
    n_rows, vocab = scores.shape
    if len(rngs) != n_rows:
        raise ValueError(f"sample needs one generator per row: {n_rows} rows, got {len(rngs)} generators")
    u = np.fromiter((g.random() for g in rngs), dtype=np.float64, count=n_rows)
    finite = scores > -np.inf
    if 4 * np.count_nonzero(finite) < finite.size:  # mostly filtered: pack each row's finite entries
        cols, vals, _ = pack(scores, finite)
        return _draw(cols, vals, u)
    return _draw(None, scores, u)


def sample_packed(cols: np.ndarray, vals: np.ndarray, rngs) -> np.ndarray:
    """:func:`sample` over scores already packed (``cols`` (R, W) their columns, ``vals`` (R, W) -inf padded, each
    row's finite entries in ascending column order, as top-k's candidates come): the same draw, without a
    vocabulary-wide row."""
    n_rows = vals.shape[0]
    if len(rngs) != n_rows:
        raise ValueError(f"sample needs one generator per row: {n_rows} rows, got {len(rngs)} generators")
    return _draw(cols, vals, np.fromiter((g.random() for g in rngs), dtype=np.float64, count=n_rows))


def _draw(cols: np.ndarray | None, vals: np.ndarray, u: np.ndarray) -> np.ndarray:
    n_rows, width = vals.shape
    if n_rows == 1 and width <= _BLOCK:  # the common draw (batch 1 after top-k): 1-D calls, a third of the time
        row = vals[0]
        top = row.max()
        if top == -np.inf:
            raise ValueError("cannot sample row 0: every score is -inf (all tokens were filtered out)")
        ccum = np.cumsum(np.exp(row - top), dtype=np.float64)
        total = ccum[-1]
        pick = min(int(ccum.searchsorted(u[0] * total, "right")), int(ccum.searchsorted(total, "left")))
        return np.array([pick if cols is None else cols[0, pick]], dtype=np.int64)
    top = vals.max(axis=1)
    if (top == -np.inf).any():
        row = int(np.flatnonzero(top == -np.inf)[0])
        raise ValueError(f"cannot sample row {row}: every score is -inf (all tokens were filtered out)")
    weights = vals - top[:, None]
    pick = _inverse_cdf(np.exp(weights, out=weights), u)
    return pick if cols is None else cols[np.arange(n_rows), pick]


_BLOCK = 256  # the inverse CDF searches blocks of this many entries first, then one block


def _inverse_cdf(weights: np.ndarray, u: np.ndarray, block: int = _BLOCK) -> np.ndarray:
    """For weights (R, W) >= 0 with a positive total, the first index whose cumulative weight exceeds u * total.

    Entries of weight 0 are never returned: should rounding put the target at the total, the last positive
    entry is taken instead. A row of at most one block takes its total from the float64 running sum, so a row
    drawn alone (`_draw`'s 1-D path) and in a batch agree.
    """
    n_rows, width = weights.shape
    if width <= block:  # one block (e.g. after top-k): the same search without the block level
        ccum = np.cumsum(weights, axis=1, dtype=np.float64)
        total = ccum[:, -1:]
        return np.minimum((ccum <= u[:, None] * total).sum(axis=1), (ccum < total).sum(axis=1))
    rows = np.arange(n_rows)
    csum = np.cumsum(np.add.reduceat(weights, np.arange(0, width, block), axis=1, dtype=np.float64), axis=1)
    target = u * csum[:, -1]
    b = np.minimum((csum <= target[:, None]).sum(axis=1), (csum < csum[:, -1:]).sum(axis=1))
    rest = target - np.where(b > 0, csum[rows, b - 1], 0.0)
    cols = b[:, None] * block + np.arange(block)  # (R, block): the entries of the chosen block
    inner = np.where(cols < width, weights[rows[:, None], np.minimum(cols, width - 1)], 0).astype(np.float64)
    ccum = np.cumsum(inner, axis=1)
    j = np.minimum((ccum <= rest[:, None]).sum(axis=1), (ccum < ccum[:, -1:]).sum(axis=1))
    return (b * block + j).astype(np.int64)


def sample_without_replacement(scores_flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct indices of ``scores_flat`` (V',), drawn one after another from softmax(scores), renormalised.

    The distribution of ``torch.multinomial(softmax(x), k, replacement=False)``, with which beam sampling draws its
    2 x num_beams candidates from num_beams x V scores. Computed as an exponential race over the finite entries:
    the k largest ``w / E`` with ``w = exp(x - max)`` and E ~ Exp(1) (float64, so E is never 0). Returned in draw
    order. Where fewer than k weights are non-zero (torch raises), zero weights fill the tail.
    """
    fin = np.flatnonzero(scores_flat > -np.inf)
    if not 0 < k <= fin.size:
        raise ValueError(f"k must be in [1, {fin.size}] (the number of finite scores), got {k}")
    vals = scores_flat[fin]
    keys = np.exp(vals - vals.max()) / rng.standard_exponential(fin.size)
    top = np.argpartition(keys, fin.size - k)[fin.size - k :] if k < fin.size else np.arange(fin.size)
    top = top[np.argsort(-keys[top], kind="stable")]
    return fin[top]


def token_logprobs(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log_softmax(scores)[row, ids[row]] -> (R,) float32: the log-probability of each chosen token."""
    top = scores.max(axis=1)
    top = np.where(np.isfinite(top), top, np.float32(0))
    shifted = scores - top[:, None]
    lse = np.log(np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64))
    chosen = scores[np.arange(scores.shape[0]), ids].astype(np.float64)
    return (chosen - top - lse).astype(np.float32)
