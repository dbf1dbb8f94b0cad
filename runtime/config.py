"""Generation parameters: one validated dataclass with transformers' names, and the rules that resolve it.

`GenerationConfig` holds what the caller asked for (``None`` = not given). `resolve()` turns it, together with
the model's defaults, into a `DecodingPlan`: every value concrete, the strategy decided. Per-prompt lengths are
settled later by `DecodingPlan.new_token_bounds`, because `max_length` counts the prompt.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 20  # transformers generates 20 new tokens when no maximum is given
EARLY_STOPPING_VALUES = (True, False, "never")


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


INT_MAX = 2**31 - 1  # counts and sizes beyond this are never meaningful and would overflow the int32 inputs
SEED_MAX = 2**63 - 1
FLOAT32_TINY = 1.2e-38  # a positive value below this becomes 0 in float32, where the processors compute


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # NumPy's bool is no int subclass


def _check_int(name: str, value: Any, minimum: int, maximum: int = INT_MAX) -> int:
    # NumPy integers and floats count as numbers (a pipeline often hands over an np.int64 it computed)
    if isinstance(value, numbers.Integral) and not _is_bool(value):
        value = int(value)
    elif isinstance(value, numbers.Real) and not _is_bool(value) and float(value).is_integer():
        value = int(value)
    else:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if not minimum <= value <= maximum:
        raise _fail(name, value, f"an integer in [{minimum}, {maximum}]")
    return value


def _check_float(name: str, value: Any) -> float:
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    try:
        value = float(value)
    except OverflowError:
        raise _fail(name, value, "a finite number") from None
    if not math.isfinite(value):
        raise _fail(name, value, "a finite number")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """What the caller asked for, with transformers' meaning for every field. ``None`` means not given."""

    max_new_tokens: int | None = None  # new tokens; wins over max_length
    max_length: int | None = None  # GPT-2: prompt + new tokens; T5: decoder length incl. the start token
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None  # 0 means greedy
    top_k: int | None = None  # 0 turns top-k off
    top_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None  # beam search: score / generated_length ** length_penalty
    num_beams: int | None = None
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    early_stopping: bool | str | None = None  # True, False or "never"
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_length", "num_beams", "num_return_sequences"):
            self._normalise(name, lambda n, v: _check_int(n, v, 1))
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            self._normalise(name, lambda n, v: _check_int(n, v, 0))
        self._normalise("seed", lambda n, v: _check_int(n, v, 0, SEED_MAX))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            self._normalise(name, _check_float)
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.temperature is not None and not (self.temperature == 0 or self.temperature >= FLOAT32_TINY):
            raise _fail("temperature", self.temperature, f"0 (greedy) or a number >= {FLOAT32_TINY:g}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:  # 0 keeps min_tokens_to_keep, as in transformers
            raise _fail("top_p", self.top_p, "a number in [0, 1]")
        if self.repetition_penalty is not None and self.repetition_penalty < FLOAT32_TINY:
            raise _fail(
                "repetition_penalty", self.repetition_penalty, f"a number >= {FLOAT32_TINY:g} (1.0 means no penalty)"
            )
        if self.early_stopping is not None and not any(
            self.early_stopping is v or self.early_stopping == v and isinstance(v, str) for v in EARLY_STOPPING_VALUES
        ):
            raise _fail("early_stopping", self.early_stopping, 'True, False or "never"')
        self._normalise_stop()
        self._check_contradictions()

    def _normalise(self, name: str, check) -> None:
        value = getattr(self, name)
        if value is not None:
            object.__setattr__(self, name, check(name, value))

    def _normalise_stop(self) -> None:
        stop = self.stop
        if stop is None:
            return
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise _fail("stop", self.stop, "non-empty strings")
        object.__setattr__(self, "stop", tuple(stop) or None)

    def _check_contradictions(self) -> None:
        if self.do_sample and self.temperature == 0:
            raise ValueError(
                "do_sample=True with temperature=0 is a contradiction: temperature must be > 0 when sampling "
                "(or drop do_sample / set temperature=0 alone for greedy decoding)"
            )
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        if (
            self.min_new_tokens is not None
            and self.max_new_tokens is not None
            and self.min_new_tokens > self.max_new_tokens
        ):
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ModelDefaults:
    """What a model brings: its generation_config.json values and its architecture's strategy default."""

    samples_by_default: bool  # GPT-2 samples (Backprop's behaviour), T5 is greedy
    sampling_temperature: float = 1.0  # GPT-2: 0.7, as Backprop
    generation_defaults: tuple[tuple[str, Any], ...] = ()
    max_positions: int | None = None  # prompt + new tokens may not exceed this (GPT-2's n_positions)

    def default(self, name: str) -> Any:
        return dict(self.generation_defaults).get(name)


@dataclass(frozen=True)
class DecodingPlan:
    """A request's resolved decoding: strategy decided, every value concrete."""

    do_sample: bool
    num_beams: int
    num_return_sequences: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    length_penalty: float
    no_repeat_ngram_size: int
    early_stopping: bool | str
    seed: int | None
    stop: tuple[str, ...]
    max_new_tokens: int | None
    max_length: int | None
    min_new_tokens: int
    min_length: int

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def rows_per_prompt(self) -> int:
        return self.num_beams if self.is_beam_search else self.num_return_sequences

    def new_token_bounds(self, prompt_length: int) -> tuple[int, int]:
        """(min_new, max_new) for one prompt; `prompt_length` is what max_length/min_length count (GPT-2: the
        prompt's tokens; T5: the decoder's start token)."""
        if self.max_new_tokens is not None:
            max_new = self.max_new_tokens
        elif self.max_length is not None:
            max_new = self.max_length - prompt_length
            if max_new < 1:
                raise ValueError(
                    f"max_length ({self.max_length}) leaves no room for new tokens after a prompt of {prompt_length} "
                    f"tokens; use max_new_tokens to count new tokens only"
                )
        else:
            max_new = DEFAULT_MAX_NEW_TOKENS
        min_new = max(self.min_new_tokens, self.min_length - prompt_length, 0)
        return min(min_new, max_new), max_new


def _pick(config: GenerationConfig, defaults: ModelDefaults, name: str, fallback: Any) -> Any:
    value = getattr(config, name)
    if value is not None:
        return value
    value = defaults.default(name)
    return fallback if value is None else value


def _decide_sampling(config: GenerationConfig, defaults: ModelDefaults) -> bool:
    if config.do_sample is not None:
        return config.do_sample
    if config.temperature is not None or config.top_k is not None or config.top_p is not None:
        return config.temperature != 0
    if (config.num_beams or 1) > 1:
        return False
    if (config.num_return_sequences or 1) > 1:
        return True
    model_choice = defaults.default("do_sample")
    if model_choice is not None:
        return bool(model_choice)
    if (defaults.default("num_beams") or 1) > 1:  # a model exported for beam search (do_sample=False goes unsaved)
        return False
    return defaults.samples_by_default


def resolve(config: GenerationConfig, defaults: ModelDefaults) -> DecodingPlan:
    """Apply issue #3's strategy rules and transformers' defaults, overridden by the model's defaults."""
    do_sample = _decide_sampling(config, defaults)
    num_beams = _pick(config, defaults, "num_beams", 1)
    num_return = config.num_return_sequences or 1
    temperature = config.temperature
    if temperature is None or temperature == 0:
        temperature = (defaults.default("temperature") or defaults.sampling_temperature) if do_sample else 1.0
    early_stopping = _pick(config, defaults, "early_stopping", False)
    if num_beams == 1 and not do_sample and num_return > 1:
        raise ValueError(
            f"num_generations ({num_return}) > 1 needs sampling or beam search: greedy decoding gives one "
            "sequence per prompt; set do_sample=True or num_beams >= num_generations"
        )
    if num_beams > 1 and num_return > num_beams:
        raise ValueError(f"num_generations ({num_return}) must be <= num_beams ({num_beams}) in beam search")
    max_new = config.max_new_tokens
    max_length = config.max_length
    if max_new is None and max_length is None:
        max_new = defaults.default("max_new_tokens")
        model_max_length = defaults.default("max_length")
        if max_new is None and model_max_length not in (None, 20):
            max_length = model_max_length  # a model's own max_length counts the prompt, as in transformers
    min_new = config.min_new_tokens if config.min_new_tokens is not None else defaults.default("min_new_tokens")
    min_length = config.min_length if config.min_length is not None else defaults.default("min_length")
    return DecodingPlan(
        do_sample=do_sample,
        num_beams=num_beams,
        num_return_sequences=num_return,
        temperature=float(temperature),
        top_k=int(_pick(config, defaults, "top_k", 50)),
        top_p=float(_pick(config, defaults, "top_p", 1.0)),
        repetition_penalty=float(_pick(config, defaults, "repetition_penalty", 1.0)),
        length_penalty=float(_pick(config, defaults, "length_penalty", 1.0)),
        no_repeat_ngram_size=int(_pick(config, defaults, "no_repeat_ngram_size", 0)),
        early_stopping=early_stopping,
        seed=config.seed,
        stop=config.stop or (),
        max_new_tokens=max_new,
        max_length=max_length,
        min_new_tokens=int(min_new or 0),
        min_length=int(min_length or 0),
    )
