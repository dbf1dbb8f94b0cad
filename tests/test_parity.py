"""Token-for-token parity with transformers `generate()` on the same tiny random weights (fp32, CPU).

Same weights, same prompts, same parameters: the generated ids must be identical and so must the text.
Sampling cannot share torch's random stream; its limits (top_k=1 is greedy) are checked here, its distribution
in test_sampling.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxgen import TextGeneration  # noqa: E402

GPT2_PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog and", "A"]
T5_PROMPTS = ["translate English to German: the house is wonderful", "summarize: a short text", "question: why?"]

# (id, transformers kwargs); onnxgen gets the same names (num_return_sequences is Backprop's num_generations).
GREEDY_AND_BEAM_CASES = [
    ("greedy", dict(do_sample=False, max_new_tokens=20)),
    ("beam2", dict(num_beams=2, max_new_tokens=12)),
    ("beam3-lp2", dict(num_beams=3, max_new_tokens=12, length_penalty=2.0)),
    ("beam4-lp0.5-n2", dict(num_beams=4, max_new_tokens=10, length_penalty=0.5, num_return_sequences=2)),
    ("beam3-lp-neg", dict(num_beams=3, max_new_tokens=10, length_penalty=-1.0)),
    ("beam4-early-true-n4", dict(num_beams=4, max_new_tokens=10, early_stopping=True, num_return_sequences=4)),
    ("beam3-early-never", dict(num_beams=3, max_new_tokens=10, early_stopping="never")),
    ("beam3-early-never-lp-neg", dict(num_beams=3, max_new_tokens=10, early_stopping="never", length_penalty=-0.5)),
    ("repetition1.5", dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.5)),
    ("repetition0.7", dict(do_sample=False, max_new_tokens=20, repetition_penalty=0.7)),
    ("ngram2", dict(do_sample=False, max_new_tokens=20, no_repeat_ngram_size=2)),
    ("ngram3-beam3", dict(num_beams=3, max_new_tokens=15, no_repeat_ngram_size=3)),
    ("beam3-repetition-n3", dict(num_beams=3, max_new_tokens=12, repetition_penalty=1.3, num_return_sequences=3)),
]
EAGER_EOS_CASES = [
    ("greedy", dict(do_sample=False, max_new_tokens=20)),
    ("min-new-tokens", dict(do_sample=False, max_new_tokens=20, min_new_tokens=8)),
    ("beam4-early-false", dict(num_beams=4, max_new_tokens=15, early_stopping=False, num_return_sequences=2)),
    ("beam4-early-true", dict(num_beams=4, max_new_tokens=15, early_stopping=True)),
    ("beam4-early-never", dict(num_beams=4, max_new_tokens=15, early_stopping="never", length_penalty=1.5)),
    ("beam3-min-new", dict(num_beams=3, max_new_tokens=15, min_new_tokens=6)),
]


def _onnxgen_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if "num_return_sequences" in out:
        out["num_generations"] = out.pop("num_return_sequences")
    return out


def _trim(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first EOS (transformers fills the rest with padding)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


class HFReference:
    def __init__(self, checkpoint, seq2seq: bool):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        cls = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
        self.model = cls.from_pretrained(checkpoint).eval()
        self.seq2seq = seq2seq
        if not seq2seq:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "left"

    def generate(self, prompts: list[str], **kwargs) -> list[list[list[int]]]:
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(**encoded, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        skip = 1 if self.seq2seq else encoded["input_ids"].shape[1]
        eos = self.tokenizer.eos_token_id
        n = kwargs.get("num_return_sequences", 1)
        rows = [_trim(row[skip:].tolist(), eos) for row in out]
        return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def gpt2_pair(tiny_gpt2_checkpoint, tiny_gpt2_onnx):
    return HFReference(tiny_gpt2_checkpoint, seq2seq=False), TextGeneration(tiny_gpt2_onnx, device="cpu")


@pytest.fixture(scope="module")
def t5_pair(tiny_t5_checkpoint, tiny_t5_onnx):
    return HFReference(tiny_t5_checkpoint, seq2seq=True), TextGeneration(tiny_t5_onnx, device="cpu")


@pytest.fixture(scope="module")
def eager_gpt2_pair(eager_eos_gpt2_checkpoint, eager_eos_gpt2_onnx):
    return HFReference(eager_eos_gpt2_checkpoint, seq2seq=False), TextGeneration(eager_eos_gpt2_onnx, device="cpu")


@pytest.fixture(scope="module")
def eager_t5_pair(eager_eos_t5_checkpoint, eager_eos_t5_onnx):
    return HFReference(eager_eos_t5_checkpoint, seq2seq=True), TextGeneration(eager_eos_t5_onnx, device="cpu")


def _check_ids_and_text(hf: HFReference, tg: TextGeneration, prompts: list[str], kwargs: dict) -> None:
    expected = hf.generate(prompts, **kwargs)
    ids = [tg.tokenizer.encode(p) for p in prompts]
    got = tg.generate_ids(ids, **_onnxgen_kwargs(kwargs))
    assert got == expected
    texts = tg(prompts, return_full_text=False, **_onnxgen_kwargs(kwargs))
    want = [[hf.tokenizer.decode(seq, skip_special_tokens=True) for seq in seqs] for seqs in expected]
    if kwargs.get("num_return_sequences", 1) == 1:
        want = [w[0] for w in want]
    assert texts == want


@pytest.mark.parametrize("kwargs", [c[1] for c in GREEDY_AND_BEAM_CASES], ids=[c[0] for c in GREEDY_AND_BEAM_CASES])
def test_gpt2_matches_transformers_on_a_left_padded_batch(gpt2_pair, kwargs):
    _check_ids_and_text(*gpt2_pair, GPT2_PROMPTS, kwargs)


@pytest.mark.parametrize("kwargs", [c[1] for c in GREEDY_AND_BEAM_CASES], ids=[c[0] for c in GREEDY_AND_BEAM_CASES])
def test_t5_matches_transformers_on_a_batch(t5_pair, kwargs):
    _check_ids_and_text(*t5_pair, T5_PROMPTS, kwargs)


@pytest.mark.parametrize("kwargs", [c[1] for c in EAGER_EOS_CASES], ids=[c[0] for c in EAGER_EOS_CASES])
def test_gpt2_that_likes_to_stop_early(eager_gpt2_pair, kwargs):
    _check_ids_and_text(*eager_gpt2_pair, GPT2_PROMPTS, kwargs)


@pytest.mark.parametrize("kwargs", [c[1] for c in EAGER_EOS_CASES], ids=[c[0] for c in EAGER_EOS_CASES])
def test_t5_that_likes_to_stop_early(eager_t5_pair, kwargs):
    _check_ids_and_text(*eager_t5_pair, T5_PROMPTS, kwargs)


def test_the_eager_models_really_stop_early(eager_gpt2_pair, eager_t5_pair):
    """Guards the min-length tests: without min_new_tokens these models end before their limit."""
    for (hf, _), prompts in ((eager_gpt2_pair, GPT2_PROMPTS), (eager_t5_pair, T5_PROMPTS)):
        lengths = [len(seqs[0]) for seqs in hf.generate(prompts, do_sample=False, max_new_tokens=20)]
        assert min(lengths) < 8


@pytest.mark.parametrize("kwargs", [dict(max_length=18), dict(max_length=18, min_length=14)], ids=["max", "min-max"])
def test_total_length_convention_single_prompt(gpt2_pair, eager_gpt2_pair, kwargs):
    """max_length/min_length count the prompt (GPT-2) as in transformers."""
    for hf, tg in (gpt2_pair, eager_gpt2_pair):
        _check_ids_and_text(hf, tg, [GPT2_PROMPTS[1]], dict(do_sample=False, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(max_length=9), dict(max_length=12, min_length=10)], ids=["max", "min-max"])
def test_total_length_convention_t5(t5_pair, eager_t5_pair, kwargs):
    """For T5 max_length/min_length count the decoder's tokens, its start token included."""
    for hf, tg in (t5_pair, eager_t5_pair):
        _check_ids_and_text(hf, tg, T5_PROMPTS, dict(do_sample=False, **kwargs))


def test_full_text_is_prompt_plus_continuation_as_backprop(gpt2_pair):
    hf, tg = gpt2_pair
    expected = hf.generate([GPT2_PROMPTS[0]], do_sample=False, max_new_tokens=10)[0][0]
    prompt_ids = hf.tokenizer(GPT2_PROMPTS[0])["input_ids"]
    assert tg(GPT2_PROMPTS[0], do_sample=False, max_new_tokens=10) == hf.tokenizer.decode(
        prompt_ids + expected, skip_special_tokens=True
    )


@pytest.mark.parametrize("pair", ["gpt2_pair", "t5_pair"])
def test_top_k_1_sampling_is_greedy(pair, request):
    hf, tg = request.getfixturevalue(pair)
    prompts = GPT2_PROMPTS if pair == "gpt2_pair" else T5_PROMPTS
    greedy = tg(prompts, do_sample=False, max_new_tokens=15)
    for seed in range(3):
        assert tg(prompts, do_sample=True, top_k=1, temperature=1.3, max_new_tokens=15, seed=seed) == greedy


class _TextContains:
    """A transformers stopping criterion with onnxgen's stop-string rule: the generated text holds the string."""

    def __init__(self, tokenizer, skip: int, stop: str):
        self.tokenizer, self.skip, self.stop = tokenizer, skip, stop

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.skip :], skip_special_tokens=True)
        return torch.tensor([self.stop in text for text in texts], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("pair", ["gpt2_pair", "t5_pair"])
def test_beam_search_with_a_stop_string_matches_transformers_with_the_same_criterion(pair, request):
    hf, tg = request.getfixturevalue(pair)
    prompt = (GPT2_PROMPTS if pair == "gpt2_pair" else T5_PROMPTS)[1]
    # length_penalty 0 scores a hypothesis by its summed log-probs, so beams cut short by a stop string can win
    kwargs = dict(num_beams=3, num_return_sequences=3, max_new_tokens=12, length_penalty=0.0)
    extra = {} if hf.seq2seq else {"return_full_text": False}
    encoded = hf.tokenizer(prompt, return_tensors="pt")
    skip = 1 if hf.seq2seq else encoded.input_ids.shape[1]
    free = tg(prompt, return_details=True, **_onnxgen_kwargs(kwargs), **extra)
    best = free[0].text
    ended_on_stop = 0
    for start in range(2, len(best) - 2, max(1, len(best) // 6)):  # strings the best beam writes along the way
        stop = best[start : start + 2]
        if not stop.strip() or "\ufffd" in stop:
            continue
        criteria = transformers.StoppingCriteriaList([_TextContains(hf.tokenizer, skip, stop)])
        with torch.no_grad():
            out = hf.model.generate(**encoded, stopping_criteria=criteria, pad_token_id=hf.tokenizer.pad_token_id,
                                    return_dict_in_generate=True, output_scores=True, **kwargs)
        # what follows a finished hypothesis is filler (EOS ids here); its beam indices say how long it really is
        lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
        expected = [row[:n] for row, n in zip(out.sequences[:, skip:].tolist(), lengths)]

        got = tg(prompt, stop=stop, return_details=True, **_onnxgen_kwargs(kwargs), **extra)
        assert [g.token_ids for g in got] == expected, stop
        for g in got:
            text = hf.tokenizer.decode(g.token_ids, skip_special_tokens=True)
            if g.finish_reason == "stop":
                ended_on_stop += 1
                assert g.text == text[: text.index(stop)]
            else:
                assert stop not in text and g.text == text
    assert ended_on_stop, "some returned beam should have ended on a stop string"
