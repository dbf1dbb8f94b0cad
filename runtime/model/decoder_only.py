"""GPT-2: one decoder graph runs the prompt (empty past) and every later step (one token, growing past)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import Manifest, check_graph_io
from .base import Prefill
from .kv_cache import KVCache
from .session import create_session, device_id, prefill_run_options


class Gpt2Session:
    """The decoder session of a GPT-2 directory, checked against its manifest, and the settings every GPT-2
    layout shares."""

    def __init__(self, manifest: Manifest, directory: Path, device: str, intra_op_threads: int | None = None):
        spec = manifest.graphs["decoder"]
        self.session = create_session(directory / spec.file, device, intra_op_threads)
        check_graph_io(
            manifest, "decoder", [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        )
        self.device = device
        self.num_layers = manifest.num_layers
        self.num_heads = manifest.num_heads
        self.head_size = manifest.head_size
        self.vocab_size = manifest.vocab_size
        self.max_positions = manifest.max_positions
        tokens = manifest.special_tokens
        self.eos_token_ids = tokens.eos_token_ids
        # GPT-2 has no padding token; transformers pads with EOS, and so do we (the ids reach the processors).
        self.pad_token_id = tokens.pad_token_id if tokens.pad_token_id is not None else tokens.eos_token_id or 0


class DecoderOnlyModel(Gpt2Session):
    """GPT-2 over optimum's graph: `prefill` starts a batch, the returned state steps it."""

    def __init__(self, manifest: Manifest, directory: Path, device: str, intra_op_threads: int | None = None):
        super().__init__(manifest, directory, device, intra_op_threads)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def prefill(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> Prefill:
        rows = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((rows, width), dtype=np.int64)
        for r, prompt in enumerate(prompts):
            input_ids[r, width - len(prompt) :] = prompt
            attention_mask[r, width - len(prompt) :] = 1
        # transformers' GPT-2 positions: count real tokens only; padding gets position 1 (masked anyway).
        position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1) - 1, 1)
        cache = KVCache(self.device, device_id(self.device))
        empty = np.zeros((rows, self.num_heads, 0, self.head_size), dtype=np.float32)
        for name in self.past_names:
            cache.set_numpy(name, empty)
        state = DecoderOnlyState(self, cache, attention_mask, attention_mask.sum(axis=1))
        logits = state.run(input_ids, position_ids, prefill_run_options())
        return Prefill(state=state, logits=logits, history=input_ids, prompt_lengths=attention_mask.sum(axis=1))


class DecoderOnlyState:
    def __init__(self, model: DecoderOnlyModel, cache: KVCache, attention_mask: np.ndarray, next_positions: np.ndarray):
        self.model = model
        self.cache = cache
        self.attention_mask = attention_mask  # (R, T) int64, T = tokens seen so far incl. padding
        self.next_positions = next_positions.astype(np.int64)  # (R,)

    @property
    def num_rows(self) -> int:
        return self.attention_mask.shape[0]

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, run_options=None) -> np.ndarray:
        session = self.model.session
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", self.attention_mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        self.cache.bind(binding)
        binding.bind_output("logits", "cpu")
        for name in self.model.present_names:
            binding.bind_output(name, self.cache.device, self.cache.device_id)
        session.run_with_iobinding(binding, run_options)
        outputs = binding.get_outputs()
        for past, present in zip(self.model.past_names, outputs[1:]):
            self.cache.set_value(past, present)
        return np.ascontiguousarray(outputs[0].numpy()[:, -1, :], dtype=np.float32)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        rows = self.num_rows
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        logits = self.run(token_ids.reshape(rows, 1).astype(np.int64), self.next_positions.reshape(rows, 1))
        self.next_positions += 1
        return logits

    def select(self, rows: np.ndarray) -> None:
        mask = self.attention_mask[rows]
        # Rows that joined a batch were left-padded to its width; once the longer rows leave, leading columns
        # that every remaining row masks are dropped, so the cache never outgrows its live rows.
        start = int(np.argmax(mask.any(axis=0))) if mask.size else 0
        self.cache.select(rows, start)
        self.attention_mask = mask[:, start:]
        self.next_positions = self.next_positions[rows]

    def extend(self, other: DecoderOnlyState) -> None:
        """Take in rows prefilled separately (continuous batching): caches and masks are left-padded to the
        longer of the two, so every row keeps its own positions."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        self.cache.extend(other.cache, length)
        self.attention_mask = np.concatenate(
            [_pad_mask(self.attention_mask, length), _pad_mask(other.attention_mask, length)]
        )
        self.next_positions = np.concatenate([self.next_positions, other.next_positions])


def _pad_mask(mask: np.ndarray, length: int) -> np.ndarray:
    missing = length - mask.shape[1]
    return mask if missing == 0 else np.concatenate([np.zeros((mask.shape[0], missing), mask.dtype), mask], axis=1)
