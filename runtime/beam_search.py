"""Beam search for one prompt, step by step, with transformers' semantics (4.57's vectorised beam search).

Per step it keeps `2 * num_beams` candidates so that `num_beams` of them can always go on, lets only candidates
among the top `num_beams` finish, normalises finished scores by generated length ** length_penalty, and stops
by transformers' three `early_stopping` rules. Arithmetic is float32 as in transformers, so near-ties resolve
the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .sampling import sample_without_replacement

_NEG = np.float32(-1.0e9)  # transformers' "impossible" score, added rather than assigned


_SAMPLE_STRIDE = 8  # every 8th score bounds the k-th largest from below


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first; ties go to the lower index (at the k-th place too)."""
    n = values.shape[0]
    if k >= n:
        everything = np.arange(n)
        return everything[np.lexsort((everything, -values))]
    # The k-th largest of a subset is at most the k-th largest of all, so every score at or above it is a
    # candidate and the top k are among them: with beams x vocab scores, a strided sample bounds it, and a few
    # dozen candidates are sorted instead of the whole array partitioned.
    pool = values[::_SAMPLE_STRIDE] if k * _SAMPLE_STRIDE * 4 <= n else values
    bound = np.partition(pool, pool.shape[0] - k)[pool.shape[0] - k]
    candidates = np.flatnonzero(values >= bound)
    if candidates.shape[0] < k:  # NaN scores compare false: order everything
        candidates = np.arange(n)
    return candidates[np.lexsort((candidates, -values[candidates]))[:k]]


_FLOAT32_SAFE = 3.0e38  # below float32's largest value: converts without overflow


def _length_norm(length: int, length_penalty: float) -> np.float32:
    """length ** length_penalty in float32; an extreme penalty saturates to inf or 0 as torch's pow does."""
    try:
        value = float(length) ** length_penalty  # C's pow, as np.power; a Python scalar is cheaper per step
    except OverflowError:
        value = float("inf")
    if value < _FLOAT32_SAFE:
        return np.float32(value)
    with np.errstate(over="ignore"):
        return np.float32(value)


@dataclass
class BeamHypothesis:
    token_ids: np.ndarray  # (t,) generated ids, EOS included when it finished on EOS
    score: float  # normalised by length ** length_penalty
    finished: bool


class BeamSearch:
    """State of one prompt's beams: running beams and the `num_beams` best finished hypotheses."""

    def __init__(
        self,
        num_beams: int,
        max_new_tokens: int,
        eos_token_ids: tuple[int, ...],
        length_penalty: float,
        early_stopping: bool | str,
        do_sample: bool = False,
        rng: np.random.Generator | None = None,
        ends: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        """`ends`: whether a candidate's generated tokens end it as EOS would (a stop string appeared); like
        transformers' stopping criteria, it is asked of every candidate continuation."""
        self.num_beams = num_beams
        self.ends = ends
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = np.asarray(eos_token_ids, dtype=np.int64)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.do_sample = do_sample
        self.rng = rng
        self.candidates = max(2, 1 + len(eos_token_ids)) * num_beams
        # Only beam 0 is live at first: the others are copies of the same prompt.
        self.running_scores = np.full(num_beams, _NEG, dtype=np.float32)
        self.running_scores[0] = 0.0
        self.running_tokens = np.zeros((num_beams, 0), dtype=np.int64)
        self.finished_tokens: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_beams
        self.finished_scores = np.full(num_beams, _NEG, dtype=np.float32)
        self.finished_flags = np.zeros(num_beams, dtype=bool)
        self.improvement_possible = True
        self.done = False
        self._accumulated: np.ndarray | None = None

    @property
    def generated(self) -> int:
        return self.running_tokens.shape[1]

    def advance(self, log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take processed log-probs (num_beams, V); return (parent beam per new running beam, its new token)."""
        vocab = log_probs.shape[1]
        if self._accumulated is None or self._accumulated.shape != log_probs.shape:
            self._accumulated = np.empty(log_probs.shape, dtype=np.float32)
        # Into one buffer kept across steps: a fresh (beams x vocab) array a step costs its page faults each time.
        accumulated = np.add(log_probs, self.running_scores[:, None], out=self._accumulated, dtype=np.float32)
        accumulated = accumulated.reshape(-1)
        if self.do_sample:
            top = sample_without_replacement(accumulated, self.candidates, self.rng)
        else:
            top = _top_indices(accumulated, self.candidates)
        top_scores = accumulated[top]
        parents, tokens = top // vocab, top % vocab
        candidate_tokens = np.concatenate([self.running_tokens[parents], tokens[:, None]], axis=1)
        length = self.generated + 1
        if length >= self.max_new_tokens:
            hits = np.ones(tokens.shape[0], dtype=bool)
        else:  # np.isin's setup costs more than this compare of a few candidates with a few ids
            hits = (tokens[:, None] == self.eos_token_ids[None, :]).any(axis=1)
            if self.ends is not None:
                hits |= np.fromiter((self.ends(row) for row in candidate_tokens), dtype=bool, count=len(tokens))

        running_scores = top_scores + hits.astype(np.float32) * _NEG
        keep = _top_indices(running_scores, self.num_beams)
        self._update_finished(candidate_tokens, top_scores, hits, length)

        self.running_scores = running_scores[keep]
        self.running_tokens = candidate_tokens[keep]
        self._update_stop_condition(length, hits)
        return parents[keep], tokens[keep]

    def _update_finished(self, candidate_tokens: np.ndarray, top_scores: np.ndarray, hits: np.ndarray, length: int):
        just_finished = hits.copy()
        just_finished[self.num_beams :] = False  # the extra candidates exist only to keep beams running
        denominator = _length_norm(length, self.length_penalty)
        scores = (top_scores / denominator).astype(np.float32)
        if self.finished_flags.all() and self.early_stopping is True:
            scores += _NEG
        if not self.improvement_possible:
            scores += _NEG
        scores += (~just_finished).astype(np.float32) * _NEG
        merged_scores = np.concatenate([self.finished_scores, scores])
        merged_flags = np.concatenate([self.finished_flags, just_finished])
        best = _top_indices(merged_scores, self.num_beams)
        old = len(self.finished_tokens)
        self.finished_tokens = [
            self.finished_tokens[i] if i < old else candidate_tokens[i - old] for i in best
        ]
        self.finished_scores = merged_scores[best]
        self.finished_flags = merged_flags[best]

    def _update_stop_condition(self, length: int, hits: np.ndarray) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = length
        best_running = self.running_scores[0] / _length_norm(best_length, self.length_penalty)
        worst_finished = np.where(self.finished_flags, self.finished_scores.min(), _NEG)
        self.improvement_possible = self.improvement_possible and bool(np.any(best_running > worst_finished))
        open_beam = not (self.finished_flags.all() and self.early_stopping is True)
        valid_continuations = not hits.all()
        self.done = not (self.improvement_possible and open_beam and valid_continuations)

    def best(self, count: int) -> list[BeamHypothesis]:
        return [
            BeamHypothesis(self.finished_tokens[i], float(self.finished_scores[i]), bool(self.finished_flags[i]))
            for i in range(count)
        ]
