"""Check the fused T5 graphs against the PyTorch model they were built from.

The graphs are driven as the runtime drives them: a right-padded batch of two prompts of different lengths (the
verification prompt and its first half) through the encoder, then the decoder start token and a few greedy
one-token steps into fixed self-attention buffers shared between past and present. PyTorch runs each row alone,
unpadded, over its final decoder sequence without a cache. Same record as `verify.verify_export`.

`check_static_t5_agreement` (int8 graphs): the agreement sample is both the encoder's input and the decoder's
teacher-forced target; the share of decoder positions where the graphs' most likely next token is PyTorch's
(the record of `verify.check_static_gpt2_agreement`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnxgen.export.builders.verify import AGREEMENT_POSITIONS, AGREEMENT_SAMPLE, _max_diff, agreement_record, token_table
from onnxgen.export.errors import ExportError
from onnxgen.export.verify import SAMPLE_PROMPT, STEPS_WITH_PAST, _session
from onnxgen.manifest import GraphSpec


def verify_static_t5(model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], atol: float) -> dict:
    import torch

    ids = [int(i) for i in tokenizer(SAMPLE_PROMPT)["input_ids"]]
    if len(ids) < 2:
        raise ExportError(f"the tokenizer turns the verification prompt {SAMPLE_PROMPT!r} into fewer than 2 tokens")
    prompts = [ids, ids[: len(ids) // 2]]
    encoder = _session(Path(directory) / graphs["encoder"].file)  # says how to install onnxruntime if missing
    decoder = _session(Path(directory) / graphs["decoder"].file)
    table = token_table(directory)
    config = model.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), config.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, prompt in enumerate(prompts):
        input_ids[r, : len(prompt)] = prompt
        mask[r, : len(prompt)] = 1
    cross_names = [o.name for o in encoder.get_outputs()]
    cross = dict(zip(cross_names, encoder.run(cross_names, {"inputs_embeds": table[input_ids], "attention_mask": mask})))
    layers = len(cross_names) // 2
    shape = (len(prompts), config.num_heads, STEPS_WITH_PAST + 1, config.d_kv)
    buffers = {f"{i}.decoder.{kv}": np.zeros(shape, np.float32) for i in range(layers) for kv in ("key", "value")}
    tokens = np.full(len(prompts), start, dtype=np.int64)
    sequences = [[start] for _ in prompts]
    steps = []
    for position in range(STEPS_WITH_PAST + 1):
        logits = _step(decoder, buffers, cross, table[tokens[:, None]], position, mask.astype(np.int32))
        steps.append(logits)
        tokens = logits.argmax(axis=-1)
        for sequence, token in zip(sequences, tokens):
            sequence.append(int(token))
    diffs = {"logits_first_step": 0.0, "logits_with_past": 0.0}
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            decoder_ids = torch.tensor([sequences[r][:-1]])
            reference = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder_ids, use_cache=False)
            reference = reference.logits[0].numpy()  # (steps, V)
            got = np.stack([s[r] for s in steps])
            diffs["logits_first_step"] = max(diffs["logits_first_step"], _max_diff(got[:1], reference[:1]))
            diffs["logits_with_past"] = max(diffs["logits_with_past"], _max_diff(got[1:], reference[1:]))
    max_abs_diff = max(diffs.values()) if not any(np.isnan(list(diffs.values()))) else float("nan")
    return {
        "passed": bool(max_abs_diff <= atol),
        "max_abs_diff": float(max_abs_diff),
        "atol": atol,
        "sample": SAMPLE_PROMPT,
        "steps_with_past": STEPS_WITH_PAST,
        "rows": [len(p) for p in prompts],
        "diffs": diffs,
    }


def _step(session, buffers, cross, inputs_embeds, position: int, mask) -> np.ndarray:
    """One decoder token per row at `position` (every row the same length here); the buffers are written in place."""
    import onnxruntime as ort

    rows = inputs_embeds.shape[0]
    binding = session.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds))
    binding.bind_cpu_input("seqlens_k", np.full(rows, position, dtype=np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(position + 1, dtype=np.int32))
    binding.bind_cpu_input("encoder_attention_mask", mask)
    binding.bind_output("logits", "cpu")
    values = []  # the OrtValues, alive until the run is over
    for name, array in buffers.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        values.append(value)
        binding.bind_ortvalue_input(f"past_key_values.{name}", value)
        binding.bind_ortvalue_output(f"present.{name}", value)
    for name, array in cross.items():
        binding.bind_cpu_input(name.replace("present.", "past_key_values.", 1), array)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def check_static_t5_agreement(
    model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], min_agreement: float
) -> dict:
    """Top-1 agreement of reduced-precision T5 graphs with the float32 PyTorch model over AGREEMENT_SAMPLE."""
    import torch

    ids = [int(i) for i in tokenizer(AGREEMENT_SAMPLE)["input_ids"]][: AGREEMENT_POSITIONS + 1]
    if len(ids) < 2:
        raise ExportError("the tokenizer turns the agreement sample into fewer than 2 tokens")
    config = model.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id or 0
    decoder_ids = [start] + ids[:-1]  # teacher forcing: position t predicts ids[t]
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids]), use_cache=False)
        reference = reference.logits[0].float().numpy()  # (n, V)
    table = token_table(directory)
    encoder = _session(Path(directory) / graphs["encoder"].file)
    decoder = _session(Path(directory) / graphs["decoder"].file)
    input_ids, mask = np.array([ids], dtype=np.int64), np.ones((1, len(ids)), dtype=np.int64)
    cross_names = [o.name for o in encoder.get_outputs()]
    cross = dict(zip(cross_names, encoder.run(cross_names, {"inputs_embeds": table[input_ids], "attention_mask": mask})))
    shape = (1, config.num_heads, len(decoder_ids), config.d_kv)
    buffers = {f"{i}.decoder.{kv}": np.zeros(shape, np.float32) for i in range(len(cross_names) // 2)
               for kv in ("key", "value")}
    got = [
        _step(decoder, buffers, cross, table[np.array([[token]])], position, mask.astype(np.int32))[0]
        for position, token in enumerate(decoder_ids)
    ]
    return agreement_record(np.stack(got), reference, min_agreement)
