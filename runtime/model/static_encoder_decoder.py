"""T5 over the static key/value layout (`manifest.STATIC_KV`): the encoder graph runs once per prompt and
writes every decoder layer's cross-attention keys/values; the decoder graph runs one token per row per call, the
decoder start token included, into self-attention buffers written in place.

A batch owns three arrays, each with rows on one axis so that beams are reordered by one gather per array:

    kv     (layers, 2, rows allocated, heads, capacity, head_size)        self-attention, grown by KV_CHUNK
    cross  (layers, 2, rows allocated, heads, encoder width, head_size)   cross-attention, fixed per batch
    mask   (rows allocated, encoder width) int32                          the encoder's padding, 1 = token

Views of the first R rows are bound once as inputs (and, for `kv`, as outputs too) along with the step's small
inputs and the logits, which are updated in place; a step is four small writes and one `run`. Both graphs take
embedding rows, read here from the token table file (`token_table`). Every row of one
prefill holds the same number of decoder tokens, but rows taken in by `extend` may not: each row's position is
its own `seqlens_k`, and GroupQueryAttention attends to 0 .. seqlens_k[b] only.

`history` and `prompt_lengths` are EncoderDecoderModel's: the decoder start token, and 1 per row, so
max_length/min_length count decoder tokens as transformers does for T5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..manifest import Manifest, check_graph_io
from .base import Prefill
from .buffers import Lineage, move_rows
from .encoder_decoder import special_token_ids
from .session import (
    TRIM_AFTER_TOKENS, create_session, import_onnxruntime, prefill_run_options, release_freed_heap,
)
from .token_table import check_token_ids, load_token_table

KV_CHUNK = 128  # decoder positions added to the self-attention buffers at a time


class StaticEncoderDecoderModel:
    """The sessions of T5 graphs built by onnxgen's builder; `prefill` encodes a batch, its state steps it."""

    def __init__(self, manifest: Manifest, directory: Path, device: str, intra_op_threads: int | None = None):
        if device != "cpu":
            raise ValueError(
                f"this model directory holds the static key/value layout ({', '.join(manifest.optimizations)}), which "
                f"runs on device='cpu' only (onnxruntime's CUDA GroupQueryAttention takes float16, not float32); "
                f"got {device!r}"
            )
        self.sessions = {}
        for name in ("encoder", "decoder"):
            session = create_session(directory / manifest.graphs[name].file, device, intra_op_threads)
            check_graph_io(
                manifest, name, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
            )
            self.sessions[name] = session
        self.ort = import_onnxruntime()
        self.device = device
        self.num_layers = manifest.num_layers
        self.num_heads = manifest.num_heads
        self.head_size = manifest.head_size
        self.vocab_size = manifest.vocab_size
        self.token_table = load_token_table(directory, manifest, np.dtype(np.float32))
        self.eos_token_ids, self.pad_token_id, self.decoder_start_token_id = special_token_ids(manifest)
        layers = range(self.num_layers)
        self.kv_names = [f"{i}.decoder.{kv}" for i in layers for kv in ("key", "value")]  # after past_key_values.
        self.cross_names = [f"{i}.encoder.{kv}" for i in layers for kv in ("key", "value")]  # or present.

    def prefill(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> Prefill:
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) == 0:
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        rows, width = len(prompts), max(lengths)
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)  # right-padded, as T5 pads
        mask = np.zeros((rows, width), dtype=np.int64)
        for r, prompt in enumerate(prompts):
            input_ids[r, : len(prompt)] = prompt
            mask[r, : len(prompt)] = 1
        check_token_ids(input_ids, self.vocab_size)
        cross = self.encode(input_ids, mask)
        capacity = KV_CHUNK if max_new_tokens is None else 1 + max(max_new_tokens, 1)  # the start token first
        state = StaticEncoderDecoderState(self, self.new_buffer(rows, capacity), cross, mask.astype(np.int32))
        start = np.full((rows, 1), self.decoder_start_token_id, dtype=np.int64)
        logits = state.step(start[:, 0])
        if input_ids.size >= TRIM_AFTER_TOKENS:
            release_freed_heap()
        return Prefill(state, logits, start, prompt_lengths=np.ones(rows, dtype=np.int64), logprobs=state.logprobs)

    def encode(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(layers, 2, R, heads, S, head_size): the encoder writes each layer's keys/values into its view."""
        rows, width = input_ids.shape
        cross = np.empty((self.num_layers, 2, rows, self.num_heads, width, self.head_size), dtype=np.float32)
        binding = self.sessions["encoder"].io_binding()
        binding.bind_cpu_input("inputs_embeds", self.token_table[input_ids])
        binding.bind_cpu_input("attention_mask", mask)
        values = [self.ort.OrtValue.ortvalue_from_numpy(cross[i, k]) for i in range(self.num_layers) for k in range(2)]
        for name, value in zip(self.cross_names, values):
            binding.bind_ortvalue_output(f"present.{name}", value)
        self.sessions["encoder"].run_with_iobinding(binding, prefill_run_options())
        return cross

    def new_buffer(self, rows: int, capacity: int) -> np.ndarray:
        """(layers, 2, rows, heads, capacity, head_size) float32 zeros (calloc: pages are touched when written)."""
        return np.zeros((self.num_layers, 2, rows, self.num_heads, capacity, self.head_size), dtype=np.float32)


@dataclass
class _StepIO:
    """The binding of a step and the arrays behind its small inputs and its logits, updated in place."""

    binding: object
    inputs_embeds: np.ndarray  # (R, 1, D) float32
    seqlens_k: np.ndarray  # (R,) int32
    total: np.ndarray  # () int32
    logits: np.ndarray  # (R, V) float32
    logprobs: np.ndarray  # (R, V) float32
    values: list = field(default_factory=list)  # the OrtValues, kept alive with the arrays they wrap


class StaticEncoderDecoderState:
    def __init__(self, model: StaticEncoderDecoderModel, kv: np.ndarray, cross: np.ndarray, mask: np.ndarray):
        self.model = model
        self.kv = kv  # (L, 2, rows allocated >= R, N, capacity, H)
        self.cross = cross  # (L, 2, rows allocated, N, S, H)
        self.mask = mask  # (rows allocated, S) int32
        self.lengths = np.zeros(cross.shape[2], dtype=np.int64)  # (R,) decoder tokens held by each row
        # (R,) which encoded prompt each row's cross keys/values and mask hold: beams of one prompt share it, so
        # reordering them copies self-attention rows only.
        self.sources = np.arange(cross.shape[2], dtype=np.int64)
        self._io: _StepIO | None = None  # rebuilt when the rows or the buffers change
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

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one decoder token per row ((R,) int64); return the next-token logits (R, V)."""
        longest = int(self.lengths.max()) + 1  # tokens in the longest row after this step
        self._reserve(longest)
        io = self._io = self._io or self._bind()
        self.model.token_table.lookup(token_ids, out=io.inputs_embeds[:, 0])
        io.seqlens_k[:] = self.lengths  # tokens after this step - 1: the new token's position
        io.total[...] = longest
        self.model.sessions["decoder"].run_with_iobinding(io.binding)
        self.lengths += 1
        if self.reuse_outputs:
            self.logprobs = io.logprobs
            return io.logits
        self.logprobs = io.logprobs.copy()  # the next step overwrites both
        return io.logits.copy()

    def select(self, rows: np.ndarray) -> None:
        """Keep rows `rows` in that order; only rows whose source changes are copied: self-attention past what the
        row already shares with its source (`Lineage`) up to the longest source, the encoder side where the
        prompt changes."""
        rows = np.asarray(rows, dtype=np.int64)
        count = rows.shape[0]
        if count == self.num_rows and np.array_equal(rows, np.arange(count)):
            return
        self.lineage.settle(self.lengths)
        used = int(self.lengths[rows].max()) if count else 0
        if count > self.mask.shape[0]:  # expanding past the allocation: new arrays
            kv = self.model.new_buffer(count, self.capacity)
            kv[:, :, :, :, :used] = self.kv[:, :, rows, :, :used]
            # Indexing a middle axis gives a transposed, non-contiguous array; bound as it is, onnxruntime would
            # read a private copy, and later in-place moves of `cross` would not reach the graph.
            self.kv, self.cross, self.mask = kv, np.ascontiguousarray(self.cross[:, :, rows]), self.mask[rows]
        else:
            moved = np.flatnonzero(rows != np.arange(count))
            if moved.size:
                sources = rows[moved]
                length = np.zeros(count, dtype=np.int64)  # decoder tokens each target row holds now
                length[: min(count, self.num_rows)] = self.lengths[:count]
                limit = np.minimum(length[moved], self.lengths[sources])
                targets = np.where(moved < self.num_rows, moved, 0)  # `limit` is 0 where no row is held
                move_rows(self.kv, moved, sources, used, self.lineage.shared(targets, sources, limit))
                held = np.full(count, -1, dtype=np.int64)  # rows past the current ones hold nothing we know
                held[: min(count, self.num_rows)] = self.sources[:count]
                encoded = moved[held[moved] != self.sources[rows[moved]]]  # another prompt's encoding is needed
                move_rows(self.cross, encoded, rows[encoded], self.cross.shape[4])
                self.mask[encoded] = self.mask[rows[encoded]]
        if count != self.num_rows:  # the bound views have the old row count
            self._io = None
        self.lengths = self.lengths[rows]
        self.sources = self.sources[rows]
        self.lineage.select(rows)

    def extend(self, other: StaticEncoderDecoderState) -> None:
        """Take in rows prefilled separately (continuous batching). Self-attention rows are right-padded and
        concatenate as they are; the encoder side is padded to the wider batch, the padding masked out."""
        self.lineage.settle(self.lengths)  # before the rows mix: each side's own positions get its own stamps
        other.lineage.settle(other.lengths)
        rows = self.num_rows + other.num_rows
        width = max(self.mask.shape[1], other.mask.shape[1])
        kv = self.model.new_buffer(rows, max(self.capacity, other.capacity))
        cross = np.zeros(self.cross.shape[:2] + (rows, self.cross.shape[3], width, self.cross.shape[5]), np.float32)
        mask = np.zeros((rows, width), dtype=np.int32)
        for start, state in ((0, self), (self.num_rows, other)):
            end, used, s = start + state.num_rows, int(state.lengths.max(initial=0)), state.mask.shape[1]
            kv[:, :, start:end, :, :used] = state.kv[:, :, : state.num_rows, :, :used]
            cross[:, :, start:end, :, :s] = state.cross[:, :, : state.num_rows]
            mask[start:end, :s] = state.mask[: state.num_rows]
        self.kv, self.cross, self.mask = kv, cross, mask
        self.lengths = np.concatenate([self.lengths, other.lengths])
        self.lineage.extend(other.lineage, self.capacity)
        self.sources = np.concatenate([self.sources, other.sources + self.sources.max(initial=-1) + 1])
        self._io = None

    def _reserve(self, positions: int) -> None:
        """Make room for `positions` decoder tokens in every row, growing the buffers by whole chunks."""
        if positions <= self.capacity:
            return
        kv = self.model.new_buffer(self.kv.shape[2], -(-positions // KV_CHUNK) * KV_CHUNK)
        kv[:, :, :, :, : self.capacity] = self.kv
        self.kv = kv
        self.lineage.grow(self.capacity)
        self._io = None

    def _bind(self) -> _StepIO:
        model, rows = self.model, self.num_rows
        ort = model.ort
        binding = model.sessions["decoder"].io_binding()
        io = _StepIO(
            binding, np.zeros((rows, 1, model.token_table.shape[1]), np.float32), np.zeros(rows, np.int32),
            np.zeros((), np.int32),
            np.zeros((rows, model.vocab_size), dtype=np.float32), np.zeros((rows, model.vocab_size), dtype=np.float32),
        )

        def bind_input(name: str, array: np.ndarray):
            if not array.flags.c_contiguous:  # it would be copied, and updates in place would never be seen
                raise AssertionError(f"{name} is bound from a non-contiguous array")
            value = ort.OrtValue.ortvalue_from_numpy(array)  # CPU: wraps the array, no copy
            io.values.append(value)
            binding.bind_ortvalue_input(name, value)
            return value

        bind_input("inputs_embeds", io.inputs_embeds)
        bind_input("seqlens_k", io.seqlens_k)
        bind_input("total_sequence_length", io.total)
        bind_input("encoder_attention_mask", self.mask[:rows])
        for name in ("logits", "logprobs"):
            value = ort.OrtValue.ortvalue_from_numpy(getattr(io, name))
            io.values.append(value)
            binding.bind_ortvalue_output(name, value)
        for index, (name, cross) in enumerate(zip(model.kv_names, model.cross_names)):
            layer, kind = divmod(index, 2)
            value = bind_input(f"past_key_values.{name}", self.kv[layer, kind, :rows])
            binding.bind_ortvalue_output(f"present.{name}", value)  # the same memory: GQA writes in place
            bind_input(f"past_key_values.{cross}", self.cross[layer, kind, :rows])
        return io
