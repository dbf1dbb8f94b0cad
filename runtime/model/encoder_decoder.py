"""T5: the encoder runs once; the first decoder step computes the cross-attention keys/values, which every
later step (decoder_with_past) reuses along with the growing self-attention cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import Manifest, check_graph_io
from .base import Prefill
from .kv_cache import KVCache
from .session import create_session, device_id


def special_token_ids(manifest: Manifest) -> tuple[tuple[int, ...], int, int]:
    """(EOS ids, padding id, decoder start id) of a T5 manifest; T5 pads with 0 and starts decoding with padding."""
    tokens = manifest.special_tokens
    eos = tokens.eos_token_ids
    pad = tokens.pad_token_id if tokens.pad_token_id is not None else 0
    start = pad if tokens.decoder_start_token_id is None else tokens.decoder_start_token_id
    return eos, pad, start


class EncoderDecoderModel:
    def __init__(self, manifest: Manifest, directory: Path, device: str, intra_op_threads: int | None = None):
        self.sessions = {}
        for name in ("encoder", "decoder", "decoder_with_past"):
            session = create_session(directory / manifest.graphs[name].file, device, intra_op_threads)
            check_graph_io(
                manifest, name, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
            )
            self.sessions[name] = session
        self.device = device
        self.num_layers = manifest.num_layers
        self.vocab_size = manifest.vocab_size
        self.eos_token_ids, self.pad_token_id, self.decoder_start_token_id = special_token_ids(manifest)
        layers = range(self.num_layers)
        self.self_past = [f"past_key_values.{i}.decoder.{kv}" for i in layers for kv in ("key", "value")]
        self.cross_past = [f"past_key_values.{i}.encoder.{kv}" for i in layers for kv in ("key", "value")]
        self.self_present = [f"present.{i}.decoder.{kv}" for i in layers for kv in ("key", "value")]
        self.cross_present = [f"present.{i}.encoder.{kv}" for i in layers for kv in ("key", "value")]

    def prefill(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> Prefill:
        rows = len(prompts)
        width = max(len(p) for p in prompts)
        # The encoder sees right-padded input, as T5's tokenizer pads.
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        for r, prompt in enumerate(prompts):
            input_ids[r, : len(prompt)] = prompt
            mask[r, : len(prompt)] = 1
        (hidden,) = self.sessions["encoder"].run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": mask})
        start = np.full((rows, 1), self.decoder_start_token_id, dtype=np.int64)
        decoder = self.sessions["decoder"]
        binding = decoder.io_binding()
        binding.bind_cpu_input("input_ids", start)
        binding.bind_cpu_input("encoder_attention_mask", mask)
        binding.bind_cpu_input("encoder_hidden_states", hidden)
        binding.bind_output("logits", "cpu")
        for name in self.self_present + self.cross_present:
            binding.bind_output(name, self.device, device_id(self.device))
        decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache = KVCache(self.device, device_id(self.device))
        for past, present in zip(self.self_past + self.cross_past, outputs[1:]):
            cache.set_value(past, present)
        logits = np.ascontiguousarray(outputs[0].numpy()[:, -1, :], dtype=np.float32)
        state = EncoderDecoderState(self, cache, mask)
        return Prefill(state=state, logits=logits, history=start, prompt_lengths=np.ones(rows, dtype=np.int64))


class EncoderDecoderState:
    def __init__(self, model: EncoderDecoderModel, cache: KVCache, encoder_attention_mask: np.ndarray):
        self.model = model
        self.cache = cache
        self.encoder_attention_mask = encoder_attention_mask  # (R, S) int64

    @property
    def num_rows(self) -> int:
        return self.encoder_attention_mask.shape[0]

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        session = self.model.sessions["decoder_with_past"]
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", token_ids.reshape(-1, 1).astype(np.int64))
        binding.bind_cpu_input("encoder_attention_mask", self.encoder_attention_mask)
        self.cache.bind(binding)
        binding.bind_output("logits", "cpu")
        for name in self.model.self_present:
            binding.bind_output(name, self.cache.device, self.cache.device_id)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        for past, present in zip(self.model.self_past, outputs[1:]):
            self.cache.set_value(past, present)
        return np.ascontiguousarray(outputs[0].numpy()[:, -1, :], dtype=np.float32)

    def select(self, rows: np.ndarray) -> None:
        self.cache.select(rows)
        self.encoder_attention_mask = self.encoder_attention_mask[rows]
