"""onnxgen.sampling: greedy picks, seeded categorical draws and their distributions, per-sequence generators."""

import numpy as np
import pytest

from onnxgen import processors as P
from onnxgen import sampling as S

N_DRAWS = 20_000


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_frequencies_match(draws, probs, n_sigma=4.0):
    """Each token's empirical frequency lies within n_sigma binomial standard deviations of its probability;
    tokens expected fewer than 10 times are pooled into one bin, where the normal approximation holds."""
    freq = np.bincount(draws, minlength=probs.size) / draws.size
    assert (freq[probs == 0] == 0).all(), "drew a token of probability 0"
    rare = probs * draws.size < 10
    freq = np.append(freq[~rare], freq[rare].sum())
    probs = np.append(probs[~rare], probs[rare].sum())
    sigma = np.sqrt(probs * (1 - probs) / draws.size)
    bad = np.abs(freq - probs) > n_sigma * sigma + 1e-12
    assert not bad.any(), f"frequencies {freq[bad]} vs probabilities {probs[bad]}"


def test_greedy_takes_the_first_maximum_like_torch():
    torch = pytest.importorskip("torch")
    scores = np.array([[1.0, 3.0, 3.0, 2.0], [-np.inf, 0.0, -np.inf, 0.0]], dtype=np.float32)
    ours = S.greedy(scores)
    assert ours.dtype == np.int64
    assert ours.tolist() == torch.argmax(torch.tensor(scores), dim=-1).tolist() == [1, 1]


def test_top_k_1_sampling_equals_greedy():
    scores = (np.random.default_rng(0).standard_normal((16, 5000)) * 3).astype(np.float32)
    rngs = [S.make_row_rng(123, i) for i in range(16)]
    picked = S.sample(P.top_k(scores.copy(), np.ones(16, np.int64)), rngs)
    np.testing.assert_array_equal(picked, S.greedy(scores))


@pytest.mark.parametrize("t", [1e-38, 1e-34, 1e-31])
def test_a_temperature_small_enough_to_overflow_samples_greedily(t):
    scores = (np.random.default_rng(1).standard_normal((6, 3000)) * 40).astype(np.float32)
    scores[[0, 1, 4, 5]] *= 1e6  # large enough that each temperature overflows some of them
    scores[1, [7, 9]] = scores[1].max() * 2  # a tie for the best: both stay possible
    temps = np.array([t, t, 1.0, 0.5, t, t], dtype=np.float32)
    limited = P.temperature(scores.copy(), temps)
    with np.errstate(over="ignore"):
        assert np.isposinf(scores[[0, 1, 4, 5]] / np.float32(t)).any(axis=1).all()  # each of these rows overflowed
    assert np.isfinite(limited).sum(axis=1).tolist() == [1, 2, 3000, 3000, 1, 1]
    np.testing.assert_array_equal(limited[2:4], scores[2:4] / temps[2:4, None])  # other rows untouched
    draws = S.sample(limited, [S.make_row_rng(5, i) for i in range(6)])
    assert draws[[0, 4, 5]].tolist() == S.greedy(scores)[[0, 4, 5]].tolist()
    assert draws[1] in (7, 9)


def test_single_finite_entry_is_returned_and_all_minus_inf_is_an_error():
    scores = np.full((3, 10), -np.inf, dtype=np.float32)
    scores[[0, 1, 2], [4, 0, 9]] = [5.0, -80.0, 0.0]
    rngs = [np.random.default_rng(i) for i in range(3)]
    assert S.sample(scores, rngs).tolist() == [4, 0, 9]
    scores[1] = -np.inf
    with pytest.raises(ValueError, match="row 1"):
        S.sample(scores, rngs)
    with pytest.raises(ValueError, match="one generator per row"):
        S.sample(scores, rngs[:2])


def test_seeded_draws_repeat_and_do_not_depend_on_the_batch():
    scores = np.random.default_rng(1).standard_normal((6, 300)).astype(np.float32)
    first = S.sample(scores, [S.make_row_rng(7, i) for i in range(6)])
    again = S.sample(scores, [S.make_row_rng(7, i) for i in range(6)])
    np.testing.assert_array_equal(first, again)
    alone = [S.sample(scores[i : i + 1], [S.make_row_rng(7, i)])[0] for i in range(6)]
    assert alone == first.tolist()


def test_seeded_draws_are_pinned():
    """A seed's draws are part of the contract: faster processors or sampling must leave them unchanged."""
    scores = (np.random.default_rng(8).standard_normal((3, 50_257)) * 3).astype(np.float32)
    chain = P.LogitsChain(P.RowParams.full(3, top_k=[50, 50, 0], temperature=[1.0, 0.7, 1.0], do_sample=True))
    rngs = [S.make_row_rng(2024, i) for i in range(3)]
    draws = [S.sample(chain(np.zeros((3, 0), np.int64), scores.copy()), rngs).tolist() for _ in range(4)]
    assert draws == [[31958, 13548, 45177], [31560, 38230, 6173], [7440, 13548, 11807], [31958, 38230, 15413]]


@pytest.mark.parametrize("filtered", [False, True], ids=["full", "top-k-top-p"])
def test_sample_distribution_matches_softmax(filtered):
    base = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)
    scores = np.tile(base, (N_DRAWS, 1))
    if filtered:
        scores = P.LogitsChain(P.RowParams.full(N_DRAWS, temperature=0.7, top_k=6, top_p=0.9, do_sample=True))(
            np.zeros((N_DRAWS, 0), np.int64), scores
        )
        assert np.isfinite(scores[0]).sum() == 4
    rng = np.random.default_rng(2024)  # one generator drawn from row after row
    draws = S.sample(scores, [rng] * N_DRAWS)
    assert_frequencies_match(draws, softmax(scores[0]))


@pytest.mark.parametrize("underflow", [False, True], ids=["dense", "zero-weights"])
def test_sample_distribution_across_blocks(underflow):
    """Mass spread over far-apart ids of a 600-token row: the two-level (block, then entry) search is exact."""
    scores = np.full(600, -1e9 if underflow else -6.0, dtype=np.float32)  # -1e9: weights underflow to 0
    scores[[0, 255, 256, 300, 511, 599]] = [1.0, 0.5, 0.4, 0.0, 1.2, 0.8]
    draws = S.sample(np.tile(scores, (N_DRAWS, 1)), [np.random.default_rng(11)] * N_DRAWS)
    assert_frequencies_match(draws, softmax(scores))


def test_sample_without_replacement_distribution():
    scores = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -np.inf, 0.2, -2.0, -np.inf, 0.8], dtype=np.float32)
    probs = softmax(scores)
    rng = np.random.default_rng(5)
    picks = np.array([S.sample_without_replacement(scores, 3, rng) for _ in range(N_DRAWS)])
    assert all(len(set(row)) == 3 for row in picks[:100])
    assert not np.isin(picks, [5, 8]).any()
    assert_frequencies_match(picks[:, 0], probs)
    # the second draw comes from the rest, renormalised: P(j second) = sum_i p_i p_j / (1 - p_i)
    second = np.array([sum(probs[i] * probs[j] / (1 - probs[i]) for i in range(10) if i != j) for j in range(10)])
    assert_frequencies_match(picks[:, 1], second)
    with pytest.raises(ValueError, match="k must be in"):
        S.sample_without_replacement(scores, 9, rng)


def test_make_row_rng_streams():
    a, b = S.make_row_rng(42, 0).random(4), S.make_row_rng(42, 0).random(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, S.make_row_rng(42, 1).random(4))
    assert not np.array_equal(a, S.make_row_rng(43, 0).random(4))
    assert not np.array_equal(S.make_row_rng(None, 0).random(4), S.make_row_rng(None, 0).random(4))
    spawned = np.random.Generator(np.random.PCG64(np.random.SeedSequence(42).spawn(3)[2]))
    np.testing.assert_array_equal(S.make_row_rng(42, 2).random(4), spawned.random(4))


def test_token_logprobs_match_torch_log_softmax():
    torch = pytest.importorskip("torch")
    scores = (np.random.default_rng(3).standard_normal((5, 700)) * 8).astype(np.float32)
    scores[2, :600] = -np.inf
    ids = np.array([0, 699, 650, 3, 10])
    ours = S.token_logprobs(scores, ids)
    expected = torch.log_softmax(torch.tensor(scores), dim=-1).numpy()[np.arange(5), ids]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)


def _dense_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k by a full sort: the reference the packed candidates are checked against."""
    out = scores.copy()
    for row in out:
        if k < row.size:
            kth = np.sort(row)[-k]
            row[row < kth] = -np.inf
    return out


@pytest.mark.parametrize("rows, vocab, k", [(1, 50_257, 50), (5, 32_128, 50), (3, 4_000, 7), (4, 20_000, 300)])
def test_top_k_candidates_are_what_packing_the_filtered_rows_gives(rows, vocab, k):
    rng = np.random.default_rng(rows * vocab + k)
    scores = rng.standard_normal((rows, vocab)).astype(np.float32)
    scores[0, rng.integers(0, vocab, 40)] = -np.inf  # suppressed tokens
    scores[-1, :] = np.round(scores[-1] * 2) / 2  # many ties at the k-th score
    found = P.top_k_candidates(scores, k)
    assert found is not None
    assert P.top_k_candidates(scores, vocab // 16) is None  # too few strided samples: partition whole rows
    cols, vals, counts = found
    want_cols, want_vals, want_counts = P.pack_finite(_dense_top_k(scores, k))
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(vals, want_vals)
    valid = np.arange(vals.shape[1]) < counts[:, None]
    np.testing.assert_array_equal(np.where(valid, cols, -1), np.where(valid, want_cols, -1))
    dense = scores.copy()
    P.top_k(dense, k)  # the in-place filter goes through the same candidates
    np.testing.assert_array_equal(dense, _dense_top_k(scores, k))


def test_top_k_candidates_leave_rows_with_fewer_finite_scores_than_k_to_them():
    scores = np.full((2, 4_000), -np.inf, dtype=np.float32)
    scores[0, [5, 900, 3_000]] = [1.0, 2.0, 0.5]  # 3 finite scores, k = 10
    scores[1] = np.random.default_rng(0).standard_normal(4_000)
    cols, vals, counts = P.top_k_candidates(scores, 10)
    assert counts.tolist() == [3, 10]
    assert cols[0, :3].tolist() == [5, 900, 3_000] and vals[0, 3:].tolist() == [-np.inf] * 7


def test_packed_draws_equal_dense_draws_seed_for_seed():
    """The generator draws from top-k's packed candidates (sample_packed); a seed must give what sample() gives
    on the filtered dense rows, row by row and in a batch."""
    rng = np.random.default_rng(5)
    for trial in range(30):
        rows, vocab, k = int(rng.integers(1, 6)), int(rng.choice([2_000, 32_128, 50_257])), int(rng.choice([1, 5, 50]))
        scores = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4)).astype(np.float32)
        cols, vals, counts = P.top_k_candidates(scores, k)
        dense = _dense_top_k(scores, k)
        seeds = [S.make_row_rng(trial, i) for i in range(rows)], [S.make_row_rng(trial, i) for i in range(rows)]
        np.testing.assert_array_equal(S.sample_packed(cols, vals, seeds[0]), S.sample(dense, seeds[1]))


@pytest.mark.parametrize("rows", [1, 2])
def test_a_row_with_nothing_left_to_sample_is_the_same_error_packed_or_dense(rows):
    scores = np.full((rows, 4_096), -np.inf, dtype=np.float32)
    cols, vals, counts = P.top_k_candidates(scores, 5)
    assert counts.tolist() == [0] * rows and vals.shape == (rows, 1)
    for draw in (lambda rngs: S.sample_packed(cols, vals, rngs), lambda rngs: S.sample(scores, rngs)):
        with pytest.raises(ValueError, match="cannot sample row 0: every score is -inf"):
            draw([S.make_row_rng(0, i) for i in range(rows)])


def _mixed_rows(vocab: int, seed: int) -> np.ndarray:
    """Rows that take every branch of top-k's candidates: plain, ties at the k-th score, fewer finite scores than
    k, nothing finite."""
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((4, vocab)) * 2).astype(np.float32)
    scores[1] = np.round(scores[1])  # ties
    scores[2, rng.permutation(vocab)[5:]] = -np.inf  # 5 finite scores
    scores[3] = -np.inf
    return scores


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_candidates_of_a_row_alone_are_its_row_in_a_batch(k):
    """Batch 1 takes a 1-D route through the candidates; it must give what the batched route gives that row."""
    scores = _mixed_rows(50_257, k)
    cols, vals, counts = P.top_k_candidates(scores, k)
    for row in range(scores.shape[0]):
        alone = P.top_k_candidates(scores[row : row + 1], k)
        n = int(counts[row])
        assert alone[2].tolist() == [n]
        assert alone[1].shape[1] == max(n, 1)
        np.testing.assert_array_equal(alone[1][0, :n], vals[row, :n])
        np.testing.assert_array_equal(alone[0][0, :n], cols[row, :n])


def test_packed_draws_of_a_row_alone_are_its_draws_in_a_batch():
    """Batch 1 draws with 1-D calls (`_draw`); a seeded row must get the token the batched draw gives it."""
    for trial in range(20):
        scores = _mixed_rows(32_128, trial)[:3]  # the row with nothing finite cannot be drawn from
        cols, vals, counts = P.top_k_candidates(scores, 50)
        batched = S.sample_packed(cols, vals, [S.make_row_rng(trial, i) for i in range(3)])
        for row in range(3):
            width = max(int(counts[row]), 1)
            rngs = [S.make_row_rng(trial, row)]
            alone = S.sample_packed(cols[row : row + 1, :width], vals[row : row + 1, :width], rngs)
            assert alone.tolist() == [batched[row]]
            assert scores[row, alone[0]] > -np.inf


def test_top_k_of_a_row_does_not_depend_on_another_rows_nan_scores():
    """A row of NaNs defeats top-k's shortcut for itself; the other rows must still get what they get alone."""
    scores = (np.random.default_rng(3).standard_normal((3, 50_257)) * 2).astype(np.float32)
    scores[0] = np.nan
    scores[1, [7, 4_000, 30_001]] = np.nan  # a few NaNs: the shortcut still works for this row, and drops them
    alone = [P.top_k(scores[row : row + 1].copy(), 50) for row in range(3)]
    batched = P.top_k(scores.copy(), 50)
    for row in range(3):
        np.testing.assert_array_equal(batched[row], alone[row][0])
    assert np.count_nonzero(batched[1] > -np.inf) == 50 and not np.isnan(batched[1]).any()
