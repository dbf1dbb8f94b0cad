"""Logits processors: pure NumPy edits of next-token scores, one row per sequence, parameters per row.

Each function takes ``scores`` (R, V) float32 and returns the new scores (often the same array, edited in place);
those that read the history take ``input_ids`` (R, L) int64, left-padded with -1 ("no token here", ignored). A
real padding id (GPT-2 pads with EOS) is an ordinary token, as in transformers. Each per-row parameter has a
neutral value that leaves its row bit-identical. Semantics: transformers' RepetitionPenalty, NoRepeatNGram,
MinLength/MinNewTokens, Temperature, TopK and TopP processors, applied in that order by :class:`LogitsChain`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_NEG_INF = np.float32(-np.inf)
_PACK_LIMIT = 1024  # top-p filters rows with at most this many finite scores (e.g. after top-k) all at once
_STRIDE = 8  # top-k first partitions every 8th score: a sample whose k-th largest bounds the row's from below


def _per_row(value, n: int, dtype) -> np.ndarray:
    """A scalar or a length-n sequence as an (n,) array of `dtype`."""
    return np.broadcast_to(np.asarray(value, dtype=dtype), (n,))


def repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty) -> np.ndarray:
    """Penalise every token id present in the row's history, once however often it occurs.

    A negative score is multiplied by the penalty and any other score divided by it, so a penalty > 1 always makes
    a repeat less likely. ``penalty`` (R,), 1.0 = off. Computed in float32 like transformers, so results match it
    exactly.
    """
    penalty = _per_row(penalty, scores.shape[0], np.float32)
    rows = np.flatnonzero(penalty != 1.0)
    if rows.size == 0:
        return scores
    r, c = np.divmod(np.flatnonzero(input_ids[rows] >= 0), input_ids.shape[1])  # 1-D: faster than 2-D nonzero
    r = rows[r]
    tok = input_ids[r, c]
    old = scores[r, tok]  # a copy: duplicates of one id all read the original score and write the same value
    p = penalty[r]
    scores[r, tok] = np.where(old < 0, old * p, old / p)
    return scores


def no_repeat_ngram(input_ids: np.ndarray, scores: np.ndarray, ngram_size) -> np.ndarray:
    """Ban every token that would complete an n-gram already present in the row's history.

    ``ngram_size`` (R,), 0 = off. The row's last n-1 tokens are the prefix; each earlier n-gram starting with that
    prefix bans its last token. n-grams containing -1 do not count, so a row with fewer than n-1 real tokens bans
    nothing. (transformers returns early when ``cur_len + 1 < n``; with fewer than n tokens there is no n-gram to
    match anyway, so the two agree.) n = 1 bans every token in the history.
    """
    sizes = _per_row(ngram_size, scores.shape[0], np.int64)
    length = input_ids.shape[1]
    for n in np.unique(sizes[sizes > 0]).tolist():
        if n > length:
            continue
        rows = np.flatnonzero(sizes == n)
        hist = input_ids[rows]  # (Rn, L)
        win = sliding_window_view(hist, n, axis=1)  # (Rn, L-n+1, n), a view
        hit = win[:, :, 0] >= 0
        for j in range(1, n):
            hit &= win[:, :, j] >= 0
        for j in range(n - 1):  # compare each window's first n-1 tokens with the row's last n-1
            hit &= win[:, :, j] == hist[:, length - n + 1 + j, None]
        r, w = np.nonzero(hit)
        scores[rows[r], win[r, w, n - 1]] = _NEG_INF
    return scores


def suppress_tokens(scores: np.ndarray, rows_mask: np.ndarray, token_ids) -> np.ndarray:
    """Set ``scores[row, token_ids] = -inf`` for the rows where ``rows_mask`` (R,) bool is True.

    Used to forbid EOS before a minimum length. To match transformers the caller computes the mask as:

    - ``min_length``: ``cur_len < min_length`` with ``cur_len = input_ids.shape[-1]``, i.e. the padded length of
      the sequence so far, prompt included for decoder-only models (for encoder-decoders, the decoder ids including
      the decoder start token);
    - ``min_new_tokens``: ``cur_len - prompt_len < min_new_tokens``, where ``prompt_len`` is that same padded
      length at the first step.

    transformers only installs these when an EOS id is known and the minimum is > 0.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if rows_mask.all():  # the usual case: every row is still short
        scores[:, ids] = _NEG_INF
        return scores
    rows = np.flatnonzero(rows_mask)
    if rows.size and ids.size:
        scores[rows[:, None], ids[None, :]] = _NEG_INF
    return scores


def temperature(scores: np.ndarray, temperature) -> np.ndarray:
    """Divide each row by its temperature (R,) float, 1.0 = off; float32 division, bit-equal to transformers.

    Except where that overflows (a temperature so small that a score divided by it passes float32's largest):
    there transformers' softmax turns to NaN and its sampler fails, and a draw would pick an arbitrary token.
    Such a row becomes the limit of its distribution as the temperature falls, the row's best scores kept at 0
    and every other at -inf: greedy, up to ties.
    """
    t = _per_row(temperature, scores.shape[0], np.float32)
    rows = np.flatnonzero(t != 1.0)
    tiny = rows[t[rows] < _OVERFLOW_RISK]  # at 1e-30 only scores beyond 3e8 overflow; no check above that
    if not tiny.size:
        return _divide_rows(scores, rows, t)
    before = scores[tiny]  # a copy
    with np.errstate(over="ignore"):
        scores = _divide_rows(scores, rows, t)
    overflowed = np.isposinf(scores[tiny]).any(axis=1)
    if overflowed.any():
        kept = before[overflowed]
        scores[tiny[overflowed]] = np.where(kept == kept.max(axis=1, keepdims=True), np.float32(0), _NEG_INF)
    return scores


def _divide_rows(scores: np.ndarray, rows: np.ndarray, t: np.ndarray) -> np.ndarray:
    if rows.size == scores.shape[0]:
        scores /= t[:, None]
    elif rows.size:
        scores[rows] = scores[rows] / t[rows, None]
    return scores


_OVERFLOW_RISK = np.float32(1e-30)


def top_k(scores: np.ndarray, k, min_tokens_to_keep=1) -> np.ndarray:
    """Keep the k highest scores of each row (and every score tied with the k-th), set the rest to -inf.

    ``k`` (R,) int, 0 = off; the effective k is ``min(max(k, min_tokens_to_keep), V)``. Rows are grouped by their
    effective k so each group costs one partition of a sample and one of a few candidates, never a full sort.
    """
    return _top_k_grouped(scores, _top_k_groups(k, min_tokens_to_keep, scores.shape[0]))


def _top_k_groups(k, min_tokens_to_keep, n_rows: int) -> list[tuple[np.ndarray | None, int]]:
    """(rows, effective k) for each distinct k; rows is None when it is every row. Rows with k = 0 are left out."""
    k = _per_row(k, n_rows, np.int64)
    eff = np.where(k == 0, 0, np.maximum(k, _per_row(min_tokens_to_keep, n_rows, np.int64)))
    groups = []
    for kk in np.unique(eff[eff > 0]).tolist():
        rows = np.flatnonzero(eff == kk)
        groups.append((None if rows.size == n_rows else rows, kk))
    return groups


def _top_k_grouped(scores: np.ndarray, groups) -> np.ndarray:
    for rows, k in groups:
        if rows is None:
            _keep_top_k(scores, k)
        else:
            sub = scores[rows]
            _keep_top_k(sub, k)
            scores[rows] = sub
    return scores


def _keep_top_k(scores: np.ndarray, k: int) -> None:
    """Top-k of every row of ``scores`` (R, V), in place."""
    n_rows, vocab = scores.shape
    if k >= vocab:
        return
    found = top_k_candidates(scores, k)
    if found is not None:
        cols, vals, _ = found
        r, j = np.nonzero(vals > -np.inf)
        scores.fill(_NEG_INF)
        scores[r, cols[r, j]] = vals[r, j]
        return
    if n_rows > 1 and -(-vocab // _STRIDE) >= 4 * k:  # the shortcut applied by size (top_k_candidates)
        # Some row's NaN scores defeated the shortcut. Each row on its own then, so that the other rows still take
        # it: the shortcut drops a row's NaN scores and the whole-row partition keeps them, and a row's result must
        # not depend on what shares its batch.
        for row in range(n_rows):
            _keep_top_k(scores[row : row + 1], k)
        return
    kth = np.partition(scores, vocab - k, axis=1)[:, vocab - k]
    np.copyto(scores, _NEG_INF, where=scores < kth[:, None])


def top_k_candidates(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """What top-k keeps of each row of ``scores`` (R, V), packed as :func:`pack_finite` would pack the filtered
    rows: ``cols`` (R, W) ascending, ``vals`` (R, W) -inf padded, ``counts`` (R,) — its finite entries that are at
    least the row's k-th largest, ties included. None where this shortcut does not apply (k too large for it, or NaN
    scores); then partition the whole row.

    The k-th largest of every `_STRIDE`-th score is at most the row's k-th largest, so only the scores at or above
    it (about `_STRIDE` x k of them) need partitioning: about half the cost of partitioning the whole row.
    """
    sample = scores[:, ::_STRIDE]
    width = sample.shape[1]
    if k >= scores.shape[1] or width < 4 * k:
        return None
    if scores.shape[0] == 1:
        return _top_k_candidates_of_row(scores[0], sample[0], k)
    bound = np.partition(sample, width - k, axis=1)[:, width - k]
    cols, vals, counts = pack(scores, scores >= bound[:, None])  # (R, W) candidates, -inf padded
    if counts.min() < k:  # only when NaN scores made the bound meaningless
        return None
    kth = np.partition(vals, vals.shape[1] - k, axis=1)[:, vals.shape[1] - k]
    keep = (vals >= kth[:, None]) & (vals > -np.inf)  # a row with fewer than k finite scores keeps just those
    if keep.all():
        return cols, vals, counts
    if keep.shape[0] == 1:  # one row: no slot arithmetic
        j = np.flatnonzero(keep[0])
        if j.size:
            return cols[:, j], vals[:, j], np.array([j.size])
    slots, kept, counts = pack(vals, keep)  # a row with nothing finite gets one -inf slot, as pack_finite gives it
    return np.take_along_axis(cols, slots, axis=1), kept, counts


def _top_k_candidates_of_row(row: np.ndarray, sample: np.ndarray, k: int):
    """`top_k_candidates` of one row with 1-D calls: batch 1 decodes, a third faster than the 2-D route."""
    width = sample.shape[0]
    bound = np.partition(sample, width - k)[width - k]
    cols = np.flatnonzero(row >= bound)
    if cols.size < k:  # only when NaN scores made the bound meaningless
        return None
    vals = row[cols]
    kth = np.partition(vals, cols.size - k)[cols.size - k]
    # kth is -inf only in a row with fewer than k finite scores; it keeps just those (none: one -inf slot)
    kept = np.flatnonzero(vals >= kth) if kth > -np.inf else np.flatnonzero(vals > -np.inf)
    if kept.size == cols.size:
        return cols[None], vals[None], np.array([cols.size])
    if kept.size == 0:
        return cols[None, :1], np.full((1, 1), _NEG_INF, row.dtype), np.array([0])  # as `pack` pads it
    return cols[kept][None], vals[kept][None], np.array([kept.size])


def top_p(scores: np.ndarray, p, min_tokens_to_keep=1) -> np.ndarray:
    """Nucleus filtering: keep the fewest highest-scoring tokens whose probability mass reaches p.

    ``p`` (R,) float, 1.0 = off. A token is kept when the mass of the tokens ranked above it is < p (transformers
    removes tokens whose ascending cumulative probability is <= 1 - p: the same set, up to floating-point rounding
    at the boundary), and the top ``min_tokens_to_keep`` are always kept. Among tokens tied on the boundary score,
    which ones survive is unspecified (as with transformers' unstable sort). Never sorts the whole vocabulary.
    """
    n_rows = scores.shape[0]
    p = _per_row(p, n_rows, np.float64)
    keep = _per_row(min_tokens_to_keep, n_rows, np.int64)
    rows = np.flatnonzero(p < 1.0)
    if rows.size == 0:
        return scores
    finite = scores[rows] > -np.inf
    counts = np.fromiter((np.count_nonzero(f) for f in finite), dtype=np.int64, count=rows.size)
    few = counts <= _PACK_LIMIT
    if few.any():
        _top_p_packed(scores, rows[few], p[rows[few]], keep[rows[few]])
    for i in np.flatnonzero(~few).tolist():  # 1-D partitions are several times faster than 2-D ones
        r = rows[i]
        _top_p_row(scores[r], np.flatnonzero(finite[i]), float(p[r]), int(keep[r]))
    return scores


def _top_p_packed(scores: np.ndarray, rows: np.ndarray, p: np.ndarray, keep: np.ndarray) -> None:
    """Top-p for rows with few finite scores: pack them into a small block, sort it, filter every row at once."""
    cols, vals, counts = pack_finite(scores[rows])  # (Rq, W)
    order = np.argsort(-vals, axis=1, kind="stable")  # descending, -inf padding last
    vals = np.take_along_axis(vals, order, axis=1)
    cols = np.take_along_axis(cols, order, axis=1)
    top = np.where(vals[:, :1] > -np.inf, vals[:, :1], np.float32(0))
    prob = np.exp(vals.astype(np.float64) - top)
    cum = np.cumsum(prob, axis=1)
    above = (cum - prob) / cum[:, -1:]  # mass ranked strictly above each entry
    n_keep = np.minimum(np.maximum((above < p[:, None]).sum(axis=1), keep), counts)
    rr, cc = np.nonzero(np.arange(vals.shape[1]) < n_keep[:, None])
    out = np.full((rows.size, scores.shape[1]), _NEG_INF, dtype=scores.dtype)
    out[rr, cols[rr, cc]] = vals[rr, cc]
    scores[rows] = out


def _top_p_row(row: np.ndarray, fin: np.ndarray, p: float, keep: int) -> None:
    """Top-p on one row (V,) whose finite entries are at `fin`, in place. Only the top m values are sorted (values,
    not indices), m growing until they cover p; the nucleus is then everything above the cut value plus as many
    entries tied with it as the count allows."""
    n = fin.size
    if n <= keep:
        return
    vals = row[fin]
    top = vals.max()
    mass = np.exp(vals - top).sum(dtype=np.float64)  # softmax normaliser, relative to the maximum
    m = min(n, max(64, keep))
    while True:
        best = np.sort(np.partition(vals, n - m)[n - m :] if m < n else vals)[::-1]  # top m, descending
        prob = np.exp(best.astype(np.float64) - top) / mass
        cum = np.cumsum(prob)
        if cum[-1] >= p or m == n:  # the top m cover p: everything below them is removed
            break
        m = min(8 * m, n)
    n_keep = min(max(int(np.count_nonzero(cum - prob < p)), keep), m)
    cut = best[n_keep - 1]
    tied = np.flatnonzero(row == cut)
    surplus = tied[n_keep - int(np.count_nonzero(best > cut)) :]
    row[row < cut] = _NEG_INF
    row[surplus] = _NEG_INF


def pack_finite(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's finite entries moved to the left of a small block: cheap when most scores are -inf.

    Returns ``cols`` (R, W) int64 (their columns in ``scores``, ascending), ``vals`` (R, W) (their scores, -inf
    padded) and ``counts`` (R,), where W is the largest count (at least 1).
    """
    return pack(scores, scores > -np.inf)


def pack(scores: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`pack_finite`, for the entries where ``mask`` (R, V) bool is True."""
    n_rows, vocab = scores.shape
    if n_rows == 1:  # one row: no slot arithmetic
        c = np.flatnonzero(mask[0])
        if c.size:
            return c[None], scores[0, c][None], np.array([c.size])
    r, c = np.divmod(np.flatnonzero(mask), vocab)  # 1-D: much faster than a 2-D nonzero
    counts = np.bincount(r, minlength=n_rows)
    slot = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    width = max(int(counts.max(initial=0)), 1)
    cols = np.zeros((n_rows, width), dtype=np.int64)
    cols[r, slot] = c
    vals = np.full((n_rows, width), _NEG_INF, dtype=scores.dtype)
    vals[r, slot] = scores[r, c]
    return cols, vals, counts


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax (R, V) float32, stable for large and -inf scores (beam search scores with it)."""
    top = scores.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0))
    shifted = scores - top
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    shifted -= lse
    return shifted


@dataclass(frozen=True, eq=False)
class RowParams:
    """Logits settings of each row, as a struct of (R,) arrays; neutral values switch a step off for a row.

    Build with :meth:`full` (validates); :meth:`take` and :meth:`concat` follow rows as beams are reordered, rows
    finish or requests join.
    """

    repetition_penalty: np.ndarray  # float32, 1.0 = off; > 1 discourages tokens already in the history
    no_repeat_ngram_size: np.ndarray  # int64, 0 = off
    temperature: np.ndarray  # float32, 1.0 = off; used only where do_sample
    top_k: np.ndarray  # int64, 0 = off; used only where do_sample
    top_p: np.ndarray  # float64, 1.0 = off; used only where do_sample
    min_tokens_to_keep: np.ndarray  # int64 >= 1: transformers uses 1, and (number of EOS ids + 1) in beam sampling
    do_sample: np.ndarray  # bool: sample (warp then draw) or pick greedily / by beam score

    @classmethod
    def full(cls, n: int, *, repetition_penalty=1.0, no_repeat_ngram_size=0, temperature=1.0, top_k=0, top_p=1.0,
             min_tokens_to_keep=1, do_sample=False) -> RowParams:  # fmt: skip
        """n rows; each argument is a scalar for all rows or a sequence of n values. Validates."""
        given = locals()
        arrays = {}
        for f in fields(cls):
            arr = np.asarray(given[f.name], dtype=_DTYPES[f.name])
            if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
                raise ValueError(f"{f.name} must be a scalar or have {n} values, got shape {arr.shape}")
            arrays[f.name] = np.broadcast_to(arr, (n,)).copy()
        params = cls(**arrays)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise ValueError naming the first parameter, row and value that transformers would reject."""
        s = self.do_sample
        checks = [
            ("repetition_penalty", ~(self.repetition_penalty > 0), "> 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size < 0, ">= 0 (0 = off)"),
            ("temperature", s & ~(self.temperature > 0), "> 0 when do_sample is True"),
            ("top_k", self.top_k < 0, ">= 0 (0 = off)"),
            ("top_p", ~((self.top_p >= 0) & (self.top_p <= 1)), "in [0, 1] (1 = off)"),
            ("min_tokens_to_keep", self.min_tokens_to_keep < 1, ">= 1"),
        ]
        for name, bad, allowed in checks:
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)[row]} (row {row})")

    def __len__(self) -> int:
        return self.do_sample.shape[0]

    def take(self, indices) -> RowParams:
        """The rows at `indices` (any int array), in that order."""
        return RowParams(*(getattr(self, f.name)[indices] for f in fields(self)))

    @staticmethod
    def concat(parts) -> RowParams:
        """The rows of each part, one after another."""
        return RowParams(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(RowParams)))


_DTYPES = dict(repetition_penalty=np.float32, no_repeat_ngram_size=np.int64, temperature=np.float32,
               top_k=np.int64, top_p=np.float64, min_tokens_to_keep=np.int64, do_sample=np.bool_)  # fmt: skip


class LogitsChain:
    """The steps any row of a batch needs, in transformers' order, built once per batch layout.

    Order: repetition penalty, no-repeat n-gram, EOS suppression (min length, fed from per-call arguments), then
    for sampling rows only: temperature, top-k, top-p; other rows get neutral warper values. Steps whose rows are
    all neutral are left out; ``names`` lists those kept. Rebuild (or :meth:`take`) when the rows change.
    """

    def __init__(self, params: RowParams):
        self.params = params
        pen, ngram, keep = params.repetition_penalty, params.no_repeat_ngram_size, params.min_tokens_to_keep
        temp = np.where(params.do_sample, params.temperature, np.float32(1.0))
        k = np.where(params.do_sample, params.top_k, 0)
        k_groups = _top_k_groups(k, keep, len(params))
        nucleus = np.where(params.do_sample, params.top_p, 1.0)
        candidates = [  # (name, needed by some row, step(input_ids, scores) -> scores)
            ("repetition_penalty", pen != 1, lambda ids, x: repetition_penalty(ids, x, pen)),
            ("no_repeat_ngram", ngram > 0, lambda ids, x: no_repeat_ngram(ids, x, ngram)),
            ("suppress_eos", True, None),  # its rows and ids come with each call
            ("temperature", temp != 1, lambda ids, x: temperature(x, temp)),
            ("top_k", k != 0, lambda ids, x: _top_k_grouped(x, k_groups)),
            ("top_p", nucleus < 1, lambda ids, x: top_p(x, nucleus, keep)),
        ]
        self.steps = [(name, step) for name, needed, step in candidates if np.any(needed)]
        self.names = [name for name, _ in self.steps]
        # Every row samples and top-k (one k for all rows) is the last step: the sampler can draw from top-k's
        # packed candidates instead of a vocabulary-wide row of -inf it would pack again (`filter_for_sampling`).
        self.top_k_last = (
            bool(self.names) and self.names[-1] == "top_k" and bool(params.do_sample.all()) and len(k_groups) == 1 and k_groups[0][0] is None
        )
        self._k = k_groups[0][1] if self.top_k_last else 0
        # Every row alike (one prompt's beams or samples): reordering rows gives back the same chain.
        self.uniform = all(np.all(getattr(params, f.name) == getattr(params, f.name)[:1]) for f in fields(params))

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray, eos_suppress_mask=None, eos_ids=()) -> np.ndarray:
        """Process ``scores`` (R, V) float32 given ``input_ids`` (R, L) int64; may edit ``scores`` in place.

        ``eos_suppress_mask`` (R,) bool marks the rows still below their minimum length (see
        :func:`suppress_tokens` for how to compute it); ``eos_ids`` are the ids it forbids.
        """
        for _, step in self.steps:
            if step is not None:
                scores = step(input_ids, scores)
            elif eos_suppress_mask is not None:
                scores = suppress_tokens(scores, eos_suppress_mask, eos_ids)
        return scores

    def filter_for_sampling(
        self, input_ids: np.ndarray, scores: np.ndarray, eos_suppress_mask=None, eos_ids=()
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """For a chain with :attr:`top_k_last`: run it and return ``(scores, packed)``. ``packed`` is top-k's
        ``(cols, vals, counts)`` (see :func:`top_k_candidates`) when every row's draw would pack its scores anyway
        (fewer than a quarter of them kept, as :func:`onnxgen.sampling.sample` decides); the dense ``scores`` are
        then left before top-k. Otherwise ``packed`` is None and ``scores`` are what ``__call__`` returns."""
        for _, step in self.steps[:-1]:
            if step is not None:
                scores = step(input_ids, scores)
            elif eos_suppress_mask is not None:
                scores = suppress_tokens(scores, eos_suppress_mask, eos_ids)
        found = top_k_candidates(scores, self._k)
        if found is not None and 4 * int(found[2].max()) < scores.shape[1]:
            return scores, found
        return _top_k_grouped(scores, [(None, self._k)]), None

    def take(self, indices) -> LogitsChain:
        """The chain of the rows at `indices`; beam search reorders rows every step, so keep that cheap."""
        if self.uniform and len(indices) == len(self.params):
            return self
        return LogitsChain(self.params.take(indices))
