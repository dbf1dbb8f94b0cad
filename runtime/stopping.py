"""Stop strings: end a sequence when its decoded text contains one, and cut the text before it (OpenAI's rule)."""

from __future__ import annotations

from collections.abc import Callable

from .tokenizer import common_prefix_length


class StopStringWatcher:
    """Watches the sequences of one prompt. Only the text that changed since the last check (plus the longest
    stop string's overlap) is searched, so checking costs one decode per token, not a rescan.

    Decoded text does not only grow: a character split across tokens decodes as U+FFFD until its last byte
    arrives, and the tokenizer's clean-up can join a new token to the text before it. So what counts as already
    searched is the prefix the new text shares with the last one, not the last one's length.
    """

    def __init__(self, stops: tuple[str, ...], detokenize: Callable[[list[int]], str] | None):
        if detokenize is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")
        self.stops = stops
        self.detokenize = detokenize
        self.overlap = max(len(s) for s in stops) - 1
        self.last_text: dict[int, str] = {}

    def check(self, sequence: int, token_ids: list[int]) -> str | None:
        """The text before the first stop string, or None while no stop string has appeared."""
        text = self.detokenize(token_ids)
        unchanged = common_prefix_length(self.last_text.get(sequence, ""), text)
        self.last_text[sequence] = text
        return text_before_stop(text, self.stops, max(0, unchanged - self.overlap))


def text_before_stop(text: str, stops: tuple[str, ...], start: int = 0) -> str | None:
    """`text` cut before the first stop string found at or after `start`, or None if none is there."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return text[: min(found)] if found else None

