"""The protocol between the model layer and the search: rows of token ids in, next-token logits out.

The search never sees tensors, sessions or caches; the model never sees processors or strategies. Tests drive
the search with a scripted fake that implements these two small classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ModelState(Protocol):
    """The keys/values of a batch of rows, advanced one token per row per step."""

    @property
    def num_rows(self) -> int: ...

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one token per row ((R,) int64); return the next-token logits (R, V) float32."""

    def select(self, rows: np.ndarray) -> None:
        """Keep rows `rows` ((R',) int64, repeats allowed) in that order: beam reordering, expanding a prompt
        into several sequences, and dropping finished rows are all this one gather."""

    # Optional: a state whose graph also computes log_softmax of the logits sets `logprobs` (R, V) float32 to that
    # of the logits the last `step` returned; the generator computes what it needs from the logits otherwise.


@dataclass
class Prefill:
    state: ModelState
    logits: np.ndarray  # (R, V) float32: next-token logits after each prompt
    history: np.ndarray  # (R, L) int64: what transformers' processors see as input_ids (left-padded)
    prompt_lengths: np.ndarray  # (R,) int64: what max_length/min_length count (GPT-2: prompt; T5: 1)
    logprobs: np.ndarray | None = None  # (R, V) log_softmax(logits), where the graph computes it


class LanguageModel(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def prefill(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> Prefill:
        """Run the prompts (one row each) and return the state ready for `step`. `max_new_tokens`, when known, is
        the most tokens any row will add: a model with preallocated buffers sizes them by it."""
