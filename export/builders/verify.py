"""Check a static-layout GPT-2 graph against the PyTorch model it was built from.

The graph is driven as the runtime drives it: a right-padded batch of two prompts of different lengths (the
verification prompt and its first half) into fixed buffers shared between past and present, then a few one-token
steps. PyTorch runs each row's final sequence once, without a cache. Same record as `verify.verify_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onnxgen.export.errors import ExportError
from onnxgen.export.verify import SAMPLE_PROMPT, STEPS_WITH_PAST, _session
from onnxgen.manifest import GraphSpec


def verify_static_gpt2(model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], atol: float) -> dict:
    import torch

    ids = [int(i) for i in tokenizer(SAMPLE_PROMPT)["input_ids"]]
    if not ids:
        raise ExportError(f"the tokenizer turns the verification prompt {SAMPLE_PROMPT!r} into no tokens")
    prompts = [ids, ids[: max(1, len(ids) // 2)]]
    session = _session(Path(directory) / graphs["decoder"].file)  # says how to install onnxruntime if missing
    import onnxruntime as ort
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
    logits = _run(session, values, input_ids, positions, lengths - 1, width)
    steps = [logits]
    for _ in range(STEPS_WITH_PAST):
        new = logits.argmax(axis=-1)
        for r, token in enumerate(new):
            tokens[r].append(int(token))
        logits = _run(session, values, new[:, None], lengths[:, None], lengths, int(lengths.max()) + 1)
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


def _run(session, values, input_ids, position_ids, seqlens_k, total: int) -> np.ndarray:
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
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
