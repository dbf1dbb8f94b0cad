"""Write the checkpoint's tokenizer as the single ``tokenizer.json`` the runtime reads with `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnxgen.manifest import TokenizerSpec

TOKENIZER_FILE = "tokenizer.json"


def write_tokenizer(tokenizer: Any, directory: Path) -> TokenizerSpec:
    """Save the fast tokenizer's backend and describe what transformers does on top of it.

    ``tokenizer`` is a transformers ``PreTrainedTokenizerFast``; T5's sentencepiece model has already been
    converted to a fast tokenizer when it was loaded with ``use_fast=True``.
    """
    from tokenizers import Tokenizer

    # A copy without padding or truncation: the runtime pads batches itself and must see whole prompts.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(directory / TOKENIZER_FILE))
    return TokenizerSpec(
        file=TOKENIZER_FILE,
        clean_up_tokenization_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
        add_special_tokens=True,
    )
