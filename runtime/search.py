"""Search strategies for one prompt. A strategy owns its rows' choices; the generator owns the model and batch.

`SamplingSearch` runs `n` independent sequences (greedy is sampling with the argmax as selector);
`BeamGroupSearch` wraps `BeamSearch`. Both answer the same few questions, so the generator never branches on
the strategy inside its loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .beam_search import BeamSearch
from .config import DecodingPlan
from .sampling import greedy, make_row_rng, sample, sample_packed, token_logprobs


@dataclass
class SequenceOutput:
    """One finished (or cancelled) output sequence."""

    token_ids: list[int]
    finish_reason: str  # "length", "eos", "stop" or "cancelled"
    logprobs: list[float] = field(default_factory=list)  # per generated token, log-softmax of the raw logits
    score: float | None = None  # beam search: the normalised hypothesis score
    text: str | None = None  # set when a stop string cut the text


class SamplingSearch:
    """`num_sequences` independent rows: greedy (argmax) or sampling, each row with its own random generator."""

    def __init__(self, plan: DecodingPlan, min_new: int, max_new: int, eos_token_ids: tuple[int, ...]):
        n = plan.num_return_sequences
        self.do_sample = plan.do_sample
        self.rngs = [make_row_rng(plan.seed, i) for i in range(n)] if plan.do_sample else []
        self.min_new, self.max_new = min_new, max_new
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.live = list(range(n))  # sequence index of each live row, in row order
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.outputs: list[SequenceOutput | None] = [None] * n
        self.stepped: list[int] = []

    @property
    def num_rows(self) -> int:
        return len(self.live)

    @property
    def done(self) -> bool:
        return not self.live

    def suppresses_eos(self) -> bool:
        """Are the rows still short of their minimum length (EOS forbidden)? Live rows have stepped alike."""
        return bool(self.live) and len(self.tokens[self.live[0]]) < self.min_new

    @property
    def kept_every_row(self) -> bool:
        """Did the last step's rows all go on, in their order (`next_rows` is then the identity)?"""
        return len(self.live) == len(self.stepped)

    def advance(
        self, scores: np.ndarray | None, logits: np.ndarray, logprobs: np.ndarray | None = None, candidates=None
    ) -> None:
        """Pick one token per live row from processed `scores` (R, V), or, for sampling, from `candidates`: the
        same scores packed as (cols, vals) (`LogitsChain.filter_for_sampling`); finish rows on EOS or length.
        Log-probs are reported under the model's own distribution (`logits`, or their log_softmax `logprobs`
        where the model computed it), before any processor."""
        if candidates is not None:
            tokens = sample_packed(*candidates, [self.rngs[s] for s in self.live])
        elif self.do_sample:
            tokens = sample(scores, [self.rngs[s] for s in self.live])
        else:
            tokens = greedy(scores)
        if logprobs is None:
            logprobs = token_logprobs(logits, tokens)
        else:
            logprobs = logprobs[np.arange(tokens.shape[0]), tokens]
        self.stepped = list(self.live)  # the sequence behind each row of this step
        for seq, token, logprob in zip(self.stepped, tokens.tolist(), logprobs.tolist()):
            self.tokens[seq].append(token)
            self.logprobs[seq].append(logprob)
            if token in self.eos:
                self.finish_sequence(seq, "eos")
            elif len(self.tokens[seq]) >= self.max_new:
                self.finish_sequence(seq, "length")

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Which rows of this step go on (positions in the step's rows), and the token each feeds next."""
        if self.kept_every_row:
            rows = np.arange(len(self.live))
        else:
            rows = np.array([self.stepped.index(seq) for seq in self.live], dtype=np.int64)
        tokens = np.array([self.tokens[seq][-1] for seq in self.live], dtype=np.int64)
        return rows, tokens

    def finish_sequence(self, seq: int, reason: str, text: str | None = None) -> None:
        if seq in self.live:
            self.live.remove(seq)
            self._finish(seq, reason, text)

    def _finish(self, seq: int, reason: str, text: str | None = None) -> None:
        self.outputs[seq] = SequenceOutput(self.tokens[seq], reason, self.logprobs[seq], text=text)

    def cancel(self) -> None:
        for seq in list(self.live):
            self.finish_sequence(seq, "cancelled")

    def results(self) -> list[SequenceOutput]:
        return [out for out in self.outputs if out is not None]


class BeamGroupSearch:
    """One prompt's beam search (or beam sampling); its rows are the running beams.

    With stop strings (`stop_text`: generated ids -> the text before the first stop string, or None), a candidate
    whose text holds one ends as if it had produced EOS, and its output is that text with finish reason "stop".
    """

    def __init__(self, plan: DecodingPlan, min_new: int, max_new: int, eos_token_ids: tuple[int, ...],
                 stop_text: Callable[[list[int]], str | None] | None = None):
        self.min_new = min_new
        self.num_return_sequences = plan.num_return_sequences
        self.eos = tuple(eos_token_ids)
        self.stop_text = stop_text
        self.beams = BeamSearch(
            num_beams=plan.num_beams,
            max_new_tokens=max_new,
            eos_token_ids=eos_token_ids,
            length_penalty=plan.length_penalty,
            early_stopping=plan.early_stopping,
            do_sample=plan.do_sample,
            rng=make_row_rng(plan.seed, 0) if plan.do_sample else None,
            ends=None if stop_text is None else lambda ids: stop_text(ids.tolist()) is not None,
        )
        self.cancelled = False

    @property
    def num_rows(self) -> int:
        return 0 if self.done else self.beams.num_beams

    @property
    def done(self) -> bool:
        return self.beams.done or self.cancelled

    def suppresses_eos(self) -> bool:
        return self.beams.generated < self.min_new

    kept_every_row = False  # beams are reordered at every step

    def advance(self, scores: np.ndarray, logits: np.ndarray, logprobs: np.ndarray | None = None,
                candidates=None) -> None:
        self._parents, self._tokens = self.beams.advance(scores)

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self.done:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self._parents.astype(np.int64), self._tokens.astype(np.int64)

    def cancel(self) -> None:
        self.cancelled = True

    def results(self) -> list[SequenceOutput]:
        outputs = []
        for hyp in self.beams.best(self.num_return_sequences):
            tokens = [int(t) for t in hyp.token_ids]
            text = None if self.stop_text is None else self.stop_text(tokens)
            if self.cancelled and not hyp.finished:
                reason = "cancelled"
            elif tokens and tokens[-1] in self.eos:
                reason = "eos"
            else:
                reason = "stop" if text is not None else "length"
            outputs.append(SequenceOutput(tokens, reason, score=hyp.score, text=text if reason == "stop" else None))
        return outputs
