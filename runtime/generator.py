"""The step-by-step generator: a batch of prompts, each with its own plan, advanced one token per step.

It drives any `LanguageModel` (it never sees ONNX) and any mix of strategies: each prompt gets a search
(`SamplingSearch` or `BeamGroupSearch`) that owns a contiguous block of rows. Per step: scores for all rows go
through one `LogitsChain` with per-row parameters, each search picks its rows' tokens and says which rows go on,
and the model gathers its cache to those rows — dropping finished rows, reordering beams — in one `select`.

    generator.start(prompts, plans)
    while not generator.is_done():
        for event in generator.step(): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import DecodingPlan
from .model.base import LanguageModel
from .processors import LogitsChain, RowParams, log_softmax
from .search import BeamGroupSearch, SamplingSearch, SequenceOutput
from .stopping import StopStringWatcher


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one sequence; beam search reports only at the end (`token_id` is then None)."""

    prompt: int  # index of the prompt in `start`
    sequence: int  # index of the sequence within that prompt
    token_id: int | None
    logprob: float | None
    finish_reason: str | None  # set on the sequence's last event


class Generator:
    def __init__(self, model: LanguageModel, detokenize: Callable[[list[int]], str] | None = None):
        self.model = model
        self.detokenize = detokenize
        self.searches: list[SamplingSearch | BeamGroupSearch] = []

    def start(self, prompts: list[list[int]], plans: list[DecodingPlan]) -> None:
        if len(prompts) != len(plans):
            raise ValueError(f"start needs one plan per prompt: {len(prompts)} prompts, {len(plans)} plans")
        if not prompts:
            raise ValueError("start needs at least one prompt")
        prefill = self.model.prefill(prompts)
        eos = tuple(self.model.eos_token_ids)
        self.eos_ids = np.asarray(eos, dtype=np.int64)
        self.searches, self.watchers, row_params = [], [], []
        for plan, prompt_length in zip(plans, prefill.prompt_lengths):
            min_new, max_new = plan.new_token_bounds(int(prompt_length))
            cls = BeamGroupSearch if plan.is_beam_search else SamplingSearch
            self.searches.append(cls(plan, min_new, max_new, eos))
            self.watchers.append(StopStringWatcher(plan.stop, self.detokenize) if plan.stop else None)
            row_params.append(_row_params(plan, plan.rows_per_prompt, len(eos)))
        counts = np.array([p.rows_per_prompt for p in plans])
        rows = np.repeat(np.arange(len(prompts)), counts)  # expand each prompt into its sequences or beams
        self.state = prefill.state
        self.state.select(rows)
        self.logits = prefill.logits[rows]
        self.history = prefill.history[rows]
        self.rows_in_batch = counts.tolist()  # rows of each prompt in the current batch, in prompt order
        self.is_beam_row = np.repeat([p.is_beam_search for p in plans], counts)
        self.chain = LogitsChain(RowParams.concat(row_params))

    def is_done(self) -> bool:
        return all(search.done for search in self.searches)

    def cancel(self, prompt: int) -> None:
        """Stop prompt `prompt`'s sequences; its rows leave the batch at the next step."""
        self.searches[prompt].cancel()

    def step(self) -> list[TokenEvent]:
        if self.is_done():
            return []
        scores = self.logits.copy()
        if self.is_beam_row.any():  # beam search ranks by log-probabilities, as transformers does
            scores[self.is_beam_row] = log_softmax(scores[self.is_beam_row])
        eos_mask = np.concatenate(
            [self._suppress_eos(search, n) for search, n in zip(self.searches, self.rows_in_batch)]
        )
        scores = self.chain(self.history, scores, eos_mask, self.eos_ids)
        events, keep, tokens, offset = [], [], [], 0
        for index, (search, n) in enumerate(zip(self.searches, self.rows_in_batch)):
            if n and not search.done:
                rows = slice(offset, offset + n)
                search.advance(scores[rows], self.logits[rows])
                events.extend(self._events(index, search))
                parents, next_tokens = search.next_rows()
                keep.append(parents + offset)
                tokens.append(next_tokens)
                self.rows_in_batch[index] = len(parents)
            else:
                self.rows_in_batch[index] = 0
            offset += n
        self._advance_batch(np.concatenate(keep), np.concatenate(tokens))
        return events

    def _suppress_eos(self, search, rows: int) -> np.ndarray:
        if rows == 0:
            return np.zeros(0, dtype=bool)
        if search.done:
            return np.zeros(rows, dtype=bool)
        return search.suppress_eos()

    def _events(self, index: int, search) -> list[TokenEvent]:
        if isinstance(search, BeamGroupSearch):
            if not search.done:
                return []
            return [TokenEvent(index, i, None, None, out.finish_reason) for i, out in enumerate(search.results())]
        watcher = self.watchers[index]
        events = []
        for seq in search.stepped:
            output = search.outputs[seq]
            if watcher is not None and (output is None or output.finish_reason == "length"):
                cut = watcher.check(seq, search.tokens[seq])
                if cut is not None:
                    if output is None:
                        search.finish_sequence(seq, "stop", text=cut)
                    else:
                        output.finish_reason, output.text = "stop", cut
                    output = search.outputs[seq]
            reason = output.finish_reason if output is not None else None
            events.append(TokenEvent(index, seq, search.tokens[seq][-1], search.logprobs[seq][-1], reason))
        return events

    def _advance_batch(self, keep: np.ndarray, tokens: np.ndarray) -> None:
        if keep.size == 0:
            return  # everything finished: no model call
        if keep.size != self.state.num_rows or np.any(keep != np.arange(keep.size)):
            self.state.select(keep)
            self.history = self.history[keep]
            self.is_beam_row = self.is_beam_row[keep]
            self.chain = self.chain.take(keep)
        self.history = np.concatenate([self.history, tokens[:, None]], axis=1)
        self.logits = self.state.step(tokens)

    def results(self) -> list[list[SequenceOutput]]:
        """Per prompt, its output sequences (after `is_done()`; cancelled ones included)."""
        return [search.results() for search in self.searches]


def _row_params(plan: DecodingPlan, rows: int, num_eos: int) -> RowParams:
    # Beam sampling keeps at least one non-EOS candidate per beam alive through top-k/top-p, as transformers does.
    keep = max(num_eos, 1) + 1 if plan.is_beam_search and plan.do_sample else 1
    return RowParams.full(
        rows,
        repetition_penalty=plan.repetition_penalty,
        no_repeat_ngram_size=plan.no_repeat_ngram_size,
        temperature=plan.temperature,
        top_k=plan.top_k,
        top_p=plan.top_p,
        min_tokens_to_keep=keep,
        do_sample=plan.do_sample,
    )
