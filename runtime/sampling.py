"""Selection, the last step: turn processed scores into token ids, greedily or by a seeded draw.

Randomness always comes from an explicit ``numpy.random.Generator``, one per sequence, derived from the request's
seed and the sequence's index within the request (:func:`make_row_rng`), so a seeded request produces the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import numpy as np


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

    Inverse CDF over the finite entries only: after top-k/top-p a row has few, so the work is one pass to find
    them and a cumulative sum over a small (R, n_max) block. A row with a single finite entry returns it.
    """
    n_rows, vocab = scores.shape
    if len(rngs) != n_rows:
        raise ValueError(f"sample needs one generator per row: {n_rows} rows, got {len(rngs)} generators")
    u = np.fromiter((g.random() for g in rngs), dtype=np.float64, count=n_rows)
    finite = scores > -np.inf  # (R, V)
    counts = finite.sum(axis=1)
    if counts.min() == 0:
        row = int(np.argmin(counts))
        raise ValueError(f"cannot sample row {row}: every score is -inf (all tokens were filtered out)")
    width = int(counts.max())
    if width == vocab:  # nothing filtered: work on the rows as they are
        cols = None
        vals = scores
    else:  # pack each row's finite entries to the left of an (R, width) block
        r, c = np.nonzero(finite)
        slot = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = np.zeros((n_rows, width), dtype=np.int64)
        cols[r, slot] = c
        vals = np.full((n_rows, width), -np.inf, dtype=np.float32)
        vals[r, slot] = scores[r, c]
    w = np.exp(vals.astype(np.float64) - vals.max(axis=1, keepdims=True))
    cdf = np.cumsum(w, axis=1)
    total = cdf[:, -1:]
    pick = (cdf <= u[:, None] * total).sum(axis=1)  # first position whose cdf exceeds the target
    last = (cdf < total).sum(axis=1)  # last entry with weight > 0, should rounding push the target to the total
    pick = np.minimum(pick, last)
    if cols is None:
        return pick.astype(np.int64)
    return cols[np.arange(n_rows), pick]


def sample_without_replacement(scores_flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct indices of ``scores_flat`` (V',), drawn one after another from softmax(scores), renormalised.

    The distribution of ``torch.multinomial(softmax(x), k, replacement=False)`` (beam sampling draws its
    2 x num_beams candidates from num_beams x V scores with it), computed as an exponential race over the finite
    entries: the k largest ``x - log(E)``, E ~ Exp(1). Returned in draw order (first draw first).
    """
    fin = np.flatnonzero(scores_flat > -np.inf)
    if not 0 < k <= fin.size:
        raise ValueError(f"k must be in [1, {fin.size}] (the number of finite scores), got {k}")
    keys = scores_flat[fin].astype(np.float64) - np.log(rng.standard_exponential(fin.size))
    top = np.argpartition(keys, fin.size - k)[fin.size - k :] if k < fin.size else np.arange(fin.size)
    top = top[np.argsort(-keys[top], kind="stable")]
    return fin[top]


def token_logprobs(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log_softmax(scores)[row, ids[row]] -> (R,) float32: the log-probability of each chosen token."""
    top = scores.max(axis=1)
    top = np.where(np.isfinite(top), top, np.float32(0))
    lse = np.log(np.exp(scores - top[:, None]).sum(axis=1, dtype=np.float64))
    chosen = scores[np.arange(scores.shape[0]), ids].astype(np.float64)
    return (chosen - top - lse).astype(np.float32)
