"""The Backprop-style API on exported tiny models: shapes, defaults, streaming, stop strings, details, bad input.

Needs only the runtime (onnxruntime, numpy, tokenizers): this file also runs in CI's torch-free venv.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxgen import TextGeneration


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_onnx):
    return TextGeneration(tiny_gpt2_onnx, device="cpu")


@pytest.fixture(scope="module")
def t5(tiny_t5_onnx):
    return TextGeneration(tiny_t5_onnx, device="cpu")


def test_ids_in_and_out_leave_the_tokenizer_unloaded_until_text_is_needed(tiny_gpt2_onnx):
    tg = TextGeneration(tiny_gpt2_onnx, device="cpu")
    out = tg.generate_ids([[5, 6, 7]], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(out[0][0]) == 4 and tg._tokenizer is None
    tg.generate_ids([[5, 6, 7]], max_new_tokens=4, do_sample=False, stop=["\n\n"])  # a stop string decodes
    assert tg._tokenizer is not None
    assert isinstance(TextGeneration(tiny_gpt2_onnx, device="cpu")("The cat", max_new_tokens=2), str)


# -- return shapes as Backprop ------------------------------------------------------------------------------
def test_a_string_gives_a_string_with_the_prompt_in_front(gpt2):
    out = gpt2("The café serves", max_new_tokens=5, seed=0)
    assert isinstance(out, str) and out.startswith("The café serves")


def test_a_list_gives_a_list_and_generations_give_lists(gpt2):
    assert len(gpt2(["a cat", "the dog"], max_new_tokens=3, seed=1)) == 2
    out = gpt2(["a cat", "the dog"], num_generations=3, max_new_tokens=3, seed=1)
    assert [len(x) for x in out] == [3, 3] and all(isinstance(s, str) for x in out for s in x)
    single = gpt2("a cat", num_generations=2, max_new_tokens=3, seed=1)
    assert isinstance(single, list) and len(single) == 2


def test_t5_returns_its_output_only(t5):
    out = t5("summarize: the house is big", max_new_tokens=6)
    assert isinstance(out, str) and not out.startswith("summarize")


def test_default_is_twenty_new_tokens(gpt2, t5):
    for tg, prompt in ((gpt2, "The cat"), (t5, "question: why")):
        details = tg(prompt, do_sample=False, return_details=True)
        assert len(details.token_ids) == 20 or details.finish_reason == "eos"


def test_gpt2_samples_by_default_and_t5_is_greedy(gpt2, t5):
    assert gpt2.plan({}).do_sample and gpt2.plan({}).temperature == pytest.approx(0.7)
    assert not t5.plan({}).do_sample


@pytest.mark.parametrize(
    "params, sampling",
    [
        (dict(do_sample=False, temperature=0.5), False),
        (dict(temperature=0.5), True),
        (dict(temperature=0), False),
        (dict(top_k=None, top_p=0.5), True),
        (dict(num_beams=3), False),
        (dict(num_generations=2), True),
        (dict(num_beams=3, do_sample=True), True),
    ],
)
def test_strategy_rules(t5, params, sampling):
    assert t5.plan(params).do_sample is sampling


def test_batch_size_bounds_the_batch_without_changing_results(gpt2):
    prompts = ["one", "two words", "three words here", "four"]
    assert gpt2(prompts, do_sample=False, max_new_tokens=6, batch_size=3) == gpt2(
        prompts, do_sample=False, max_new_tokens=6
    )


def test_seeded_sampling_repeats_and_ignores_batch_composition(gpt2):
    alone = gpt2("The café", max_new_tokens=8, seed=5, top_p=0.9)
    assert gpt2("The café", max_new_tokens=8, seed=5, top_p=0.9) == alone
    assert gpt2(["Prices rose", "The café"], max_new_tokens=8, seed=5, top_p=0.9)[1] == alone


# -- streaming, stop strings, details ----------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["The ticket costs", "A café in", "日本"])
def test_stream_concatenates_to_the_continuation(gpt2, prompt):
    pieces = list(gpt2.stream(prompt, do_sample=False, max_new_tokens=25))
    # Pieces are never rewritten, so equal concatenation means no piece held half a character that later
    # became a whole one (a random model may still emit a stray byte: that stays U+FFFD in the final text too).
    assert "".join(pieces) == gpt2(prompt, do_sample=False, max_new_tokens=25, return_full_text=False)


def test_stream_with_sampling_and_beams(gpt2):
    params = dict(max_new_tokens=12, seed=3, top_k=20)
    assert "".join(gpt2.stream("The ticket", **params)) == gpt2("The ticket", return_full_text=False, **params)
    beams = list(gpt2.stream("The ticket", num_beams=3, max_new_tokens=8))
    assert len(beams) <= 1 and "".join(beams) == gpt2("The ticket", num_beams=3, max_new_tokens=8,
                                                       return_full_text=False)


def test_stream_never_breaks_a_multibyte_character(gpt2):
    """Byte-level BPE can split one character across tokens; a streamed piece must never end mid-character."""
    ids = gpt2.tokenizer.encode("€ 日本 🎉")
    split = [gpt2.tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    assert any("\ufffd" in s for s in split), "the fixture tokenizer should split some character across tokens"
    from onnxgen.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(gpt2.tokenizer.decode)
    pieces = [decoder.piece(ids[:i]) for i in range(1, len(ids) + 1)]
    assert "".join(pieces) == gpt2.tokenizer.decode(ids) and all("\ufffd" not in p for p in pieces)


def test_stream_pieces_join_to_the_text_when_clean_up_rewrites_it(tiny_gpt2_onnx, tmp_path):
    import json
    import shutil

    from onnxgen.tokenizer import IncrementalDecoder

    directory = tmp_path / "clean_up"
    shutil.copytree(tiny_gpt2_onnx, directory)
    manifest = json.loads((directory / "onnxgen.json").read_text())
    manifest["tokenizer"]["clean_up_tokenization_spaces"] = True  # as tokenizers saved before transformers 4.45
    (directory / "onnxgen.json").write_text(json.dumps(manifest))
    tokenizer = TextGeneration(directory, device="cpu").tokenizer
    ids = tokenizer.encode("Hello , world . Isn 't it ? Yes ! I 'm sure , they 've said so ' right ' .")
    final = tokenizer.decode(ids)
    assert " ," not in final and " 'm" not in final  # the clean-up did rewrite it
    for stops in ((), ("said",)):
        decoder = tokenizer.incremental_decoder(stops)
        pieces = [decoder.piece(ids[:i]) for i in range(1, len(ids) + 1)]
        sent = "".join(pieces)
        assert sent == final[: len(sent)] and len(sent) > len(final) // 2  # nothing taken back, most sent early
        assert sent + decoder.finish(final) == final
        naive = IncrementalDecoder(tokenizer.decode, stops)  # what streaming did before it knew of the clean-up
        assert not final.startswith("".join(naive.piece(ids[:i]) for i in range(1, len(ids) + 1)))
    # random runs of the characters the clean-up works on, chains of " ' " included
    alphabet = sorted({i for text in (" ", "'", ".", ",", "?", "!", "n", "t", "s", "m", "v", "e", "r", "x")
                       for i in tokenizer.encode(text)})
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.choice(alphabet, size=int(rng.integers(1, 24))).tolist()
        final, decoder = tokenizer.decode(ids), tokenizer.incremental_decoder()
        sent = "".join(decoder.piece(ids[:i]) for i in range(1, len(ids) + 1))
        assert final.startswith(sent) and sent + decoder.finish(final) == final, ids


def test_stop_string_ends_generation_and_is_not_included(gpt2):
    full = gpt2("The ticket", do_sample=False, max_new_tokens=30, return_full_text=False)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "pick a stop string inside the text"
    details = gpt2("The ticket", do_sample=False, max_new_tokens=30, stop=[stop, "zzzz"], return_details=True,
                   return_full_text=False)
    assert details.finish_reason == "stop"
    assert details.text == full[: full.find(stop)]
    streamed = "".join(gpt2.stream("The ticket", do_sample=False, max_new_tokens=30, stop=stop))
    assert streamed == details.text


def test_details_have_ids_reasons_and_logprobs(gpt2):
    d = gpt2("The cat", do_sample=False, max_new_tokens=7, return_details=True)
    assert d.finish_reason in ("length", "eos") and len(d.logprobs) == len(d.token_ids)
    assert all(lp <= 0 for lp in d.logprobs)
    assert d.prompt_tokens == len(gpt2.tokenizer.encode("The cat"))


# -- bad input: the parameter, its value, what is allowed ----------------------------------------------------
@pytest.mark.parametrize(
    "params, error, match",
    [
        (dict(temprature=0.5), TypeError, "temprature.*did you mean 'temperature'"),
        (dict(top_p=1.5), ValueError, r"top_p must be a number in \[0, 1\], got 1.5"),
        (dict(top_k=-1), ValueError, r"top_k must be an integer in \[0, 2147483647\], got -1"),
        (dict(temperature=-1), ValueError, "temperature must be"),
        (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be an integer in \[1, 2147483647\], got 0"),
        (dict(num_beams="3"), TypeError, "num_beams must be an integer"),
        (dict(repetition_penalty=0), ValueError, "repetition_penalty must be"),
        (dict(early_stopping="sometimes"), ValueError, "early_stopping must be"),
        (dict(min_length=30, max_length=20), ValueError, r"min_length \(30\) must be <= max_length \(20\)"),
        (dict(do_sample=True, temperature=0), ValueError, "contradiction"),
        (dict(num_generations=3, do_sample=False), ValueError, "num_generations"),
        (dict(num_beams=2, num_generations=3), ValueError, r"num_generations \(3\) must be <= num_beams \(2\)"),
        (dict(stop=[1]), TypeError, "stop must be a string or a list of strings"),
        (dict(num_generations=2, num_return_sequences=2), TypeError, "pass only one"),
        (dict(max_length=2), ValueError, "max_new_tokens"),
    ],
)
def test_bad_parameters_name_the_parameter(gpt2, params, error, match):
    with pytest.raises(error, match=match):
        gpt2("The cat sat on the mat", **params)


def test_integers_are_accepted_where_floats_are_meant_and_none_means_not_given(gpt2):
    gpt2("The cat", repetition_penalty=3, temperature=1, top_k=None, top_p=None, max_new_tokens=2, seed=0)


def test_numpy_numbers_are_numbers(gpt2):
    plain = gpt2("The cat", max_new_tokens=6, top_k=5, temperature=0.5, seed=3)
    assert gpt2("The cat", max_new_tokens=np.int64(6), top_k=np.int32(5), temperature=np.float32(0.5),
                seed=np.uint8(3)) == plain
    with pytest.raises(TypeError, match="num_beams must be an integer"):
        gpt2("The cat", num_beams=np.bool_(True))


def test_top_p_zero_keeps_only_the_best_token_as_in_transformers(gpt2):
    assert gpt2("The cat", max_new_tokens=8, top_p=0.0, seed=1) == gpt2("The cat", max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize(
    "text, error, match",
    [
        ("", ValueError, "empty"),
        ([], ValueError, "empty list"),
        (["ok", 3], TypeError, r"text\[1\] must be a string"),
        (None, TypeError, "text must be a string"),
    ],
)
def test_bad_prompts(gpt2, text, error, match):
    with pytest.raises(error, match=match):
        gpt2(text, max_new_tokens=2)


def test_an_empty_list_of_ids_is_a_bad_prompt(gpt2):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        gpt2.generate_ids([[5, 6], []], max_new_tokens=2, do_sample=False)


def test_context_overflow_is_an_error_unless_truncation_is_asked(gpt2):
    limit = gpt2.manifest.max_positions
    long_prompt = "the cat " * limit
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gpt2(long_prompt, max_new_tokens=10)
    details = gpt2(long_prompt, max_new_tokens=10, do_sample=False, truncation=True, return_details=True)
    assert details.prompt_tokens == limit - 10


def test_a_max_length_beyond_the_context_is_an_error_that_truncation_cannot_fix(gpt2):
    limit = gpt2.manifest.max_positions
    for truncation in (False, True):  # max_length counts the prompt: cropping it only makes room for more tokens
        with pytest.raises(ValueError, match=rf"max_length \({limit + 20}\) exceeds the model's context of {limit}"):
            gpt2("the cat " * (limit // 4), max_length=limit + 20, do_sample=False, truncation=truncation)
    assert len(gpt2.generate_ids([[5] * 8], max_length=limit, do_sample=False, min_length=limit)[0][0]) == limit - 8


def test_the_gpu_cuda_means_comes_from_the_environment(monkeypatch):
    from onnxgen.model.session import device_id

    monkeypatch.setenv("ONNXGEN_CUDA_DEVICE", "3")
    assert device_id("cuda") == 3 and device_id("cpu") == 0
    monkeypatch.setenv("ONNXGEN_CUDA_DEVICE", "second")
    with pytest.raises(ValueError, match="ONNXGEN_CUDA_DEVICE must be a GPU index"):
        device_id("cuda")


def test_cuda_without_its_provider_is_an_error(tiny_gpt2_onnx):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA provider is not available"):
        TextGeneration(tiny_gpt2_onnx, device="cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        TextGeneration(tiny_gpt2_onnx, device="tpu")


def test_beam_sampling_is_seeded_and_independent_of_the_batch(gpt2):
    params = dict(num_beams=3, do_sample=True, num_generations=2, max_new_tokens=8, top_k=30)
    alone = gpt2("The café", seed=4, **params)
    assert len(alone) == 2
    assert gpt2("The café", seed=4, **params) == alone
    assert gpt2(["Prices rose by", "The café"], seed=4, **params)[1] == alone


def test_the_models_generation_defaults_override_transformers_defaults(tiny_t5_onnx, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "t5"
    shutil.copytree(tiny_t5_onnx, model_dir)
    manifest = json.loads((model_dir / "onnxgen.json").read_text())
    manifest["generation_defaults"] = {"num_beams": 3, "max_length": 7, "length_penalty": 2.0}
    (model_dir / "onnxgen.json").write_text(json.dumps(manifest))
    tg = TextGeneration(model_dir, device="cpu")
    plan = tg.plan({})
    assert (plan.num_beams, plan.length_penalty, plan.max_length) == (3, 2.0, 7)
    assert len(tg("summarize: a text", return_details=True).token_ids) <= 6  # max_length counts the start token
    assert tg.plan({"num_beams": 1, "max_new_tokens": 4}).num_beams == 1  # the caller still wins


def test_a_merged_batch_sheds_the_cache_columns_of_rows_that_left(gpt2):
    from onnxgen.generator import Generator

    generator = Generator(gpt2.model, gpt2.tokenizer.decode)
    long_prompt = gpt2.tokenizer.encode("The ticket costs 25 € or about £21, which is cheaper than last year.")
    short_prompt = gpt2.tokenizer.encode("The cat")
    (long,) = generator.add([long_prompt], [gpt2.plan(dict(do_sample=False, max_new_tokens=2))])
    generator.step()
    (short,) = generator.add([short_prompt], [gpt2.plan(dict(do_sample=False, max_new_tokens=12))])
    widths = []
    while not generator.is_done():
        generator.step()
        if generator.is_finished(long) and not generator.is_done():
            widths.append(generator.cohorts[0].state.attention_mask.shape[1])
    assert widths and max(widths) < len(long_prompt)  # only the short row's own columns remain
    tokens = generator.pop(short)[0].token_ids
    assert tokens == gpt2.generate_ids([short_prompt], do_sample=False, max_new_tokens=12)[0][0]
