"""Property-based fuzzing of the request schemas: whatever a client sends, the server answers below 500,
errors are OpenAI error objects, and successful answers have the documented shape."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxgen import TextGeneration
from onnxgen.server import ServerLimits
from server_helpers import MODEL_NAME, ThreadServer

# Small limits keep every accepted request cheap: at most 8 new tokens and 8 rows.
LIMITS = ServerLimits(max_prompt_tokens=64, max_tokens=8, max_batch_rows=8, max_queue=64, timeout=30,
                      max_body_bytes=16384)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 10) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.just(10**400))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
# Values at the edges of int32/int64/float32/float64, where numeric code breaks first.
extremes = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**400, -(2**63), 1e-300, 5e-324, 1e-40,
                            1e38, 1e39, 1e308, -1e308, 1e-7, 0.5e-6, 120.0, -120.0])
small_numbers = st.integers(-2, 10) | st.floats(-1.5, 3.0) | extremes | json_values
token_lists = st.lists(st.integers(-3, 1200), max_size=6)
prompts = (st.text(max_size=40) | st.lists(st.text(max_size=12), max_size=3) | token_lists
           | st.lists(st.lists(st.integers(0, 999), max_size=3), max_size=2) | json_values)

COMPLETION_FIELDS = {
    "model": st.sampled_from([MODEL_NAME, MODEL_NAME, "gpt-4", ""]) | json_values,
    "prompt": prompts,
    "max_tokens": small_numbers,
    "temperature": st.sampled_from([0, 0.0, 1]) | small_numbers,
    "top_p": small_numbers,
    "n": small_numbers,
    "stream": st.booleans() | json_values,
    "stream_options": st.just({"include_usage": True}) | json_values,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
    "seed": st.integers() | json_values,
    "user": st.text(max_size=8) | json_values,
    "echo": st.booleans() | json_values,
    "logprobs": small_numbers,
    "best_of": small_numbers,
    "presence_penalty": st.just(0) | small_numbers,
    "frequency_penalty": st.just(0) | small_numbers,
    "logit_bias": st.just({}) | json_values,
    "suffix": st.none() | json_values,
    "top_k": small_numbers,
    "repetition_penalty": small_numbers,
    "num_beams": st.integers(1, 4) | small_numbers,
    "length_penalty": small_numbers,
    "min_tokens": small_numbers,
    "no_repeat_ngram_size": small_numbers,
    "early_stopping": st.sampled_from([True, False, "never"]) | json_values,
}
BACKPROP_FIELDS = {
    "text": prompts,
    "max_length": small_numbers, "max_new_tokens": small_numbers, "min_length": small_numbers,
    "min_new_tokens": small_numbers, "do_sample": st.booleans() | json_values, "temperature": small_numbers,
    "top_k": small_numbers, "top_p": small_numbers, "repetition_penalty": small_numbers,
    "length_penalty": small_numbers, "num_beams": small_numbers, "num_generations": small_numbers,
    "no_repeat_ngram_size": small_numbers, "early_stopping": json_values, "seed": small_numbers,
    "stop": json_values, "return_full_text": st.booleans() | json_values,
}
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2)


def bodies(fields: dict, required: dict) -> st.SearchStrategy[dict]:
    return st.builds(lambda fixed, optional, extra: {**extra, **fixed, **optional},
                     st.fixed_dictionaries(required), st.fixed_dictionaries({}, optional=fields),
                     st.one_of(st.just({}), unknown_fields))


@pytest.fixture(scope="module")
def server(tiny_gpt2_onnx):
    with ThreadServer(TextGeneration(tiny_gpt2_onnx, device="cpu"), limits=LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with server.http() as client:
        yield client


def check_answer(response, stream: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
        return
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            payload = json.loads(event)
            assert "error" not in payload, payload
            assert payload["object"] == "text_completion"
    else:
        payload = response.json()
        assert "choices" in payload or "output" in payload


@FUZZ
@given(body=bodies(COMPLETION_FIELDS, {"model": st.just(MODEL_NAME), "prompt": st.text(min_size=1, max_size=30)}))
def test_completions_never_answer_5xx(http, body):
    response = http.post("/v1/completions", content=json.dumps(body, allow_nan=True))
    check_answer(response, stream=body.get("stream") is True and response.status_code == 200)


@FUZZ
@given(body=bodies(COMPLETION_FIELDS, {}))
def test_completions_with_any_fields_never_answer_5xx(http, body):
    response = http.post("/v1/completions", content=json.dumps(body, allow_nan=True))
    check_answer(response, stream=body.get("stream") is True and response.status_code == 200)


@FUZZ
@given(body=bodies(BACKPROP_FIELDS, {"text": st.text(min_size=1, max_size=30)}))
def test_text_generation_never_answers_5xx(http, body):
    check_answer(http.post("/text-generation", content=json.dumps(body, allow_nan=True)), stream=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/completions", "/text-generation"]))
def test_raw_bytes_never_answer_5xx(http, raw, path):
    check_answer(http.post(path, content=raw), stream=False)
