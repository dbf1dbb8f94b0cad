"""Top alternatives per token (OpenAI's `top_logprobs`), read from the logits a generator step will use."""

from __future__ import annotations

from typing import Any

from ..generator import Generator


def as_dict(pair) -> dict[int, float] | None:
    if pair is None:
        return None
    ids, logprobs = pair
    return {int(i): float(lp) for i, lp in zip(ids, logprobs)}


def peek_alternatives(generator: Generator, wanted: dict[int, int]) -> dict[tuple[int, int], Any]:
    """(handle, sequence) -> (ids, logprobs) of the k most likely next tokens, for the prompts in `wanted`
    (handle -> k), read before the step that picks the token."""
    return generator.top_logprobs(wanted)
