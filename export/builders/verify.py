"""Check a static-layout GPT-2 graph against the PyTorch model it was built from.

`verify_static_gpt2` (float32 graphs): the graph is driven as the runtime drives it: a right-padded batch of two
prompts of different lengths (the verification prompt and its first half) into fixed buffers shared between past
and present, then a few one-token steps. PyTorch runs each row's final sequence once, without a cache. Same record
as `verify.verify_export`.

`check_static_gpt2_agreement` (int8 and fp16 graphs, whose logits cannot match to a float32 tolerance): the share
of positions of a fixed text where the graph's most likely next token is PyTorch's, teacher-forced one token at a
time through the key/value buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onnxgen.export.errors import ExportError
from onnxgen.export.verify import SAMPLE_PROMPT, STEPS_WITH_PAST, _session
from onnxgen.manifest import TOKEN_EMBEDDINGS_FILE, GraphSpec


def verify_static_gpt2(model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], atol: float) -> dict:
    import torch

    ids = [int(i) for i in tokenizer(SAMPLE_PROMPT)["input_ids"]]
    if not ids:
        raise ExportError(f"the tokenizer turns the verification prompt {SAMPLE_PROMPT!r} into no tokens")
    prompts = [ids, ids[: max(1, len(ids) // 2)]]
    session = _session(Path(directory) / graphs["decoder"].file)  # says how to install onnxruntime if missing
    import onnxruntime as ort
    table = token_table(directory)
    config = model.config
    heads, head_size = config.n_head, config.n_embd // config.n_head
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    width = int(lengths.max())
    capacity = width + STEPS_WITH_PAST + 1
    buffers = np.zeros((config.n_layer, 2, len(prompts), heads, capacity, head_size), dtype=np.float32)
    values = [ort.OrtValue.ortvalue_from_numpy(buffers[i, k]) for i in range(config.n_layer) for k in range(2)]
    input_ids = np.zeros((len(prompts), width), dtype=np.int64)
    for r, prompt in enumerate(prompts):
        input_ids[r, : len(prompt)] = prompt
    positions = np.tile(np.arange(width, dtype=np.int64), (len(prompts), 1))
    tokens = [list(p) for p in prompts]
    logits = _run(session, values, table[input_ids], positions, lengths - 1, width)
    steps = [logits]
    for _ in range(STEPS_WITH_PAST):
        new = logits.argmax(axis=-1)
        for r, token in enumerate(new):
            tokens[r].append(int(token))
        logits = _run(session, values, table[new[:, None]], lengths[:, None], lengths, int(lengths.max()) + 1)
        lengths = lengths + 1
        steps.append(logits)
    diffs = {"logits_first_step": 0.0, "logits_with_past": 0.0}
    with torch.no_grad():
        for r, sequence in enumerate(tokens):
            reference = model(torch.tensor([sequence]), use_cache=False).logits[0].numpy()
            n = len(prompts[r])
            got = np.stack([s[r] for s in steps])  # logits after position n-1, n, n+1, ...
            diffs["logits_first_step"] = max(diffs["logits_first_step"], _max_diff(got[:1], reference[n - 1 : n]))
            diffs["logits_with_past"] = max(diffs["logits_with_past"], _max_diff(got[1:], reference[n:]))
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


AGREEMENT_SAMPLE = (
    "The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had taught him. "
    "From the top he could see the harbour, the fishing boats coming home, and the long road that led inland to "
    "the market town. Nobody remembered when the lamp had last failed, but he checked the wick and the oil twice "
    "a night all the same, because the one night he did not would be the night it mattered."
)
AGREEMENT_POSITIONS = 128  # at most; fewer when the tokenizer makes fewer tokens of the sample


def check_static_gpt2_agreement(
    model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], min_agreement: float
) -> dict:
    """Top-1 agreement of a reduced-precision graph with the float32 PyTorch model over AGREEMENT_SAMPLE."""
    import torch

    ids = [int(i) for i in tokenizer(AGREEMENT_SAMPLE)["input_ids"]]
    limit = min(AGREEMENT_POSITIONS, model.config.n_positions) + 1
    ids = ids[:limit]
    if len(ids) < 2:
        raise ExportError("the tokenizer turns the agreement sample into fewer than 2 tokens")
    with torch.no_grad():
        reference = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float().numpy()  # (n-1, V)
    session = _session(Path(directory) / graphs["decoder"].file)
    import onnxruntime as ort

    table = token_table(directory)
    config = model.config
    past = {i.name: i.type for i in session.get_inputs()}["past_key_values.0.key"]
    dtype = np.float16 if past == "tensor(float16)" else np.float32
    shape = (config.n_layer, 2, 1, config.n_head, len(ids), config.n_embd // config.n_head)
    buffers = np.zeros(shape, dtype=dtype)
    values = [ort.OrtValue.ortvalue_from_numpy(buffers[i, k]) for i in range(config.n_layer) for k in range(2)]
    got = [_run(session, values, table[[ids[:1]]], np.zeros((1, 1), np.int64), np.zeros(1, np.int64), 1)[0]]
    for position in range(1, len(ids) - 1):
        token, where = table[[[ids[position]]]], np.array([[position]])
        got.append(_run(session, values, token, where, np.array([position]), position + 1)[0])
    return agreement_record(np.stack(got), reference, min_agreement)


def agreement_record(got: np.ndarray, reference: np.ndarray, min_agreement: float) -> dict:
    """The manifest's record of a top-1 agreement check: `got` and `reference` are (positions, V) logits."""
    agree = got.argmax(axis=-1) == reference.argmax(axis=-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]  # how far PyTorch's best token is ahead of its second
    agreement = float(agree.mean())
    return {
        "check": "top1-agreement",
        "passed": bool(agreement >= min_agreement),
        "agreement": agreement,
        "min_agreement": min_agreement,
        "positions": int(agree.size),
        # Disagreements at near-ties are expected; a large margin here would mean a real error.
        "largest_margin_disagreeing": float(margins[~agree].max()) if not agree.all() else 0.0,
        "median_margin": float(np.median(margins)),
        "max_abs_diff": _max_diff(got, reference),
        "sample": "onnxgen.export.builders.verify.AGREEMENT_SAMPLE",
    }


def token_table(directory: Path) -> np.ndarray:
    """The (V, D) table the graphs' `inputs_embeds` are rows of, memory-mapped."""
    return np.load(Path(directory) / TOKEN_EMBEDDINGS_FILE, mmap_mode="r")


def _run(session, values, inputs_embeds, position_ids, seqlens_k, total: int) -> np.ndarray:
    binding = session.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds))
    binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
    binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
    binding.bind_output("logits", "cpu")
    for index, value in enumerate(values):
        layer, kind = divmod(index, 2)
        name = ("key", "value")[kind]
        binding.bind_ortvalue_input(f"past_key_values.{layer}.{name}", value)
        binding.bind_ortvalue_output(f"present.{layer}.{name}", value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"verification: ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
