"""Logits processors: pure NumPy edits of next-token scores, one row per sequence, parameters per row.

Every function takes ``scores`` (R, V) float32 and returns the new scores (often the same array, edited in place).
Those that look at the history take ``input_ids`` (R, L) int64, where -1 means "no token here": rows of one batch
have histories of different lengths, left-padded with -1, and -1 entries are ignored. A real padding id (GPT-2 pads
with its EOS id) is an ordinary token, as it is in transformers. Each per-row parameter has a neutral value that
leaves its row untouched bit for bit, and a step whose rows are all neutral costs nothing.

The semantics are those of transformers' ``RepetitionPenaltyLogitsProcessor``, ``NoRepeatNGramLogitsProcessor``,
``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper`` and ``TopPLogitsWarper``, applied in that order by :class:`LogitsChain`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_NEG_INF = np.float32(-np.inf)


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
    rows = np.flatnonzero(rows_mask)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if rows.size and ids.size:
        scores[rows[:, None], ids[None, :]] = _NEG_INF
    return scores


def temperature(scores: np.ndarray, temperature) -> np.ndarray:
    """Divide each row by its temperature (R,) float, 1.0 = off; float32 division, bit-equal to transformers."""
    t = _per_row(temperature, scores.shape[0], np.float32)
    rows = np.flatnonzero(t != 1.0)
    if rows.size == scores.shape[0]:
        scores /= t[:, None]
    elif rows.size:
        scores[rows] = scores[rows] / t[rows, None]
    return scores


def top_k(scores: np.ndarray, k, min_tokens_to_keep=1) -> np.ndarray:
    """Keep the k highest scores of each row (and every score tied with the k-th), set the rest to -inf.

    ``k`` (R,) int, 0 = off; the effective k is ``min(max(k, min_tokens_to_keep), V)``. Rows are grouped by their
    effective k so each group costs one ``np.partition``, never a full sort.
    """
    n_rows, vocab = scores.shape
    k = _per_row(k, n_rows, np.int64)
    eff = np.minimum(np.maximum(k, _per_row(min_tokens_to_keep, n_rows, np.int64)), vocab)
    eff = np.where(k == 0, vocab, eff)
    for kk in np.unique(eff[eff < vocab]).tolist():
        rows = np.flatnonzero(eff == kk)
        sub = scores if rows.size == n_rows else scores[rows]
        kth = np.partition(sub, vocab - kk, axis=1)[:, vocab - kk]  # the k-th largest score of each row
        sub[sub < kth[:, None]] = _NEG_INF
        if sub is not scores:
            scores[rows] = sub
    return scores


def top_p(scores: np.ndarray, p, min_tokens_to_keep=1) -> np.ndarray:
    """Nucleus filtering: keep the fewest highest-scoring tokens whose probability mass reaches p.

    ``p`` (R,) float, 1.0 = off. A token is kept when the mass of the tokens ranked above it is < p (transformers
    removes tokens whose ascending cumulative probability is <= 1 - p: the same set, up to floating-point rounding
    at the boundary), and the top ``min_tokens_to_keep`` are always kept. Among tokens tied on the boundary score,
    which ones survive is unspecified (as with transformers' unstable sort).
    """
    n_rows = scores.shape[0]
    p = _per_row(p, n_rows, np.float64)
    keep = _per_row(min_tokens_to_keep, n_rows, np.int64)
    for r in np.flatnonzero(p < 1.0).tolist():  # 1-D selection is several times faster than along axis 1
        _top_p_row(scores[r], float(p[r]), int(keep[r]))
    return scores


def _top_p_row(row: np.ndarray, p: float, keep: int) -> None:
    """Top-p on one row (V,), in place. Only the finite entries count (after top-k they are few), and of those
    only the top m are sorted, m growing until they cover p: never a full sort of the vocabulary."""
    fin = np.flatnonzero(row > -np.inf)
    n = fin.size
    if n <= keep:
        return
    vals = row[fin]
    top = vals.max()
    mass = np.exp(vals - top).sum(dtype=np.float64)  # softmax normaliser, relative to the maximum
    m = min(n, max(64, keep))
    while True:
        cand = np.argpartition(vals, n - m)[n - m :] if m < n else np.arange(n)
        cand = cand[np.argsort(-vals[cand], kind="stable")]  # descending
        prob = np.exp(vals[cand].astype(np.float64) - top) / mass
        cum = np.cumsum(prob)
        if cum[-1] >= p or m == n:  # the candidates cover p: everything outside them is removed
            break
        m = min(4 * m, n)
    above = np.concatenate(([0.0], cum[:-1]))  # mass ranked strictly above each candidate
    n_keep = min(max(int(np.count_nonzero(above < p)), keep), m)
    kept = fin[cand[:n_keep]]
    kept_vals = row[kept]
    row.fill(_NEG_INF)
    row[kept] = kept_vals


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
    def full(
        cls,
        n: int,
        *,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_tokens_to_keep=1,
        do_sample=False,
    ) -> RowParams:
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


_DTYPES = {
    "repetition_penalty": np.float32,
    "no_repeat_ngram_size": np.int64,
    "temperature": np.float32,
    "top_k": np.int64,
    "top_p": np.float64,
    "min_tokens_to_keep": np.int64,
    "do_sample": np.bool_,
}


class LogitsChain:
    """The steps any row of a batch needs, in transformers' order, built once per batch layout.

    Order: repetition penalty, no-repeat n-gram, EOS suppression (min length, from per-call arguments), then for
    sampling rows only: temperature, top-k, top-p. Non-sampling rows get neutral warper values. Steps whose rows
    are all neutral are left out; ``names`` lists those kept. Rebuild (or :meth:`take`) when rows change.
    """

    def __init__(self, params: RowParams):
        self.params = params
        s = params.do_sample
        warp_t = np.where(s, params.temperature, np.float32(1.0))
        warp_k = np.where(s, params.top_k, 0)
        warp_p = np.where(s, params.top_p, 1.0)
        keep = params.min_tokens_to_keep
        self._history_steps = []  # fn(input_ids, scores) -> scores
        self._warp_steps = []  # fn(scores) -> scores
        self.names: list[str] = []
        if np.any(params.repetition_penalty != 1.0):
            self._add_history("repetition_penalty", repetition_penalty, params.repetition_penalty)
        if np.any(params.no_repeat_ngram_size > 0):
            self._add_history("no_repeat_ngram", no_repeat_ngram, params.no_repeat_ngram_size)
        self.names.append("suppress_eos")
        if np.any(warp_t != 1.0):
            self._add_warp("temperature", lambda x: temperature(x, warp_t))
        if np.any(warp_k != 0):
            self._add_warp("top_k", lambda x: top_k(x, warp_k, keep))
        if np.any(warp_p < 1.0):
            self._add_warp("top_p", lambda x: top_p(x, warp_p, keep))

    def _add_history(self, name, fn, arg) -> None:
        self._history_steps.append(lambda ids, x: fn(ids, x, arg))
        self.names.append(name)

    def _add_warp(self, name, fn) -> None:
        self._warp_steps.append(fn)
        self.names.append(name)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray, eos_suppress_mask=None, eos_ids=()) -> np.ndarray:
        """Process ``scores`` (R, V) float32 given ``input_ids`` (R, L) int64; may edit ``scores`` in place.

        ``eos_suppress_mask`` (R,) bool marks the rows still below their minimum length (see
        :func:`suppress_tokens` for how to compute it); ``eos_ids`` are the ids it forbids.
        """
        for step in self._history_steps:
            scores = step(input_ids, scores)
        if eos_suppress_mask is not None:
            scores = suppress_tokens(scores, eos_suppress_mask, eos_ids)
        for step in self._warp_steps:
            scores = step(scores)
        return scores

    def take(self, indices) -> LogitsChain:
        return LogitsChain(self.params.take(indices))
