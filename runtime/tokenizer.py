"""Text <-> ids through the `tokenizers` library alone, decoding as transformers' `decode()` does."""

from __future__ import annotations

from pathlib import Path

from .manifest import TokenizerSpec

# transformers' `clean_up_tokenization`: spaces that old word-level tokenizers put before punctuation and
# English contractions. Applied only when the exported tokenizer asked for it.
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


INCOMPLETE_CHARACTER = "\ufffd"  # what decoding shows for a character whose bytes have not all arrived


def common_prefix_length(old: str, new: str) -> int:
    """How many leading characters `new` shares with `old` (decoded text mostly grows, so that is checked first)."""
    if new.startswith(old):  # the usual step: the text grew
        return len(old)
    low, high = 0, min(len(old), len(new))  # old[:low] == new[:low], and the prefixes differ beyond high
    while low < high:
        middle = (low + high + 1) // 2
        if new.startswith(old[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


class TextTokenizer:
    def __init__(self, directory: str | Path, spec: TokenizerSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self.backend = Tokenizer.from_file(str(Path(directory) / spec.file))
        self.backend.no_padding()
        self.backend.no_truncation()
        if spec.split_special_tokens:
            self.backend.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=self.spec.add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=self.spec.add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self.spec.clean_up_tokenization_spaces else text

    def incremental_decoder(self, stops: tuple[str, ...] = ()) -> IncrementalDecoder:
        """A streaming decoder whose pieces join to what `decode` gives for the whole sequence."""
        if not self.spec.clean_up_tokenization_spaces:
            return IncrementalDecoder(self.decode, stops)
        raw = lambda ids: self.backend.decode(list(ids), skip_special_tokens=True)  # noqa: E731
        return IncrementalDecoder(raw, stops, clean_up=clean_up_tokenization)


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces that never need rewriting.

    Each call decodes the whole sequence and emits what is new, holding back a trailing replacement character
    (a multi-byte character whose bytes have not all arrived) and any tail that could be the start of a stop
    string, so the concatenated pieces always equal the final text.

    With `clean_up` (transformers' clean-up of spaces before punctuation), `decode` gives the text before it, and
    only what the clean-up can no longer change is emitted: its patterns all start with a space and span at most
    four characters, so text cut where the last three characters hold no space cleans up the same whatever
    follows. (A clean-up pass can undo another's rewrite: "x ' " reads "x'" until a "." makes it "x '.".)
    """

    def __init__(self, decode, stops: tuple[str, ...] = (), clean_up=None):
        self.decode = decode
        self.stops = stops
        self.clean_up = clean_up
        self.emitted = 0

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == INCOMPLETE_CHARACTER:
            end -= 1
        for stop in self.stops:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:size], 0, end):
                    end = min(end, len(text[:end]) - size)
                    break
        return max(end, self.emitted)

    def piece(self, ids: list[int]) -> str:
        text = self.decode(ids)
        if self.clean_up is not None:
            text = self.clean_up(text[: _settled_end(text)])
        end = self._safe_end(text)
        out = text[self.emitted : end]
        self.emitted = end
        return out

    def finish(self, final_text: str) -> str:
        out = final_text[self.emitted :]
        self.emitted = len(final_text)
        return out


def _settled_end(raw: str) -> int:
    """The longest prefix of `raw` whose clean-up no later text can change: one whose last three characters
    hold no space (no clean-up pattern can then span its end)."""
    end = len(raw)
    while end and INCOMPLETE_CHARACTER == raw[end - 1]:
        end -= 1
    while (space := raw.rfind(" ", max(0, end - 3), end)) >= 0:
        end = space  # cut before that space, then check the characters before the new end the same way
    return end
