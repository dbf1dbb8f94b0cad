"""Stop strings are found however the decoded text changes from one token to the next."""

from __future__ import annotations

import pytest

from onnxgen import TextGeneration
from onnxgen.stopping import StopStringWatcher
from onnxgen.tokenizer import clean_up_tokenization


def _watch(stops, detokenize, sequence_ids):
    """Feed the watcher one more token at a time; -> (index of the token that ended it, text) or None."""
    watcher = StopStringWatcher(tuple(stops), detokenize)
    for end in range(1, len(sequence_ids) + 1):
        text = watcher.check(0, sequence_ids[:end])
        if text is not None:
            return end, text
    return None


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_onnx):
    return TextGeneration(tiny_gpt2_onnx, device="cpu").tokenizer


@pytest.mark.parametrize("stop", ["你", "Hi 你", "你好", "ok 🙂"])
def test_a_stop_string_ending_in_a_character_split_across_tokens(tokenizer, stop):
    text = "well Hi 你好 and ok 🙂 then"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()) + 4  # the byte-level tokenizer spells these characters in several tokens
    assert any("\ufffd" in tokenizer.decode(ids[:end]) for end in range(len(ids)))
    ended = _watch([stop], tokenizer.decode, ids)
    assert ended is not None, f"{stop!r} was never found"
    end, before = ended
    assert before == text[: text.index(stop)]
    assert stop in tokenizer.decode(ids[:end]) and stop not in tokenizer.decode(ids[: end - 1])


def test_a_stop_string_that_appears_when_clean_up_joins_text(tokenizer):
    words = ["x", " '", "s", " more", " words"]

    def detokenize(ids):  # transformers' clean-up shortens "x 's" to "x's": the text grows by nothing here
        return clean_up_tokenization("".join(words[i] for i in ids))

    assert len(detokenize([0, 1])) == len(detokenize([0, 1, 2]))
    assert _watch(["x's"], detokenize, list(range(len(words)))) == (3, "")


def test_only_what_changed_is_searched_again():
    searched = []

    class Text(str):
        def find(self, sub, start=0, *args):
            searched.append(start)
            return str.find(self, sub, start, *args)

    pieces = ["ab", "cd", "ef", "gh"]
    assert _watch(["zzz"], lambda ids: Text("".join(pieces[i] for i in ids)), [0, 1, 2, 3]) is None
    assert searched == [0, 0, 2, 4]  # each check starts two characters (the stop's overlap) before the new text
