"""onnxgen.processors against transformers' logits processors, row by row, with per-row parameters."""

import numpy as np
import pytest

from onnxgen import processors as P

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

V = 1000


def scores_for(rows, seed=0, vocab=V, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def padded_histories(rows, length, seed=0, high=V):
    """(rows, length) ids with a different number of -1 on the left of each row (row 0 has none)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, high, size=(rows, length), dtype=np.int64)
    for r in range(rows):
        ids[r, : (r * 3) % length] = -1
    return ids


def hf_row(procs, ids_row, scores_row):
    """transformers' processors on one row alone, with its -1 entries dropped."""
    ids = torch.tensor(ids_row[ids_row >= 0][None], dtype=torch.long)
    out = torch.tensor(scores_row[None])
    for proc in procs:
        out = proc(ids, out)
    return out[0].numpy()


def above_mass(scores_row):
    """For each token, the softmax mass of the tokens scoring strictly higher (float64)."""
    x = scores_row.astype(np.float64)
    prob = np.exp(x - x.max())
    prob /= prob.sum()
    order = np.argsort(-x, kind="stable")
    above = np.empty_like(prob)
    above[order] = np.cumsum(prob[order]) - prob[order]
    return above


def assert_same_filter(ours, theirs, before, p=None, tol=1e-5):
    """Equal, except that top-p may keep a different token when its boundary mass is within `tol` of p."""
    both = np.isfinite(ours) & np.isfinite(theirs)
    np.testing.assert_array_equal(ours[both], theirs[both])
    differ = np.flatnonzero(np.isfinite(ours) != np.isfinite(theirs))
    if differ.size:
        assert p is not None, f"kept sets differ at {differ[:10]}"
        gap = np.abs(above_mass(before)[differ] - p)
        assert gap.max() < tol, f"tokens {differ} differ {gap.max():.2e} away from the top-p boundary"


def test_repetition_penalty_matches_hf_per_row():
    ids = padded_histories(6, 40, high=200)  # ids < 200: plenty of repeats
    ids[2, -5:] = [7, 7, 7, 8, 8]
    scores = scores_for(6)
    penalty = np.array([1.0, 1.2, 0.8, 2.0, 1.0, 1.5], dtype=np.float32)
    ours = P.repetition_penalty(ids, scores.copy(), penalty)
    for r in range(6):
        expected = hf_row([lp.RepetitionPenaltyLogitsProcessor(float(penalty[r]))], ids[r], scores[r])
        np.testing.assert_array_equal(ours[r], expected)
    np.testing.assert_array_equal(ours[[0, 4]], scores[[0, 4]])  # neutral rows untouched


def test_minus_one_entries_are_ignored_but_pad_ids_are_tokens():
    scores = np.ones((2, 10), dtype=np.float32)
    ids = np.array([[-1, -1, 3], [9, 9, 3]])  # row 1: 9 is a real padding id, penalised like any token
    out = P.repetition_penalty(ids, scores, np.array([2.0, 2.0]))
    assert (out[0] == 0.5).sum() == 1 and out[0, 3] == 0.5 and out[0, 9] == 1.0
    assert out[1, 9] == 0.5 and out[1, 3] == 0.5


@pytest.mark.parametrize("length", [1, 2, 5, 60])
def test_no_repeat_ngram_matches_hf_per_row(length):
    ids = padded_histories(7, length, seed=length, high=5)  # a 5-token alphabet so n-grams repeat
    scores = scores_for(7, seed=1)
    sizes = np.array([0, 1, 2, 3, 4, 3, 2])
    ours = P.no_repeat_ngram(ids, scores.copy(), sizes)
    for r in range(7):
        procs = [lp.NoRepeatNGramLogitsProcessor(int(sizes[r]))] if sizes[r] else []
        np.testing.assert_array_equal(ours[r], hf_row(procs, ids[r], scores[r]), err_msg=f"row {r}")
    np.testing.assert_array_equal(ours[0], scores[0])


def test_no_repeat_ngram_exact_example():
    ids = np.array([[5, 6, 7, 5, 6], [-1, -1, -1, 5, 6], [-1, 6, -1, 5, 6]])
    out = P.no_repeat_ngram(ids, np.zeros((3, 10), dtype=np.float32), np.array([3, 3, 3]))
    assert np.flatnonzero(np.isinf(out[0])).tolist() == [7]  # (5, 6) was followed by 7
    assert not np.isinf(out[1:]).any()  # fewer than n-1 real tokens, or n-grams through a -1


def test_suppress_tokens_matches_min_length():
    scores = scores_for(4)
    ids = padded_histories(4, 6)
    eos = [3, 17]
    min_length = np.array([0, 6, 7, 10])
    cur_len = ids.shape[1]  # transformers counts the padded length, prompt included
    ours = P.suppress_tokens(scores.copy(), cur_len < min_length, eos)
    for r in range(4):
        proc = lp.MinLengthLogitsProcessor(int(min_length[r]), eos)
        full = torch.tensor(ids[r][None].clip(0))  # min length only looks at the padded length
        np.testing.assert_array_equal(ours[r], proc(full, torch.tensor(scores[r][None]))[0].numpy())
    assert np.isinf(ours[2:, eos]).all() and np.isfinite(ours[:2]).all()


def test_temperature_matches_hf_bit_for_bit():
    scores = scores_for(5)
    t = np.array([1.0, 0.7, 0.3, 1.3, 2.0], dtype=np.float32)
    ours = P.temperature(scores.copy(), t)
    for r in range(1, 5):
        expected = lp.TemperatureLogitsWarper(float(t[r]))(None, torch.tensor(scores[r][None]))[0].numpy()
        np.testing.assert_array_equal(ours[r], expected)
    np.testing.assert_array_equal(ours[0], scores[0])


@pytest.mark.parametrize("min_keep", [1, 2])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_top_k_matches_hf_per_row(min_keep, ties):
    scores = scores_for(8, seed=3)
    if ties:  # coarse values: many tokens share the k-th score, and transformers keeps them all
        scores = np.round(scores * 2) / 2
        scores[1, [10, 20, 30]] = scores[1].max() + 1  # three tokens tie for the top-1
    k = np.array([0, 1, 5, 50, 2000, 3, 1, V])
    ours = P.top_k(scores.copy(), k, min_keep)
    for r in range(8):
        procs = [lp.TopKLogitsWarper(int(k[r]), min_tokens_to_keep=min_keep)] if k[r] else []
        np.testing.assert_array_equal(ours[r], hf_row(procs, ids_row=np.zeros(0, np.int64), scores_row=scores[r]))
    np.testing.assert_array_equal(ours[[0, 4, 7]], scores[[0, 4, 7]])
    if ties:
        assert np.isfinite(ours[1]).sum() == max(3, min_keep)


@pytest.mark.parametrize("holes", [False, True], ids=["dense", "mostly-minus-inf"])
def test_top_k_on_a_gpt2_sized_vocabulary_matches_hf(holes):
    """k much smaller than V: only the scores above a bound read from a strided sample are partitioned."""
    scores = scores_for(6, seed=5, vocab=50_257)
    scores[2] = np.round(scores[2])  # many tokens tie with the k-th score
    if holes:  # about 630 finite scores per sample of 6283: the bound itself can be -inf
        scores[np.random.default_rng(6).random(scores.shape) < 0.9] = -np.inf
    k = np.array([50, 50, 50, 1, 640, 6000])
    ours = P.top_k(scores.copy(), k)
    for r in range(6):
        expected = hf_row([lp.TopKLogitsWarper(int(k[r]))], ids_row=np.zeros(0, np.int64), scores_row=scores[r])
        np.testing.assert_array_equal(ours[r], expected)


@pytest.mark.parametrize("min_keep", [1, 2])
@pytest.mark.parametrize("vocab", [V, 50_000])
def test_top_p_matches_hf_per_row(min_keep, vocab):
    scale = np.array([[3.0], [0.2], [3.0], [1.0], [3.0], [0.05], [8.0], [3.0]], dtype=np.float32)
    scores = scores_for(8, seed=4, vocab=vocab, scale=1.0) * scale  # 0.2, 0.05: flat rows grow m to the vocab
    p = np.array([1.0, 0.9, 1e-6, 0.3, 0.999999, 0.95, 0.5, 0.0])
    ours = P.top_p(scores.copy(), p, min_keep)
    for r in range(8):
        procs = [lp.TopPLogitsWarper(float(p[r]), min_tokens_to_keep=min_keep)] if p[r] < 1 else []
        assert_same_filter(ours[r], hf_row(procs, np.zeros(0, np.int64), scores[r]), scores[r], p[r])
    np.testing.assert_array_equal(ours[0], scores[0])
    assert np.isfinite(ours[[2, 7]]).sum(axis=1).tolist() == [min_keep, min_keep]


def test_top_p_after_top_k_and_with_ties():
    scores = np.round(scores_for(6, seed=5) * 2) / 2
    k = np.array([40, 40, 3, 200, 0, 10])
    p = np.array([0.5, 0.9, 0.95, 0.7, 0.6, 0.2])
    ours = P.top_p(P.top_k(scores.copy(), k), p)
    for r in range(6):
        procs = [lp.TopKLogitsWarper(int(k[r]))] if k[r] else []
        expected = hf_row([*procs, lp.TopPLogitsWarper(float(p[r]))], np.zeros(0, np.int64), scores[r])
        # which of several tied tokens survives is unspecified: compare how many survive and their values
        np.testing.assert_array_equal(np.sort(ours[r][np.isfinite(ours[r])]), np.sort(expected[np.isfinite(expected)]))


def test_log_softmax_matches_torch():
    scores = scores_for(4, scale=10.0)
    scores[1, :900] = -np.inf
    ours = P.log_softmax(scores)
    expected = torch.log_softmax(torch.tensor(scores), dim=-1).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=2e-6)


def test_row_params_full_validate_take_concat():
    rp = P.RowParams.full(3, top_k=[0, 5, 7], do_sample=True, temperature=0.5)
    assert len(rp) == 3 and rp.temperature.dtype == np.float32 and rp.top_k.tolist() == [0, 5, 7]
    both = P.RowParams.concat([rp, P.RowParams.full(2)])
    assert len(both) == 5 and both.do_sample.tolist() == [True, True, True, False, False]
    assert both.take(np.array([4, 1, 1])).top_k.tolist() == [0, 5, 5]
    P.RowParams.full(1, temperature=0.0)  # greedy rows ignore temperature


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\] \(1 = off\), got 1.5 \(row 0\)"),
        ({"top_k": [0, -1, 2]}, r"top_k must be >= 0 \(0 = off\), got -1 \(row 1\)"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"temperature": 0.0, "do_sample": True}, "temperature must be > 0 when do_sample is True"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep must be >= 1"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be >= 0"),
        ({"top_k": [1, 2]}, r"top_k must be a scalar or have 3 values, got shape \(2,\)"),
    ],
)
def test_row_params_errors_name_parameter_value_and_row(bad, message):
    with pytest.raises(ValueError, match=message):
        P.RowParams.full(3, **bad)


def test_chain_skips_neutral_steps_and_does_not_warp_greedy_rows():
    assert P.LogitsChain(P.RowParams.full(4)).names == ["suppress_eos"]
    greedy = P.RowParams.full(2, temperature=0.5, top_k=3, top_p=0.5)  # do_sample False: warpers never run
    chain = P.LogitsChain(greedy)
    assert chain.names == ["suppress_eos"]
    scores = scores_for(2)
    np.testing.assert_array_equal(chain(np.zeros((2, 0), np.int64), scores.copy()), scores)
    assert P.LogitsChain(greedy.take([1, 0])).params.top_k.tolist() == [3, 3]
    assert chain.take([1, 0]) is chain  # alike rows (beams of one prompt): reordering needs no new chain
    mixed = P.LogitsChain(P.RowParams.full(2, top_k=[3, 4], do_sample=True)).take([1, 0])
    assert mixed.params.top_k.tolist() == [4, 3]


def hf_list(rp, r, eos, min_length):
    """The LogitsProcessorList transformers' generate() builds for row r's settings."""
    procs = []
    if rp.repetition_penalty[r] != 1:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(rp.repetition_penalty[r])))
    if rp.no_repeat_ngram_size[r] > 0:
        procs.append(lp.NoRepeatNGramLogitsProcessor(int(rp.no_repeat_ngram_size[r])))
    if min_length[r] > 0:
        procs.append(lp.MinLengthLogitsProcessor(int(min_length[r]), eos))
    keep = int(rp.min_tokens_to_keep[r])
    if rp.do_sample[r]:
        if rp.temperature[r] != 1:
            procs.append(lp.TemperatureLogitsWarper(float(rp.temperature[r])))
        if rp.top_k[r] != 0:
            procs.append(lp.TopKLogitsWarper(int(rp.top_k[r]), min_tokens_to_keep=keep))
        if rp.top_p[r] < 1:
            procs.append(lp.TopPLogitsWarper(float(rp.top_p[r]), min_tokens_to_keep=keep))
    return lp.LogitsProcessorList(procs)


@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "beam-log-softmax"])
def test_chain_matches_hf_processor_list(log_probs):
    n = 7
    rp = P.RowParams.full(
        n,
        repetition_penalty=[1.3, 1.0, 1.0, 1.1, 1.0, 1.2, 1.0],
        no_repeat_ngram_size=[0, 2, 0, 3, 0, 2, 0],
        temperature=[0.7, 1.0, 1.5, 0.5, 1.0, 1.0, 0.9],
        top_k=[0, 50, 20, 0, 0, 5, 1],
        top_p=[0.9, 1.0, 0.8, 0.95, 1.0, 0.5, 1.0],
        min_tokens_to_keep=[1, 1, 2, 1, 1, 2, 2],
        do_sample=[True, True, True, False, False, True, True],
    )
    ids = padded_histories(n, 30, seed=7, high=8)  # 8 ids: n-grams repeat
    eos, min_length = [5], np.array([0, 40, 0, 31, 10, 0, 35])
    scores = scores_for(n, seed=9)
    if log_probs:
        scores = P.log_softmax(scores)
    ours = P.LogitsChain(rp)(ids, scores.copy(), eos_suppress_mask=ids.shape[1] < min_length, eos_ids=eos)
    padded = torch.zeros((1, ids.shape[1]), dtype=torch.long)
    for r in range(n):
        real = torch.tensor(ids[r][ids[r] >= 0][None])
        out, before_top_p = torch.tensor(scores[r][None]), None
        for proc in hf_list(rp, r, eos, min_length):
            if isinstance(proc, lp.TopPLogitsWarper):
                before_top_p = out[0].numpy().copy()
            # min length looks only at the padded length, the other processors at the row's real tokens
            out = proc(padded if isinstance(proc, lp.MinLengthLogitsProcessor) else real, out)
        top_p = float(rp.top_p[r]) if rp.do_sample[r] else None
        assert_same_filter(ours[r], out[0].numpy(), before_top_p, top_p)
    assert np.isneginf(ours[3, 5]) and np.isinf(ours[3]).sum() >= 3  # row 3 (greedy): EOS and n-gram bans
