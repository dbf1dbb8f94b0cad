"""GPT-2 over the static key/value layout (`manifest.STATIC_KV`): fixed buffers written in place, one bound graph.

Each layer's keys and values live in one NumPy array per batch, ``kv`` of shape
(layers, 2, rows allocated, heads, capacity, head_size). The views ``kv[layer, k_or_v, :rows]`` are bound as both
the graph's past input and its present output, so GroupQueryAttention writes each new position into them and
nothing is reallocated or copied between steps. Rows are right-padded: row r holds its tokens at positions
0 .. lengths[r] - 1, and the graph is told ``seqlens_k = lengths - 1`` after the call's tokens.

The buffers start at the prompt plus the new tokens the generator asks for, when it says; the capacity grows in
chunks of :data:`KV_CHUNK` positions (up to the model's ``max_positions``) when a row would outgrow it; the copy
that costs happens once per chunk. The step's small inputs and the logits are
preallocated arrays bound once and updated in place, so a step is four small writes and one `run`. The graph
takes the new tokens' embedding rows, read here from the token table file (`token_table`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..manifest import Manifest
from .base import Prefill
from .buffers import Lineage, move_rows
from .decoder_only import Gpt2Session
from .session import TRIM_AFTER_TOKENS, import_onnxruntime, prefill_run_options, release_freed_heap
from .token_table import check_token_ids, load_token_table

KV_CHUNK = 128  # positions added to the buffers at a time


class StaticDecoderModel(Gpt2Session):
    """The session of a GPT-2 graph built by onnxgen's builder; `prefill` starts a batch, its state steps it."""

    def __init__(self, manifest: Manifest, directory: Path, device: str, intra_op_threads: int | None = None):
        if device != "cpu":
            raise ValueError(
                f"this model directory holds the static key/value layout ({', '.join(manifest.optimizations)}), which "
                f"runs on device='cpu' only (onnxruntime's CUDA GroupQueryAttention takes float16, not float32); "
                f"got {device!r}"
            )
        super().__init__(manifest, directory, device, intra_op_threads)
        self.ort = import_onnxruntime()
        layers = range(self.num_layers)  # (past input, present output) per layer, key then value
        self.buffer_names = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in layers for kv in ("key", "value")]
        # float32, or float16 for a graph built at fp16 precision (int8 graphs keep float32 keys/values).
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = np.dtype(np.float16 if types[self.buffer_names[0][0]] == "tensor(float16)" else np.float32)
        embeds_dtype = np.dtype(np.float16 if types["inputs_embeds"] == "tensor(float16)" else np.float32)
        self.token_table = load_token_table(directory, manifest, embeds_dtype)

    def prefill(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> Prefill:
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        if lengths.size == 0 or lengths.min() == 0:
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        rows, width = len(prompts), int(lengths.max())
        self.check_positions(width)
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)  # right-padded for the graph
        history = np.full((rows, width), self.pad_token_id, dtype=np.int64)  # left-padded, as transformers has it
        for r, prompt in enumerate(prompts):
            input_ids[r, : len(prompt)] = prompt
            history[r, width - len(prompt) :] = prompt
        check_token_ids(input_ids, self.vocab_size)
        # Exactly what the rows will hold when the generator says how many tokens they add (batch 8, 32 + 64
        # tokens: 54 MiB instead of 72 at a whole chunk); chunks otherwise, and for rows that outgrow it.
        capacity = self.capacity_for(width) if max_new_tokens is None else width + max(max_new_tokens, 1)
        capacity = min(capacity, self.max_positions) if self.max_positions else capacity
        state = StaticDecoderState(self, self.new_buffer(rows, capacity), lengths)
        logits, logprobs = state.run_prompt(input_ids)
        if input_ids.size >= TRIM_AFTER_TOKENS:
            release_freed_heap()
        return Prefill(state, logits, history, prompt_lengths=lengths.copy(), logprobs=logprobs)

    def capacity_for(self, positions: int) -> int:
        """Buffer length for `positions` tokens: the next multiple of KV_CHUNK, at most max_positions."""
        capacity = -(-positions // KV_CHUNK) * KV_CHUNK
        return min(capacity, self.max_positions) if self.max_positions else capacity

    def check_positions(self, positions: int) -> None:
        if self.max_positions and positions > self.max_positions:
            raise ValueError(
                f"a sequence of {positions} tokens exceeds the model's {self.max_positions} positions "
                "(prompt plus generated tokens); shorten the prompt or lower max_new_tokens"
            )

    def new_buffer(self, rows: int, capacity: int) -> np.ndarray:
        """(layers, 2, rows, heads, capacity, head_size) zeros (calloc: pages are touched when written)."""
        return np.zeros((self.num_layers, 2, rows, self.num_heads, capacity, self.head_size), dtype=self.kv_dtype)


@dataclass
class _StepIO:
    """The binding of a one-token step and the arrays behind its inputs and logits, updated in place."""

    binding: object
    inputs_embeds: np.ndarray  # (R, 1, D) the graph's float type
    position_ids: np.ndarray  # (R, 1) int64
    seqlens_k: np.ndarray  # (R,) int32
    total: np.ndarray  # () int32
    logits: np.ndarray  # (R, V) float32
    logprobs: np.ndarray  # (R, V) float32
    values: list = field(default_factory=list)  # the OrtValues, kept alive with the arrays they wrap


class StaticDecoderState:
    def __init__(self, model: StaticDecoderModel, kv: np.ndarray, lengths: np.ndarray):
        self.model = model
        self.kv = kv  # (L, 2, rows allocated >= R, H, capacity, D)
        self.lengths = lengths.astype(np.int64)  # (R,) tokens held by each row
        self._io: _StepIO | None = None  # rebuilt when the rows or the buffer change
        self.logprobs: np.ndarray | None = None  # log_softmax of the logits the last step returned
        # True: `step` returns (and sets `logprobs` to) the bound output arrays themselves, which the next step
        # overwrites; for a caller that is done with them by then (the generator), it saves two copies a step.
        self.reuse_outputs = False
        self.lineage = Lineage(self.num_rows, self.capacity)  # which positions rows share, so moves skip them

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def run_prompt(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row starts empty; input_ids (R, S) right-padded. Returns each row's last-position logits and
        their log_softmax."""
        rows, width = input_ids.shape
        positions = np.tile(np.arange(width, dtype=np.int64), (rows, 1))
        io = self._bind(self.model.token_table[input_ids], positions, (self.lengths - 1).astype(np.int32), width)
        self.model.session.run_with_iobinding(io.binding, prefill_run_options())
        return io.logits, io.logprobs

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one token per row ((R,) int64); return the next-token logits (R, V)."""
        longest = int(self.lengths.max()) + 1  # tokens in the longest row after this step
        self._reserve(longest)
        io = self._io
        if io is None:
            rows = self.num_rows
            table = self.model.token_table
            io = self._io = self._bind(
                np.zeros((rows, 1, table.shape[1]), table.dtype), np.zeros((rows, 1), np.int64),
                np.zeros(rows, np.int32), 0,
            )
        self.model.token_table.lookup(token_ids, out=io.inputs_embeds[:, 0])
        io.position_ids[:, 0] = self.lengths  # the new token's position is the count of tokens before it
        io.seqlens_k[:] = self.lengths  # tokens after this step - 1
        io.total[...] = longest
        self.model.session.run_with_iobinding(io.binding)
        self.lengths += 1
        if self.reuse_outputs:
            self.logprobs = io.logprobs
            return io.logits
        self.logprobs = io.logprobs.copy()  # the next step overwrites both
        return io.logits.copy()

    def select(self, rows: np.ndarray) -> None:
        """Keep rows `rows` in that order; only rows whose source changes are copied, and of those only the
        positions past what the row already shares with its source (`Lineage`) up to the longest source."""
        rows = np.asarray(rows, dtype=np.int64)
        count = rows.shape[0]
        if count == self.num_rows and np.array_equal(rows, np.arange(count)):
            return
        self.lineage.settle(self.lengths)
        if count > self.kv.shape[2]:  # expanding past the allocation: a new buffer
            used = int(self.lengths[rows].max())
            kv = self.model.new_buffer(count, self.capacity)
            kv[:, :, :, :, :used] = self.kv[:, :, rows, :, :used]
            self.kv = kv
        else:
            moved = np.flatnonzero(rows != np.arange(count))
            if moved.size:
                sources = rows[moved]
                used = int(self.lengths[sources].max())
                held = np.zeros(count, dtype=np.int64)  # what each target row holds now (rows past ours: nothing)
                held[: min(count, self.num_rows)] = self.lengths[:count]
                limit = np.minimum(held[moved], self.lengths[sources])
                targets = np.where(moved < self.num_rows, moved, 0)  # `limit` is 0 where no row is held
                move_rows(self.kv, moved, sources, used, self.lineage.shared(targets, sources, limit))
        if count != self.num_rows:  # the bound views have the old row count
            self._io = None
        self.lengths = self.lengths[rows]
        self.lineage.select(rows)

    def extend(self, other: StaticDecoderState) -> None:
        """Take in rows prefilled separately (continuous batching): right-padded rows concatenate as they are."""
        self.lineage.settle(self.lengths)  # before the rows mix: each side's own positions get its own stamps
        other.lineage.settle(other.lengths)
        capacity = max(self.capacity, other.capacity)
        kv = self.model.new_buffer(self.num_rows + other.num_rows, capacity)
        for start, state in ((0, self), (self.num_rows, other)):
            used = int(state.lengths.max()) if state.num_rows else 0
            kv[:, :, start : start + state.num_rows, :, :used] = state.kv[:, :, : state.num_rows, :, :used]
        self.kv = kv
        self.lengths = np.concatenate([self.lengths, other.lengths])
        self.lineage.extend(other.lineage, capacity)
        self._io = None

    def _reserve(self, positions: int) -> None:
        """Make room for `positions` tokens in every row, growing the buffers by whole chunks."""
        if positions <= self.capacity:
            return
        self.model.check_positions(positions)
        kv = self.model.new_buffer(self.kv.shape[2], self.model.capacity_for(positions))
        kv[:, :, :, :, : self.capacity] = self.kv
        self.kv = kv
        self.lineage.grow(self.capacity)
        self._io = None

    def _bind(self, inputs_embeds, position_ids, seqlens_k, total: int) -> _StepIO:
        ort = self.model.ort
        rows = self.num_rows
        binding = self.model.session.io_binding()
        io = _StepIO(
            binding, inputs_embeds, position_ids, seqlens_k, np.array(total, dtype=np.int32),
            np.zeros((rows, self.model.vocab_size), dtype=np.float32),
            np.zeros((rows, self.model.vocab_size), dtype=np.float32),
        )
        for name in ("inputs_embeds", "position_ids", "seqlens_k", "total"):
            value = ort.OrtValue.ortvalue_from_numpy(getattr(io, name))  # CPU: wraps the array, no copy
            io.values.append(value)
            binding.bind_ortvalue_input("total_sequence_length" if name == "total" else name, value)
        for name in ("logits", "logprobs"):
            value = ort.OrtValue.ortvalue_from_numpy(getattr(io, name))
            io.values.append(value)
            binding.bind_ortvalue_output(name, value)
        for layer in range(self.model.num_layers):
            for kind in range(2):
                value = ort.OrtValue.ortvalue_from_numpy(self.kv[layer, kind, :rows])
                io.values.append(value)
                past, present = self.model.buffer_names[2 * layer + kind]
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)  # the same memory: GQA writes in place
        return io
