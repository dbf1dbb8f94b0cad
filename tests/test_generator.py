"""The generator and the searches, driven by a scripted NumPy model: no ONNX, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgen.config import GenerationConfig, ModelDefaults, resolve
from onnxgen.generator import Generator
from onnxgen.model.base import Prefill

VOCAB = 12
EOS = 0


class TableModel:
    """Next-token logits are a fixed random function of the last two tokens, so a row's output depends only on
    its own history — whatever else is in the batch."""

    vocab_size = VOCAB
    eos_token_ids = (EOS,)

    def __init__(self, seed: int = 0, eos_bias: float = 0.0):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(VOCAB, VOCAB, VOCAB)).astype(np.float32) * 2
        self.table[..., EOS] += eos_bias
        self.steps = 0
        self.rows_stepped: list[int] = []

    def logits_for(self, history: list[list[int]]) -> np.ndarray:
        return np.stack([self.table[h[-2] if len(h) > 1 else 1, h[-1]] for h in history])

    def prefill(self, prompts, max_new_tokens=None):
        state = TableState(self, [list(p) for p in prompts])
        width = max(len(p) for p in prompts)
        history = np.array([[EOS] * (width - len(p)) + list(p) for p in prompts], dtype=np.int64)
        lengths = np.array([len(p) for p in prompts])
        return Prefill(state, self.logits_for(state.rows), history, lengths)


class TableState:
    def __init__(self, model: TableModel, rows: list[list[int]]):
        self.model, self.rows = model, rows

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def step(self, token_ids):
        self.model.steps += 1
        self.model.rows_stepped.append(len(token_ids))
        for row, token in zip(self.rows, token_ids):
            row.append(int(token))
        return self.model.logits_for(self.rows)

    def select(self, rows):
        self.rows = [list(self.rows[r]) for r in rows]

    def extend(self, other: TableState):
        self.rows += other.rows


DEFAULTS = ModelDefaults(samples_by_default=False)


def plan(**params):
    return resolve(GenerationConfig(**params), DEFAULTS)


def run(model, prompts, plans, detokenize=None):
    generator = Generator(model, detokenize)
    generator.start(prompts, plans)
    events = []
    while not generator.is_done():
        events += generator.step()
    return generator.results(), events


def reference_greedy(model: TableModel, prompt: list[int], max_new: int) -> list[int]:
    row = list(prompt)
    out = []
    for _ in range(max_new):
        token = int(np.argmax(model.logits_for([row])[0]))
        out.append(token)
        row.append(token)
        if token == EOS:
            break
    return out


def test_greedy_equals_a_plain_argmax_loop():
    model = TableModel(eos_bias=-1.0)
    prompts = [[3, 4], [5], [7, 8, 9]]
    results, _ = run(model, prompts, [plan(max_new_tokens=9)] * 3)
    for prompt, (output,) in zip(prompts, results):
        assert output.token_ids == reference_greedy(model, prompt, 9)
        assert output.finish_reason == ("eos" if output.token_ids[-1] == EOS else "length")


def test_finished_rows_leave_the_batch():
    model = TableModel(seed=3, eos_bias=2.5)
    results, _ = run(model, [[3], [4], [5], [6]], [plan(max_new_tokens=10)] * 4)
    lengths = sorted(len(r[0].token_ids) for r in results)
    assert lengths[0] < lengths[-1], "the scripted model should end some rows early"
    assert model.rows_stepped == sorted(model.rows_stepped, reverse=True)
    assert model.rows_stepped[-1] < 4


def test_min_new_tokens_suppresses_eos():
    model = TableModel(eos_bias=50.0)  # EOS always wins unless suppressed
    results, _ = run(model, [[3]], [plan(max_new_tokens=10, min_new_tokens=4)])
    tokens = results[0][0].token_ids
    assert len(tokens) == 5 and EOS not in tokens[:4] and tokens[4] == EOS


def test_seeded_sampling_is_independent_of_the_batch():
    model = TableModel()
    sampling = plan(do_sample=True, top_k=0, max_new_tokens=8, seed=11, num_return_sequences=2)
    alone, _ = run(model, [[3, 4]], [sampling])
    mixed, _ = run(model, [[9], [3, 4], [5]], [plan(max_new_tokens=3), sampling, plan(num_beams=2, max_new_tokens=4)])
    assert [o.token_ids for o in alone[0]] == [o.token_ids for o in mixed[1]]
    assert alone[0][0].token_ids != alone[0][1].token_ids  # each sequence has its own generator


def test_a_prompt_that_joins_mid_run_gets_the_same_tokens():
    model = TableModel(eos_bias=-2.0)
    generator = Generator(model)
    first = generator.add([[3, 4]], [plan(max_new_tokens=10)])
    generator.step()
    generator.step()
    second = generator.add([[5, 6, 7]], [plan(num_beams=3, max_new_tokens=6)])
    while not generator.is_done():
        generator.step()
    joined = generator.pop(second[0])
    alone, _ = run(TableModel(eos_bias=-2.0), [[5, 6, 7]], [plan(num_beams=3, max_new_tokens=6)])
    assert [o.token_ids for o in joined] == [o.token_ids for o in alone[0]]
    assert generator.pop(first[0])[0].token_ids == reference_greedy(model, [3, 4], 10)


def test_cancel_stops_one_prompt_and_not_the_others():
    model = TableModel(eos_bias=-5.0)
    generator = Generator(model)
    a, b = generator.start([[3], [4]], [plan(max_new_tokens=10)] * 2)
    generator.step()
    generator.cancel(a)
    while not generator.is_done():
        generator.step()
    assert generator.pop(a)[0].finish_reason == "cancelled"
    assert len(generator.pop(b)[0].token_ids) == 10
    with pytest.raises(KeyError):
        generator.pop(a)


def test_pop_refuses_a_running_prompt():
    generator = Generator(TableModel(eos_bias=-5.0))
    (handle,) = generator.start([[3]], [plan(max_new_tokens=5)])
    with pytest.raises(ValueError, match="still generating"):
        generator.pop(handle)


def test_stop_strings_end_the_sequence_and_cut_the_text():
    model = TableModel(eos_bias=-5.0)
    letters = "abcdefghijkl"
    detokenize = lambda ids: "".join(letters[i] for i in ids)  # noqa: E731
    expected = detokenize(reference_greedy(model, [3], 12))
    stop = expected[4:6]
    results, events = run(model, [[3]], [plan(max_new_tokens=12, stop=stop)], detokenize)
    (output,) = results[0]
    assert output.finish_reason == "stop"
    assert output.text == expected[: expected.find(stop)]
    assert events[-1].finish_reason == "stop" and len(events) == len(output.token_ids)


def test_beam_events_come_once_at_the_end():
    model = TableModel(eos_bias=-1.0)
    results, events = run(model, [[3]], [plan(num_beams=3, num_return_sequences=2, max_new_tokens=5)])
    assert [e.token_id for e in events] == [None, None]
    assert len(results[0]) == 2 and results[0][0].score >= results[0][1].score


def test_beam_search_finds_a_better_sequence_than_greedy():
    """On a table model beam search must never score below greedy's sequence (same length, no EOS)."""
    model = TableModel(seed=5, eos_bias=-50.0)

    def logprob(seq: list[int]) -> float:
        row, total = [3], 0.0
        for token in seq:
            logits = model.logits_for([row])[0].astype(np.float64)
            total += logits[token] - np.log(np.exp(logits).sum())
            row.append(token)
        return total

    greedy = run(model, [[3]], [plan(max_new_tokens=6)])[0][0][0].token_ids
    beam = run(model, [[3]], [plan(num_beams=4, max_new_tokens=6)])[0][0][0].token_ids
    assert logprob(beam) >= logprob(greedy) - 1e-6


def test_popping_a_cancelled_prompt_before_the_next_step_is_safe():
    generator = Generator(TableModel(eos_bias=-5.0))
    a, b = generator.start([[3], [4]], [plan(max_new_tokens=6)] * 2)
    generator.step()
    generator.cancel(a)
    assert generator.pop(a)[0].finish_reason == "cancelled"
    while not generator.is_done():
        generator.step()
    assert len(generator.pop(b)[0].token_ids) == 6


def test_a_failed_add_leaves_the_generator_unchanged():
    class Failing(TableModel):
        def prefill(self, prompts, max_new_tokens=None):
            raise RuntimeError("the model refused")

    generator = Generator(Failing())
    with pytest.raises(RuntimeError):
        generator.add([[3]], [plan(max_new_tokens=4)])
    assert generator.is_done() and generator.entries == {}


def test_a_model_exported_for_beam_search_runs_beam_search_unless_it_says_it_samples():
    def resolved(samples_by_default, **model_defaults):
        defaults = ModelDefaults(samples_by_default, generation_defaults=tuple(model_defaults.items()))
        found = resolve(GenerationConfig(), defaults)
        return found.num_beams, found.do_sample

    # transformers' generation_config.json leaves do_sample=False out: num_beams alone means beam search
    assert resolved(True, num_beams=4) == resolved(False, num_beams=4) == (4, False)
    assert resolved(True, num_beams=4, do_sample=True) == (4, True)
    assert resolved(True) == (1, True) and resolved(False) == (1, False)  # the architecture's own default


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(temperature=1e-300), "temperature must be 0"),
        (dict(repetition_penalty=1e-300), "repetition_penalty must be"),
        (dict(top_k=10**400), r"top_k must be an integer in \[0, 2147483647\]"),
        (dict(length_penalty=10**400), "length_penalty must be a finite number"),
    ],
)
def test_extreme_values_are_refused_at_the_boundary(params, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**params)


def test_an_extreme_length_penalty_does_not_break_beam_search():
    results, _ = run(TableModel(eos_bias=1.0), [[3]], [plan(num_beams=2, max_new_tokens=5, length_penalty=1e308)])
    assert len(results[0]) == 1


@pytest.mark.parametrize("k", [1, 2, 8, 40])
def test_beam_top_indices_are_the_k_largest_best_first_lower_index_on_ties(k):
    from onnxgen.beam_search import _top_indices

    rng = np.random.default_rng(k)
    for trial in range(200):
        size = int(rng.choice([7, 300, 4 * 50257]))
        values = rng.normal(size=size).astype(np.float32)
        if trial % 3 == 0:
            values = np.round(values, 1)  # many ties, also at the k-th place
        if trial % 5 == 0:
            values[rng.random(size) < 0.9] = -np.inf  # mostly masked rows
        expected = np.lexsort((np.arange(size), -values))[: min(k, size)]
        np.testing.assert_array_equal(_top_indices(values, k), expected)


def test_sampling_from_top_k_candidates_gives_the_dense_path_tokens(monkeypatch):
    """Sampling rows whose chain ends in top-k draw from its packed candidates; forcing the dense path (filtered
    -inf rows, then `sample`) must give the same tokens for the same seeds, in a batch shared with greedy rows."""
    from onnxgen.processors import LogitsChain

    class WideModel(TableModel):
        """Next-token logits over 4096 tokens, a fixed random function of the last token: wide enough for top-k's
        candidates to be packed."""

        vocab_size = 4096

        def logits_for(self, history):
            return np.stack([np.random.default_rng(h[-1]).standard_normal(4096).astype(np.float32) * 3 for h in history])

    prompts = [[3, 4], [7], [2, 9, 5]]
    plans = [plan(do_sample=True, top_k=20, max_new_tokens=9, seed=4, num_return_sequences=3),
             plan(do_sample=True, top_k=20, temperature=0.7, max_new_tokens=6, seed=8),
             plan(do_sample=True, top_k=20, max_new_tokens=7, seed=1, min_new_tokens=5)]
    calls = []
    original = LogitsChain.filter_for_sampling

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(LogitsChain, "filter_for_sampling", counted)
    packed, _ = run(WideModel(), prompts, plans)
    assert calls  # the packed path ran
    assert len({t for outs in packed for o in outs for t in o.token_ids}) > 10  # real draws, not a few argmaxes
    monkeypatch.setattr(LogitsChain, "filter_for_sampling", lambda self, ids, scores, *rest: (self(ids, scores, *rest), None))
    dense, _ = run(WideModel(), prompts, plans)
    assert [[o.token_ids for o in outs] for outs in packed] == [[o.token_ids for o in outs] for outs in dense]
    assert [[o.logprobs for o in outs] for outs in packed] == [[o.logprobs for o in outs] for outs in dense]
