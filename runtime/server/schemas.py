"""Request bodies in, validated requests out; anything wrong is a `RequestError` naming the field.

OpenAI's completion parameters map onto onnxgen's (transformers') generation parameters like this:

    OpenAI field         default   onnxgen parameter
    max_tokens           16        max_new_tokens
    temperature          1         temperature; 0 means greedy (do_sample=False), anything else samples
    top_p                1         top_p
    n                    1         num_return_sequences; at temperature 0 (greedy) the one greedy completion
                                   is repeated n times, as OpenAI does
    stop                 null      stop (up to 4 strings, cut from the text like OpenAI)
    seed                 null      seed (per-sequence generators: same seed, same text, whatever the batch)
    top_k (extra)        0         top_k; 0 = off, so temperature/top_p alone shape sampling as in OpenAI
    repetition_penalty   1         repetition_penalty
    no_repeat_ngram_size 0         no_repeat_ngram_size
    min_tokens           0         min_new_tokens
    num_beams            1         num_beams; beam search at temperature 0, beam sampling otherwise
    length_penalty       model's   length_penalty (beam search)
    early_stopping       model's   early_stopping (beam search)

The model's own generation_config.json sampling defaults do not apply on /v1/completions (OpenAI's defaults do);
/text-generation keeps Backprop's behaviour and the model's defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 5  # as OpenAI
MAX_N = 128  # as OpenAI
SEED_LIMIT = 2**63
MIN_POSITIVE = 1e-6  # smallest temperature / repetition_penalty: smaller ones underflow float32 in the runtime
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: length ** penalty must stay within float range
INT_LIMIT = 2**31 - 1  # larger counts are never meaningful and would overflow numpy's int32/int64 arithmetic


class RequestError(Exception):
    """An answer other than 200, as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable", 504: "timeout"}


def bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"the request body is not UTF-8: {exc.reason} at byte {exc.start}", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {kind_of(body)}", code="invalid_json")
    return body


# -- field checks --------------------------------------------------------------------------------------------
def kind_of(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def get_int(body: dict, name: str, default: int | None, low: int, high: int | None = INT_LIMIT) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {kind_of(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad(f"{name} must be {allowed}, got {_show(value)}", name, "invalid_value")
    return value


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def get_number(body: dict, name: str, default: float | None, low: float | None = None, *,
               low_open: bool = False, high: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {kind_of(value)}", name, "invalid_type")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range
        value = math.inf
    too_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        bounds = [f"> {low}" if low_open else f">= {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        allowed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise bad(f"{name} must be {allowed}, got {_show(value)}", name, "invalid_value")
    return value


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {kind_of(value)}", name, "invalid_type")
    return value


def get_stop(body: dict, name: str = "stop") -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"{name} must be a string or an array of strings, got {kind_of(value)}", name, "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"{name} takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", name, "invalid_value")
    if any(s == "" for s in stops):
        raise bad(f"{name} strings must not be empty", name, "invalid_value")
    return stops or None


def guard_floats(params: dict[str, Any]) -> None:
    """Values the runtime's float32 arithmetic cannot take, refused here with the parameter's name."""
    for name in ("temperature", "repetition_penalty"):
        value = params.get(name)
        if _is_number(value) and 0 < value < MIN_POSITIVE:
            allowed = "0 (greedy) or at least" if name == "temperature" else "at least"
            raise bad(f"{name} must be {allowed} {MIN_POSITIVE:g}, got {value:g}", name, "invalid_value")
    value = params.get("length_penalty")
    if _is_number(value) and abs(value) > MAX_LENGTH_PENALTY:
        raise bad(f"length_penalty must be between {-MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g}, got "
                  f"{_show(value)}", "length_penalty", "invalid_value")


# -- /v1/completions -----------------------------------------------------------------------------------------
# Fields OpenAI clients send with neutral values; anything else in them is a feature onnxgen lacks.
_NEUTRAL = {
    "presence_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "frequency_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
    "suffix": lambda v: v is None or v == "",
}
_EXTRAS = ("top_k", "repetition_penalty", "num_beams", "length_penalty", "min_tokens", "no_repeat_ngram_size",
           "early_stopping")
_OPENAI = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
           "seed", "user", "echo", "logprobs", "best_of")
KNOWN_FIELDS = frozenset(_OPENAI) | frozenset(_NEUTRAL) | frozenset(_EXTRAS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # text, or token ids as OpenAI allows
    n: int
    repeat_greedy: bool  # temperature 0 and n > 1: generate once, answer n copies
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    max_tokens: int
    params: dict[str, Any]  # onnxgen generation parameters, for TextGeneration.plan


def check_model(body: dict[str, Any], served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"model must be a non-empty string, got {kind_of(model)}", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    if model != served:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")
    return model


def parse_completion(body: dict[str, Any], vocab_size: int, served: str) -> CompletionRequest:
    model = check_model(body, served)
    for name in body:
        if name not in KNOWN_FIELDS:
            raise bad(f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
    for name, neutral in _NEUTRAL.items():
        if not neutral(body.get(name)):
            raise bad(f"{name} is not supported by onnxgen (only its neutral value is accepted), got "
                      f"{json.dumps(body.get(name))[:80]}", name, "unsupported_parameter")
    prompts = parse_prompt(body.get("prompt"), vocab_size)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad(f"user must be a string, got {kind_of(body['user'])}", "user", "invalid_type")
    n = get_int(body, "n", 1, 1, MAX_N)
    best_of = get_int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad(f"best_of different from n is not supported by onnxgen, got best_of={best_of}, n={n}", "best_of",
                  "unsupported_parameter")
    stream = get_bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    echo = get_bool(body, "echo", False)
    logprobs = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = get_int(body, "max_tokens", 16, 1, None)  # the server's limit is checked later
    temperature = get_number(body, "temperature", 1.0, 0.0)
    num_beams = get_int(body, "num_beams", 1, 1)
    greedy = temperature == 0
    if num_beams > 1:
        if n > num_beams:
            raise bad(f"n ({n}) must be <= num_beams ({num_beams}) with beam search", "n", "invalid_value")
        if logprobs is not None:
            raise bad("logprobs is not available with beam search (num_beams > 1)", "logprobs", "unsupported_parameter")
    if echo and logprobs is not None:
        raise bad("echo with logprobs is not supported: onnxgen does not score prompt tokens", "echo",
                  "unsupported_parameter")
    params = {
        "max_new_tokens": max_tokens,
        "do_sample": not greedy,
        "temperature": None if greedy else temperature,
        "top_p": get_number(body, "top_p", 1.0, 0.0, low_open=True, high=1.0),
        "top_k": get_int(body, "top_k", 0, 0),
        "num_return_sequences": 1 if greedy and num_beams == 1 else n,
        "num_beams": num_beams,
        "stop": get_stop(body),
        "seed": get_int(body, "seed", None, 0, SEED_LIMIT - 1),
        "repetition_penalty": get_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        "no_repeat_ngram_size": get_int(body, "no_repeat_ngram_size", 0, 0),
        "min_new_tokens": get_int(body, "min_tokens", 0, 0),
        "length_penalty": get_number(body, "length_penalty", None),
        "early_stopping": _early_stopping(body.get("early_stopping")),
    }
    guard_floats(params)
    if params["min_new_tokens"] > max_tokens:
        raise bad(f"min_tokens ({params['min_new_tokens']}) must be <= max_tokens ({max_tokens})", "min_tokens",
                  "invalid_value")
    return CompletionRequest(model, prompts, n, greedy and num_beams == 1 and n > 1, stream, include_usage, echo,
                             logprobs, max_tokens, params)


def parse_prompt(value: Any, vocab_size: int) -> list[str | list[int]]:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        code = "missing_required_parameter" if value is None else "invalid_type"
        raise bad(f"prompt must be a string or an array of strings or token ids, got {kind_of(value)}", "prompt", code)
    if not items:
        raise bad("prompt must not be an empty array", "prompt", "invalid_value")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise bad(f"prompt[{i}] is an empty string; give a non-empty prompt", "prompt", "invalid_value")
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if not all(0 <= t < vocab_size for t in item):
                raise bad(f"prompt[{i}] holds token ids outside [0, {vocab_size})", "prompt", "invalid_value")
        else:
            raise bad(f"prompt[{i}] must be a non-empty string or a non-empty array of token ids, got "
                      f"{kind_of(item)}", "prompt", "invalid_type")
    return items


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or any(k != "include_usage" for k in options):
        raise bad('stream_options must be an object with only "include_usage"', "stream_options", "invalid_value")
    if not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options", "invalid_value")
    return get_bool(options, "include_usage", False)


def _early_stopping(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool) or value == "never":
        return value
    raise bad(f'early_stopping must be true, false or "never", got {kind_of(value)}', "early_stopping", "invalid_value")


# Error messages from onnxgen's parameter checks start with the parameter's name.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n",
                 "num_generations": "n"}


def from_generation_error(exc: Exception, openai_names: bool) -> RequestError:
    """A ValueError/TypeError from `TextGeneration.plan` as a 400 naming the parameter."""
    message = str(exc)
    first = message.split(" ", 1)[0].strip("'\"(:,")
    if first == "unknown":  # "unknown generation parameter 'x' ..."
        first = message.split("'")[1] if "'" in message else None
    if openai_names and first in _OPENAI_NAMES:
        message = message.replace(first, _OPENAI_NAMES[first])
        first = _OPENAI_NAMES[first]
    return bad(message, first or None, "invalid_value")
