"""The step-by-step generator: prompts, each with its own plan, advanced one token per step.

It drives any `LanguageModel` (it never sees ONNX) and any mix of strategies: each prompt gets a search
(`SamplingSearch` or `BeamGroupSearch`) that owns a contiguous block of rows. Per step, scores for all rows go
through one `LogitsChain` with per-row parameters, each search picks its rows' tokens and says which rows go on,
and the model gathers its cache to those rows — dropping finished rows, reordering beams — in one `select`.

Prompts can join while others run (`add`): they are prefilled on their own and their rows merged into the running
batch where the model state allows it (`extend`), or else stepped as a separate cohort. Either way a prompt's
output never depends on what shares its batch, but for one thing kept as transformers has it: prompts prefilled
together are left-padded with the model's padding id (GPT-2: EOS), and repetition_penalty and no_repeat_ngram see
that padding; a prompt that joins later is padded with -1, which they skip. (The model may still depend on the
batch: int8 graphs quantize activations with one scale per call.)

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
from .stopping import StopStringWatcher, text_before_stop


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one sequence; beam search reports only at the end (`token_id` is then None)."""

    prompt: int  # the handle `add`/`start` returned for the prompt
    sequence: int  # index of the sequence within that prompt
    token_id: int | None
    logprob: float | None
    finish_reason: str | None  # set on the sequence's last event


@dataclass
class _Entry:
    search: SamplingSearch | BeamGroupSearch
    watcher: StopStringWatcher | None


class _Cohort:
    """Rows that share one model state: prompts prefilled together, plus those merged in later."""

    def __init__(self, prefill, handles: list[int], entries: dict[int, _Entry], plans, row_params):
        counts = np.array([p.rows_per_prompt for p in plans])
        rows = np.repeat(np.arange(len(plans)), counts)  # expand each prompt into its sequences or beams
        self.state = prefill.state
        self.state.reuse_outputs = True  # each step's logits are processed (on a copy) before the next step
        self.state.select(rows)
        self.logits = prefill.logits[rows]
        # log_softmax(logits) when the graph computes it (the static layouts); else computed here where needed
        self.logprobs = None if prefill.logprobs is None else prefill.logprobs[rows]
        self.history = prefill.history[rows]
        self._set_beam_rows(np.repeat([p.is_beam_search for p in plans], counts))
        self.chain = LogitsChain(RowParams.concat(row_params))
        self.rows = dict(zip(handles, counts.tolist()))  # prompt -> its rows in this batch, in row order
        self.entries = entries  # the generator's: a prompt popped from it has its rows dropped at the next step

    def _live(self, handle: int) -> _Entry | None:
        entry = self.entries.get(handle)
        return entry if entry is not None and not entry.search.done else None

    @property
    def done(self) -> bool:
        return all(n == 0 or self._live(h) is None for h, n in self.rows.items())

    def merge(self, other: _Cohort) -> None:
        """Append `other`'s rows to this batch (the model state pads the shorter cache)."""
        self.state.extend(other.state)
        width = max(self.history.shape[1], other.history.shape[1])
        self.history = np.concatenate([_pad_left(self.history, width), _pad_left(other.history, width)])
        self.logits = np.concatenate([self.logits, other.logits])
        both = self.logprobs is not None and other.logprobs is not None
        self.logprobs = np.concatenate([self.logprobs, other.logprobs]) if both else None
        self._set_beam_rows(np.concatenate([self.is_beam_row, other.is_beam_row]))
        self.chain = LogitsChain(RowParams.concat([self.chain.params, other.chain.params]))
        self.rows.update(other.rows)

    def _set_beam_rows(self, is_beam_row: np.ndarray) -> None:
        self.is_beam_row = is_beam_row
        self.all_beams, self.any_beams = bool(is_beam_row.all()), bool(is_beam_row.any())  # asked every step

    def step(self, eos_ids: np.ndarray, events_of) -> list[TokenEvent]:
        # Beam search ranks by log-probabilities, as transformers does; the processors edit a copy, and `advance`
        # reports each token's log-probability under the model's own distribution (the graph's log_softmax where
        # it returns one, else computed from the logits).
        eos_mask = self._eos_mask()
        packed, processed = None, False  # packed: top-k's candidates (cols, vals, counts), drawn from as they are
        if self.all_beams:
            scores = log_softmax(self.logits) if self.logprobs is None else self.logprobs.copy()
        else:
            scores = self.logits.copy()
            if self.any_beams:
                beams = self.is_beam_row
                scores[beams] = log_softmax(scores[beams]) if self.logprobs is None else self.logprobs[beams]
            elif self.chain.top_k_last:
                # Per-step NumPy work costs ~3.5x its warm time right after the weights streamed through the caches
                # (benchmarks/step_overhead.py), so sampling skips the vocabulary-wide -inf row and its re-packing.
                scores, packed = self.chain.filter_for_sampling(self.history, scores, eos_mask, eos_ids)
                processed = True
        if not processed:
            scores = self.chain(self.history, scores, eos_mask, eos_ids)
        events, keep, tokens, offset = [], [], [], 0
        every_row_kept = True  # in order: the model state needs no select
        whole_batch = len(self.rows) == 1  # one prompt's rows are the batch: no slicing of `packed`
        for handle, n in list(self.rows.items()):
            entry = self._live(handle)
            if n and entry is not None:
                rows = slice(offset, offset + n)
                logprobs = None if self.logprobs is None else self.logprobs[rows]
                if packed is not None:
                    cols, vals, counts = packed
                    if whole_batch:
                        candidates = (cols, vals)
                    else:
                        width = max(int(counts[rows].max()), 1)  # what packing these rows alone gives
                        candidates = (cols[rows, :width], vals[rows, :width])
                    entry.search.advance(None, self.logits[rows], logprobs, candidates)
                else:
                    entry.search.advance(scores[rows], self.logits[rows], logprobs)
                events.extend(events_of(handle, entry))
                parents, next_tokens = entry.search.next_rows()
                every_row_kept = every_row_kept and entry.search.kept_every_row
                keep.append(parents + offset)
                tokens.append(next_tokens)
                self.rows[handle] = len(parents)
            else:
                self.rows[handle] = 0
                every_row_kept = every_row_kept and n == 0
            offset += n
        self.rows = {h: n for h, n in self.rows.items() if n}
        if keep:
            self._advance_batch(np.concatenate(keep), np.concatenate(tokens), every_row_kept)
        return events

    def _eos_mask(self) -> np.ndarray | None:
        """Which rows may not end yet (below their minimum length); None when no row is."""
        flags = [entry is not None and entry.search.suppresses_eos()
                 for entry in map(self._live, self.rows)]  # fmt: skip
        if not any(flags):
            return None
        if all(flags):
            return np.ones(sum(self.rows.values()), dtype=bool)
        return np.repeat(flags, list(self.rows.values()))

    def _advance_batch(self, keep: np.ndarray, tokens: np.ndarray, every_row_kept: bool = False) -> None:
        if keep.size == 0:
            return  # every row finished: no model call
        if not every_row_kept and (keep.size != self.state.num_rows or np.any(keep != np.arange(keep.size))):
            self.state.select(keep)
            self.history = self.history[keep]
            self._set_beam_rows(self.is_beam_row[keep])
            self.chain = self.chain.take(keep)
        self.history = np.concatenate([self.history, tokens[:, None]], axis=1)
        self.logits = self.state.step(tokens)
        self.logprobs = getattr(self.state, "logprobs", None)


class Generator:
    def __init__(self, model: LanguageModel, detokenize: Callable[[list[int]], str] | None = None):
        self.model = model
        self.detokenize = detokenize
        self.eos_ids = np.asarray(tuple(model.eos_token_ids), dtype=np.int64)
        self.entries: dict[int, _Entry] = {}
        self.cohorts: list[_Cohort] = []
        self._next_handle = 0

    def start(self, prompts: list[list[int]], plans: list[DecodingPlan]) -> list[int]:
        """Forget everything and begin these prompts."""
        self.entries, self.cohorts = {}, []
        return self.add(prompts, plans)

    def add(self, prompts: list[list[int]], plans: list[DecodingPlan]) -> list[int]:
        """Begin prompts now; they take their first step with the next `step()`. Returns their handles."""
        if len(prompts) != len(plans):
            raise ValueError(f"add needs one plan per prompt: {len(prompts)} prompts, {len(plans)} plans")
        if not prompts:
            raise ValueError("add needs at least one prompt")
        eos = tuple(int(t) for t in self.eos_ids)
        # Everything that can fail runs before the generator records anything: a failed add leaves it unchanged.
        row_params = [_row_params(p, p.rows_per_prompt, len(eos)) for p in plans]
        bounds = [p.max_new_tokens for p in plans]  # None where max_length decides, per prompt length
        prefill = self.model.prefill(prompts, max_new_tokens=None if None in bounds else max(bounds))
        handles = list(range(self._next_handle, self._next_handle + len(prompts)))
        entries = {}
        for handle, plan, prompt_length in zip(handles, plans, prefill.prompt_lengths):
            min_new, max_new = plan.new_token_bounds(int(prompt_length))
            if plan.is_beam_search:  # candidates change lineage every step: each is decoded whole
                search = BeamGroupSearch(plan, min_new, max_new, eos, _stop_text(plan.stop, self.detokenize))
                watcher = None
            else:
                search = SamplingSearch(plan, min_new, max_new, eos)
                watcher = StopStringWatcher(plan.stop, self.detokenize) if plan.stop else None
            entries[handle] = _Entry(search, watcher)
        cohort = _Cohort(prefill, handles, self.entries, plans, row_params)
        self.cohorts = [c for c in self.cohorts if not c.done]
        if self.cohorts and hasattr(self.cohorts[0].state, "extend"):
            self.cohorts[0].merge(cohort)
        else:
            self.cohorts.append(cohort)
        self._next_handle += len(prompts)
        self.entries.update(entries)
        return handles

    def is_done(self) -> bool:
        return all(entry.search.done for entry in self.entries.values())

    def is_finished(self, handle: int) -> bool:
        return self.entries[handle].search.done

    def cancel(self, handle: int) -> None:
        """Stop a prompt's sequences; its rows leave the batch at the next step."""
        self.entries[handle].search.cancel()

    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for cohort in self.cohorts:
            if not cohort.done:
                events.extend(cohort.step(self.eos_ids, self._events))
        self.cohorts = [c for c in self.cohorts if not c.done]
        return events

    def results(self) -> list[list[SequenceOutput]]:
        """Per prompt, in handle order, its output sequences (cancelled ones included)."""
        return [entry.search.results() for entry in self.entries.values()]

    def pop(self, handle: int) -> list[SequenceOutput]:
        """A finished prompt's output sequences; the generator forgets the prompt."""
        entry = self.entries[handle]
        if not entry.search.done:
            raise ValueError(f"prompt {handle} is still generating; cancel it first or wait for is_finished()")
        del self.entries[handle]
        return entry.search.results()

    def top_logprobs(self, wanted: dict[int, int]) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """(handle, sequence) -> (ids, logprobs) of the k most likely next tokens under the model's own
        distribution, for sampling/greedy prompts in `wanted` (handle -> k): what the next `step` chooses from
        (OpenAI's `top_logprobs`). Beam search has no per-sequence next token and is left out."""
        found: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for cohort in self.cohorts:
            offset = 0
            for handle, rows in cohort.rows.items():
                entry, k = cohort._live(handle), wanted.get(handle)
                if k and rows and entry is not None and isinstance(entry.search, SamplingSearch):
                    block = slice(offset, offset + rows)
                    logprobs = log_softmax(cohort.logits[block]) if cohort.logprobs is None else cohort.logprobs[block]
                    k = min(k, logprobs.shape[1])
                    top = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
                    for row, seq in enumerate(entry.search.live):
                        ids = top[row][np.argsort(-logprobs[row, top[row]], kind="stable")]
                        found[(handle, seq)] = (ids, logprobs[row, ids])
                offset += rows
        return found

    def _events(self, handle: int, entry: _Entry) -> list[TokenEvent]:
        search = entry.search
        if isinstance(search, BeamGroupSearch):
            if not search.done:
                return []
            return [TokenEvent(handle, i, None, None, out.finish_reason) for i, out in enumerate(search.results())]
        events = []
        for seq in search.stepped:
            output = search.outputs[seq]
            if entry.watcher is not None and (output is None or output.finish_reason == "length"):
                cut = entry.watcher.check(seq, search.tokens[seq])
                if cut is not None:
                    if output is None:
                        search.finish_sequence(seq, "stop", text=cut)
                    else:
                        output.finish_reason, output.text = "stop", cut
                    output = search.outputs[seq]
            reason = output.finish_reason if output is not None else None
            events.append(TokenEvent(handle, seq, search.tokens[seq][-1], search.logprobs[seq][-1], reason))
        return events


def _stop_text(stops: tuple[str, ...], detokenize) -> Callable[[list[int]], str | None] | None:
    if not stops:
        return None
    if detokenize is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    return lambda ids: text_before_stop(detokenize(ids), stops)


def _pad_left(history: np.ndarray, width: int) -> np.ndarray:
    """Rows of different lengths share one matrix; -1 marks "no token" and the processors skip it."""
    missing = width - history.shape[1]
    if missing == 0:
        return history
    return np.concatenate([np.full((history.shape[0], missing), -1, dtype=history.dtype), history], axis=1)


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
