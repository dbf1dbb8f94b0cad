"""The HTTP server, end to end: uvicorn on loopback, driven by the official openai client and by raw httpx.

Each answer is checked against a direct `TextGeneration` call on the same model, so the server adds transport,
not behaviour.
"""

from __future__ import annotations

import dataclasses

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from onnxgen import TextGeneration
from onnxgen.server import ServerLimits
from server_helpers import MODEL_NAME, ProcessServer, ThreadServer, sse_events

LIMITS = ServerLimits(max_prompt_tokens=100, max_tokens=250, max_batch_rows=16, max_queue=16, max_body_bytes=65536)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_onnx) -> TextGeneration:
    return TextGeneration(tiny_gpt2_onnx, device="cpu")


@pytest.fixture(scope="module")
def server(gpt2):
    with ThreadServer(gpt2, limits=LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.openai()


def greedy(tg: TextGeneration, prompt: str, max_tokens: int, **params) -> str:
    return tg(prompt, do_sample=False, max_new_tokens=max_tokens, return_full_text=False, **params)


# -- completions through the openai client ----------------------------------------------------------------
def test_greedy_completion_matches_a_direct_call(client, gpt2):
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = answer.choices
    assert choice.text == greedy(gpt2, PROMPT, 12)
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert answer.object == "text_completion" and answer.model == MODEL_NAME and answer.id.startswith("cmpl-")
    prompt_tokens = len(gpt2.tokenizer.encode(PROMPT))
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 12


def test_openai_default_is_16_tokens_of_sampling(client):
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, extra_body={"min_tokens": 16})
    assert answer.usage.completion_tokens == 16 and answer.choices[0].finish_reason == "length"


def test_stream_concatenates_to_the_non_streamed_text(client, gpt2):
    pieces, reasons = [], []
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == greedy(gpt2, PROMPT, 20)
    assert len(pieces) > 2  # token by token, not one blob
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens >= 1


def test_stream_ends_with_done_on_the_wire(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["choices"][0]["index"] == 0 for c in chunks)


def test_n_at_temperature_zero_repeats_the_greedy_text_for_each_prompt(client, gpt2):
    prompts = [PROMPT, "Hello, my dog is"]
    answer = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, n=3, temperature=0)
    assert [c.index for c in answer.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        texts = {c.text for c in answer.choices[i * 3 : i * 3 + 3]}
        assert texts == {greedy(gpt2, prompt, 8)}
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, n=3, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in answer.choices}


def test_sampling_with_a_seed_is_reproducible_and_n_sequences_differ(client):
    def ask():
        answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, n=2, seed=7,
                                           temperature=1.0, extra_body={"min_tokens": 10})
        return [c.text for c in answer.choices]

    first = ask()
    assert first == ask()
    assert first[0] != first[1]


def test_token_id_prompts(client, gpt2):
    ids = gpt2.tokenizer.encode(PROMPT)
    answer = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in answer.choices] == [greedy(gpt2, PROMPT, 6)] * 2


def test_stop_string_cuts_the_text_in_both_modes(client, gpt2):
    full = greedy(gpt2, PROMPT, 20)
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip())
    expected = full[: full.find(stop)]
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_echo_puts_the_prompt_in_front(client, gpt2):
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert answer.choices[0].text == PROMPT + greedy(gpt2, PROMPT, 5)
    chunks = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text


def test_logprobs(client, gpt2):
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    choice = answer.choices[0]
    details = gpt2(PROMPT, do_sample=False, max_new_tokens=8, return_details=True)
    lp = choice.logprobs
    assert lp.token_logprobs == pytest.approx(details.logprobs, abs=1e-5)
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == len(details.token_ids)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and value <= 0
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if "\ufffd" not in choice.text:
        assert "".join(lp.tokens) == choice.text
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                         stream=True)
    values = [v for c in streamed for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert values == pytest.approx(details.logprobs, abs=1e-5)


def test_logprob_tokens_join_to_the_text_when_characters_span_tokens(client):
    split = 0
    for seed in range(30):
        answer = client.completions.create(model=MODEL_NAME, prompt="café", max_tokens=20, seed=seed, logprobs=1,
                                           extra_body={"min_tokens": 20})
        choice, tokens = answer.choices[0], answer.choices[0].logprobs.tokens
        assert len(tokens) == len(choice.logprobs.text_offset) == answer.usage.completion_tokens == 20
        if "\ufffd" not in choice.text:  # a sequence may end inside a character
            assert "".join(tokens) == choice.text
        assert choice.logprobs.text_offset == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        split += "" in tokens  # a token that only starts a character
    assert split  # the byte-level tokenizer did split characters across tokens here


def test_beam_search_as_extra_fields(client, gpt2):
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, n=2,
                                       extra_body={"num_beams": 3, "length_penalty": 1.0})
    expected = gpt2(PROMPT, num_beams=3, num_generations=2, max_new_tokens=8, return_full_text=False)
    assert [c.text for c in answer.choices] == expected
    stop = expected[0][len(expected[0]) // 2 :][:2]
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, n=2, stop=stop,
                                        extra_body={"num_beams": 3, "length_penalty": 0.0})
    direct = gpt2(PROMPT, num_beams=3, num_generations=2, max_new_tokens=8, return_full_text=False, stop=stop,
                  length_penalty=0.0, return_details=True)
    assert [c.text for c in stopped.choices] == [d.text for d in direct]
    assert all(stop not in c.text for c in stopped.choices)
    assert [c.finish_reason for c in stopped.choices] == [{"stop": "stop", "eos": "stop"}.get(d.finish_reason, "length")
                                                         for d in direct]


def test_onnxgen_extras_change_the_output_like_a_direct_call(client, gpt2):
    extras = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "top_k": 5}
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body=extras)
    expected = greedy(gpt2, PROMPT, 10, repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert answer.choices[0].text == expected


def test_neutral_openai_defaults_are_accepted(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": None, "user": "someone", "n": 1,
            "logprobs": None, "echo": False, "stream": False, "stop": None, "top_p": 1}
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_unknown_model_is_a_404_error_object(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="davinci-002", prompt=PROMPT, max_tokens=3)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "davinci-002" in error["message"]


# -- bad input: every class is a 4xx error object naming the field ----------------------------------------
def _body(**fields):
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, **fields}


BAD_REQUESTS = [
    ("malformed json", b'{"model": "tiny", "prompt": ', 400, None),
    ("not utf-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("not an object", b'["tiny"]', 400, None),
    ("missing model", {"prompt": PROMPT}, 400, "model"),
    ("model not a string", _body(model=3), 400, "model"),
    ("unknown model", _body(model="gpt-4"), 404, "model"),
    ("missing prompt", {"model": MODEL_NAME}, 400, "prompt"),
    ("empty prompt", _body(prompt=""), 400, "prompt"),
    ("empty prompt list", _body(prompt=[]), 400, "prompt"),
    ("empty prompt in a list", _body(prompt=["a", ""]), 400, "prompt"),
    ("prompt of the wrong type", _body(prompt={"text": "a"}), 400, "prompt"),
    ("token id out of range", _body(prompt=[1, 10**6]), 400, "prompt"),
    ("prompt over the limit", _body(prompt="word " * 300), 400, "prompt"),
    ("max_tokens a string", _body(max_tokens="16"), 400, "max_tokens"),
    ("max_tokens zero", _body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens over the limit", _body(max_tokens=251), 400, "max_tokens"),
    ("max_tokens past the context", _body(prompt="word " * 90, max_tokens=250), 400, "prompt"),
    ("max_tokens a bool", _body(max_tokens=True), 400, "max_tokens"),
    ("temperature negative", _body(temperature=-0.5), 400, "temperature"),
    ("temperature a string", _body(temperature="hot"), 400, "temperature"),
    ("top_p zero", _body(top_p=0), 400, "top_p"),
    ("top_p above one", _body(top_p=1.5), 400, "top_p"),
    ("n zero", _body(n=0), 400, "n"),
    ("n too many rows", _body(n=17), 400, "n"),
    ("rows over the limit through prompts", _body(prompt=["a"] * 9, n=2), 400, "prompt"),
    ("stream not a bool", _body(stream="yes"), 400, "stream"),
    ("stream_options without stream", _body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stop empty string", _body(stop=""), 400, "stop"),
    ("five stop strings", _body(stop=list("abcde")), 400, "stop"),
    ("stop of numbers", _body(stop=[1]), 400, "stop"),
    ("seed negative", _body(seed=-1), 400, "seed"),
    ("seed too big", _body(seed=2**64), 400, "seed"),
    ("logprobs above five", _body(logprobs=6), 400, "logprobs"),
    ("echo with logprobs", _body(echo=True, logprobs=1), 400, "echo"),
    ("presence_penalty", _body(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty", _body(frequency_penalty=-1), 400, "frequency_penalty"),
    ("logit_bias", _body(logit_bias={"50": 10}), 400, "logit_bias"),
    ("best_of above n", _body(best_of=3), 400, "best_of"),
    ("suffix", _body(suffix="end"), 400, "suffix"),
    ("user not a string", _body(user=5), 400, "user"),
    ("unknown field", _body(max_new_tokens=5), 400, "max_new_tokens"),
    ("top_k negative", _body(top_k=-1), 400, "top_k"),
    ("repetition_penalty zero", _body(repetition_penalty=0), 400, "repetition_penalty"),
    ("num_beams below n", _body(num_beams=2, n=3, temperature=0), 400, "n"),
    ("min_tokens above max_tokens", _body(min_tokens=4), 400, "min_tokens"),
    ("early_stopping a number", _body(early_stopping=2), 400, "early_stopping"),
    ("nan temperature", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("huge float max_tokens", _body(max_tokens=1e308), 400, "max_tokens"),
]


@pytest.mark.parametrize("body, status, param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_error_object_naming_the_field(server, body, status, param):
    with server.http() as http:
        if isinstance(body, bytes):
            response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_input_through_the_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, presence_penalty=1.0)
    assert caught.value.body["param"] == "presence_penalty"


def test_oversized_body_is_413(server):
    with server.http() as http:
        response = http.post("/v1/completions", json=_body(prompt="x" * 70_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_chat_completions_explains_there_is_no_chat_template(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in caught.value.body["message"]


def test_unknown_route_and_wrong_method_are_error_objects(server):
    with server.http() as http:
        missing, wrong = http.get("/v2/nothing"), http.get("/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong.status_code == 405 and "error" in wrong.json()


# -- Backprop's /text-generation ---------------------------------------------------------------------------
def test_text_generation_in_backprops_shape(server, gpt2):
    params = {"max_new_tokens": 6, "do_sample": False}
    with server.http() as http:
        one = http.post("/text-generation", json={"text": PROMPT, **params}).json()
        many = http.post("/text-generation", json={"text": [PROMPT, "Hello"], **params}).json()
        beams = http.post("/text-generation", json={"text": PROMPT, "num_beams": 3, "num_generations": 2,
                                                    "max_new_tokens": 6}).json()
        bad = http.post("/text-generation", json={"text": PROMPT, "temprature": 1.0})
    assert one == {"output": gpt2(PROMPT, **params)}
    assert many == {"output": gpt2([PROMPT, "Hello"], **params)}
    assert beams == {"output": gpt2(PROMPT, num_beams=3, num_generations=2, max_new_tokens=6)}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temprature"
    assert "temperature" in bad.json()["error"]["message"]  # the suggestion


def test_text_generation_with_t5(tiny_t5_onnx):
    t5 = TextGeneration(tiny_t5_onnx, device="cpu")
    with ThreadServer(t5) as running, running.http() as http:
        output = http.post("/text-generation", json={"text": "translate: hello", "max_new_tokens": 6}).json()
        client = running.openai()
        answer = client.completions.create(model=MODEL_NAME, prompt="summarize: a dog", max_tokens=6, temperature=0)
        streamed = client.completions.create(model=MODEL_NAME, prompt="summarize: a dog", max_tokens=6,
                                             temperature=0, stream=True)
        streamed_text = "".join(c.choices[0].text for c in streamed)
    assert output == {"output": t5("translate: hello", max_new_tokens=6)}
    assert answer.choices[0].text == greedy(t5, "summarize: a dog", 6) == streamed_text


def test_t5_max_length_counts_decoder_tokens_in_a_running_server(tiny_t5_onnx):
    # max_length below the prompt's length is valid for T5 (it counts the decoder); the engine once measured it
    # against the encoder prompt when a batch was already there, failed on its thread and never answered
    t5 = TextGeneration(tiny_t5_onnx, device="cpu")
    prompt = "the quick brown fox jumps over the lazy dog " * 2
    assert len(t5.tokenizer.encode(prompt)) > 4
    with ThreadServer(t5, limits=dataclasses.replace(LIMITS, timeout=20)) as running, running.http() as http:
        assert http.post("/text-generation", json={"text": "hello", "max_new_tokens": 2}).status_code == 200
        answer = http.post("/text-generation", json={"text": prompt, "max_length": 4, "do_sample": False})
        completion = running.openai().completions.create(model=MODEL_NAME, prompt="a dog", max_tokens=3, temperature=0)
    assert answer.status_code == 200 and answer.json() == {"output": t5(prompt, max_length=4, do_sample=False)}
    assert completion.choices[0].text == greedy(t5, "a dog", 3)


# -- health, metrics -----------------------------------------------------------------------------------------
def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    with server.http() as http:
        health = http.get("/health")
        metrics = http.get("/metrics")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("onnxgen_requests_total{", "onnxgen_generated_tokens_total", "onnxgen_queue_depth",
                 "onnxgen_request_duration_seconds_bucket", "onnxgen_time_to_first_token_seconds_count"):
        assert name in text
    assert 'onnxgen_requests_total{endpoint="/v1/completions",status="200"}' in text


# -- continuous batching -------------------------------------------------------------------------------------
def test_a_short_request_finishes_while_a_long_one_is_generating(server):
    long_body = _body(max_tokens=240, min_tokens=240, temperature=0, stream=True, prompt="Hi")
    times: dict[str, float] = {}
    chunks_after_short: list[float] = []
    started = threading.Event()

    def run_long():
        with server.http() as http, http.stream("POST", "/v1/completions", json=long_body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    if "short" in times:
                        chunks_after_short.append(time.monotonic())
        times["long"] = time.monotonic()

    thread = threading.Thread(target=run_long)
    thread.start()
    assert started.wait(30)
    with server.http() as http:
        short = http.post("/v1/completions", json=_body(max_tokens=3))
    times["short"] = time.monotonic()
    thread.join(60)
    assert short.status_code == 200
    assert times["short"] < times["long"]
    assert len(chunks_after_short) > 10  # the long one kept generating after the short one was answered


def test_a_client_that_disconnects_stops_its_rows(server):
    before = server.context.metrics.generated_tokens.value()
    body = _body(max_tokens=240, min_tokens=240, temperature=0, stream=True, prompt="Hi")
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 4:
                break  # leaving the block closes the connection
    deadline = time.monotonic() + 10
    while server.context.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.context.engine.running == 0
    assert server.context.metrics.generated_tokens.value() - before < 200


# -- limits ---------------------------------------------------------------------------------------------------
class _SlowState:
    """A model state that takes `delay` seconds per step, so a request lasts as long as a test needs."""

    def __init__(self, state, delay: float):
        self._state, self._delay = state, delay

    def step(self, token_ids):
        time.sleep(self._delay)
        return self._state.step(token_ids)

    def extend(self, other: _SlowState) -> None:
        self._state.extend(other._state)

    def __getattr__(self, name):
        return getattr(self._state, name)


class _SlowModel:
    def __init__(self, model, delay: float):
        self._model, self._delay = model, delay

    def prefill(self, prompts, max_new_tokens=None):
        prefill = self._model.prefill(prompts, max_new_tokens)
        prefill.state = _SlowState(prefill.state, self._delay)
        return prefill

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def slow_gpt2(tiny_gpt2_onnx) -> TextGeneration:
    """GPT-2 at 20 ms a step: 50 tokens take a second."""
    tg = TextGeneration(tiny_gpt2_onnx, device="cpu")
    tg.model = _SlowModel(tg.model, 0.02)
    return tg


def test_full_queue_is_429_with_retry_after(slow_gpt2):
    limits = ServerLimits(max_batch_rows=1, max_queue=1)
    long_body = _body(max_tokens=50, min_tokens=50, temperature=0, stream=True)
    with ThreadServer(slow_gpt2, limits=limits) as running, running.http() as http:
        with http.stream("POST", "/v1/completions", json=long_body) as first:  # takes the only row
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            waiting = threading.Thread(target=lambda: running.http().post("/v1/completions", json=_body()))
            waiting.start()  # waits in the queue
            deadline = time.monotonic() + 10
            while running.context.engine.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            refused = http.post("/v1/completions", json=_body())
            assert running.context.engine.running == 1  # the first one was still generating
        waiting.join(30)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"


def test_timeout_is_504_or_a_stream_error(slow_gpt2):
    limits = ServerLimits(timeout=0.2)
    with ThreadServer(slow_gpt2, limits=limits) as running, running.http() as http:
        response = http.post("/v1/completions", json=_body(max_tokens=50, min_tokens=50, temperature=0))
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in running.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=50, temperature=0,
                                                         stream=True, extra_body={"min_tokens": 50}):
                pass
        assert http.post("/v1/completions", json=_body(max_tokens=2)).status_code == 200
        # A timed-out request's rows leave at the engine's next step boundary, which may come just after the
        # short request answered: wait for it rather than race it.
        deadline = time.monotonic() + 10
        while running.context.engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.context.engine.running == 0
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"


def test_sigterm_drains_the_requests_in_flight_then_exits(tiny_gpt2_onnx):
    body = _body(max_tokens=200, min_tokens=200, temperature=0, stream=True, prompt="Hi")
    with ProcessServer(tiny_gpt2_onnx, "--max-tokens-limit", "250") as running:
        with httpx.Client(base_url=running.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                running.process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once drained, so a supervisor sees "terminated by SIGTERM"
        assert running.process.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(running.base_url + "/health", timeout=2)
        running.reader.join(10)
        log = running.log()
    (line,) = [json.loads(x) for x in log.splitlines() if x.startswith('{"event": "request"')]
    assert line["path"] == "/v1/completions" and line["status"] == 200 and line["completion_tokens"] == 200


# -- the engine on its own ------------------------------------------------------------------------------------
class _Collector:
    """A job's sink that records what the engine sends (called on the engine thread)."""

    def __init__(self):
        self.messages: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, message: tuple) -> None:
        self.messages.append(message)
        if message[0] in ("done", "error"):
            self.done.set()

    def tokens(self) -> list[int]:
        return [out.token_ids for m in self.messages if m[0] == "prompt_done" for out in m[2]][0]


def test_engine_starts_a_fresh_generator_when_the_batch_cache_would_outgrow_its_budget(gpt2):
    from onnxgen.server.engine import Engine, Job

    engine = Engine(gpt2.model, gpt2.tokenizer.decode, width_budget=40)
    plan = gpt2.plan({"do_sample": False, "max_new_tokens": 20, "min_new_tokens": 20})
    prompt = gpt2.tokenizer.encode(PROMPT)
    expected = gpt2.generate_ids([prompt], do_sample=False, max_new_tokens=20, min_new_tokens=20)[0][0]
    sinks, generators = [], set()
    try:
        for _ in range(4):  # each joins while the one before is half-way through
            sink = _Collector()
            sinks.append(sink)
            engine.submit(Job([prompt], plan, sink, stream=True))
            while sum(len(m[1]) for m in list(sink.messages) if m[0] == "tokens") < 10 and not sink.done.is_set():
                generators.update(id(b.generator) for b in list(engine._batches))
                time.sleep(0.001)
        assert all(sink.done.wait(30) for sink in sinks)
    finally:
        engine.stop()
    assert [sink.tokens() for sink in sinks] == [expected] * 4
    assert len(generators) >= 2  # 4 + 10 steps + 20 new tokens past 40 columns: the third started afresh


def test_a_long_prompt_that_would_push_a_running_job_past_the_budget_starts_a_fresh_generator(gpt2):
    from onnxgen.server.engine import Engine, Job

    engine = Engine(_SlowModel(gpt2.model, 0.005), gpt2.tokenizer.decode, width_budget=60)  # A outlasts B's arrival
    short, long_prompt = [5, 6, 7], list(range(10, 40))
    plans = [gpt2.plan({"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}) for n in (40, 5)]
    sinks = [_Collector(), _Collector()]
    jobs = [Job([short], plans[0], sinks[0], stream=True), Job([long_prompt], plans[1], sinks[1])]
    try:
        engine.submit(jobs[0])
        while sum(len(m[1]) for m in list(sinks[0].messages) if m[0] == "tokens") < 3:
            time.sleep(0.001)
        # alone it fits (30 + 5 <= 60), but joining would left-pad the running job by ~24 columns: 3 + 40 + 24 > 60
        engine.submit(jobs[1])
        assert all(sink.done.wait(30) for sink in sinks)
    finally:
        engine.stop()
    assert jobs[0]._batch is not jobs[1]._batch
    for sink, prompt, plan in zip(sinks, (short, long_prompt), plans):
        n = plan.max_new_tokens
        assert sink.tokens() == gpt2.generate_ids([prompt], do_sample=False, max_new_tokens=n, min_new_tokens=n)[0][0]


def test_a_stream_whose_client_is_gone_before_the_first_byte_stops_its_job(gpt2):
    import asyncio

    from onnxgen.server.completions import JobStreamingResponse
    from onnxgen.server.engine import Engine, Job

    engine = Engine(_SlowModel(gpt2.model, 0.005), gpt2.tokenizer.decode)
    sink = _Collector()
    job = Job([[5, 6, 7]], gpt2.plan({"do_sample": False, "max_new_tokens": 200, "min_new_tokens": 200}), sink,
              stream=True)

    async def body():  # never started: the client is gone when the headers are sent
        raise AssertionError("the body should not run")
        yield b""

    async def send(message):
        raise OSError("connection reset by peer")

    async def receive():
        return {"type": "http.disconnect"}

    try:
        engine.submit(job)
        response = JobStreamingResponse(engine, job, body(), media_type="text/event-stream")
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(Exception):  # starlette turns the OSError into ClientDisconnect
            asyncio.run(response(scope, receive, send))
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and job.cancelled
        assert job.generated_tokens < 200  # the rows left early instead of generating for nobody
    finally:
        engine.stop()


def test_queued_jobs_behind_one_that_waits_for_rows_time_out_and_free_their_place(gpt2):
    from onnxgen.server.engine import Engine, Job, Overloaded

    engine = Engine(_SlowModel(gpt2.model, 0.01), gpt2.tokenizer.decode, max_batch_rows=1, max_queue=2)
    plan = gpt2.plan({"do_sample": False, "max_new_tokens": 100, "min_new_tokens": 100})
    sinks = {name: _Collector() for name in "ABCDE"}
    jobs = {name: Job([[5, 6, 7]], plan, sinks[name], timeout=0.2 if name == "C" else None) for name in "ABCDE"}
    try:
        engine.submit(jobs["A"])  # takes the only row for ~1 s
        while engine.running == 0:
            time.sleep(0.001)
        engine.submit(jobs["B"])  # first in the queue, waiting for the row
        engine.submit(jobs["C"])  # behind it, with a short timeout
        assert sinks["C"].done.wait(0.8)  # answered while A still runs, not once it reached the front
        assert sinks["C"].messages[-1][:2] == ("error", 504) and not sinks["A"].done.is_set()
        engine.submit(jobs["D"])
        engine.cancel(jobs["D"])  # a client that left while queued
        engine.submit(jobs["E"])  # the queue holds B and D: D's place is free again
        with pytest.raises(Overloaded):
            engine.submit(Job([[5]], plan, _Collector()))
    finally:
        engine.stop()


def test_engine_fails_only_the_job_whose_prefill_fails(gpt2):
    from onnxgen.server.engine import Engine, Job

    engine = Engine(gpt2.model, gpt2.tokenizer.decode)
    good_plan = gpt2.plan({"do_sample": False, "max_new_tokens": 5})
    # The config refuses this temperature; a plan built around it fails only inside the generator's add.
    bad_plan = dataclasses.replace(gpt2.plan({"do_sample": True, "max_new_tokens": 5}), temperature=1e-300)
    prompt = gpt2.tokenizer.encode(PROMPT)
    good, bad = _Collector(), _Collector()
    with engine._cond:  # both are admitted in the same iteration, so they are prefilled together
        engine._inbox.extend([Job([prompt], bad_plan, bad), Job([prompt], good_plan, good)])
    try:
        engine.submit(Job([prompt], good_plan, _Collector()))
        assert good.done.wait(30) and bad.done.wait(30)
    finally:
        engine.stop()
    assert bad.messages[-1][:2] == ("error", 500)
    assert good.messages[-1] == ("done",) and good.tokens() == greedy_ids(gpt2, prompt, 5)


def greedy_ids(tg: TextGeneration, prompt: list[int], max_tokens: int) -> list[int]:
    return tg.generate_ids([prompt], do_sample=False, max_new_tokens=max_tokens)[0][0]
