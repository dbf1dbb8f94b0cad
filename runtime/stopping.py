"""Stop strings: end a sequence when its decoded text contains one, and cut the text before it (OpenAI's rule)."""

from __future__ import annotations

from collections.abc import Callable


class StopStringWatcher:
    """Watches the sequences of one prompt. Only the text that is new since the last check (plus the longest
    stop string's overlap) is searched, so checking costs one decode per token, not a rescan."""

    def __init__(self, stops: tuple[str, ...], detokenize: Callable[[list[int]], str] | None):
        if detokenize is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")
        self.stops = stops
        self.detokenize = detokenize
        self.overlap = max(len(s) for s in stops) - 1
        self.checked: dict[int, int] = {}

    def check(self, sequence: int, token_ids: list[int]) -> str | None:
        """The text before the first stop string, or None while no stop string has appeared."""
        text = self.detokenize(token_ids)
        start = max(0, self.checked.get(sequence, 0) - self.overlap)
        self.checked[sequence] = len(text)
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else None
