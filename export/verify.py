"""Check the exported graphs against the PyTorch model they came from, on one fixed prompt.

The ONNX graphs are driven the way the runtime drives them: the whole prompt first, then a few single-token
steps that feed back the present key/values as past key/values. PyTorch runs the final sequence once, without a
cache, so the past-key-value path is checked against the plain computation rather than against itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from onnxgen.export.errors import ExportError
from onnxgen.manifest import GraphSpec

log = logging.getLogger(__name__)

SAMPLE_PROMPT = "Hello, my dog is cute"
STEPS_WITH_PAST = 2


def verify_export(model: Any, tokenizer: Any, directory: Path, graphs: dict[str, GraphSpec], atol: float) -> dict:
    """Compare logits (and T5's encoder states) between PyTorch and ONNX Runtime; return the manifest record."""
    ids = [int(i) for i in tokenizer(SAMPLE_PROMPT)["input_ids"]]
    if not ids:
        raise ExportError(f"the tokenizer turns the verification prompt {SAMPLE_PROMPT!r} into no tokens")
    sessions = {name: _session(directory / spec.file) for name, spec in graphs.items()}
    if "encoder" in graphs:
        diffs = _verify_t5(model, sessions, ids)
    else:
        diffs = _verify_gpt2(model, sessions["decoder"], ids)
    values = list(diffs.values())
    max_abs_diff = float("nan") if any(np.isnan(values)) else max(values)  # max() alone may skip a NaN
    return {
        "passed": bool(max_abs_diff <= atol),  # False for NaN too
        "max_abs_diff": max_abs_diff,
        "atol": atol,
        "sample": SAMPLE_PROMPT,
        "steps_with_past": STEPS_WITH_PAST,
        "diffs": diffs,
    }


def _session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        # The export extra does not pull in onnxruntime: users pick the cpu or cuda flavour themselves.
        raise ExportError(
            "verification runs the exported graphs with onnxruntime, which is not installed; "
            "pip install 'onnxgen[cpu]' (or 'onnxgen[cuda]'), or pass --no-verify"
        ) from None

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ExportError(f"verification cannot feed the exported graph: it has unexpected inputs {missing}")
    outputs = session.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


def _past_from_present(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # optimum names a step's cache outputs present.* and the next step's inputs past_key_values.*
    return {"past_key_values." + k[len("present.") :]: v for k, v in outputs.items() if k.startswith("present.")}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"verification: ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _verify_gpt2(model: Any, session, prompt: list[int]) -> dict[str, float]:
    import torch

    config = model.config
    head_size = config.n_embd // config.n_head
    empty = np.zeros((1, config.n_head, 0, head_size), dtype=np.float32)
    past = {f"past_key_values.{i}.{kv}": empty for i in range(config.n_layer) for kv in ("key", "value")}
    tokens = list(prompt)
    new = list(prompt)
    onnx_logits = []  # per call: (new tokens, vocab)
    for _ in range(1 + STEPS_WITH_PAST):
        start = len(tokens) - len(new)
        feeds = {
            "input_ids": np.array([new], dtype=np.int64),
            "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
            "position_ids": np.arange(start, len(tokens), dtype=np.int64)[None, :],
            **past,
        }
        outputs = _run(session, feeds)
        onnx_logits.append(outputs["logits"][0])
        past = _past_from_present(outputs)
        new = [int(np.argmax(outputs["logits"][0, -1]))]
        tokens += new
    with torch.no_grad():
        reference = model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0].numpy()
    n = len(prompt)
    return {
        "logits_first_step": _max_diff(onnx_logits[0], reference[:n]),
        "logits_with_past": _max_diff(np.concatenate(onnx_logits[1:]), reference[n:]),
    }


def _verify_t5(model: Any, sessions: dict, prompt: list[int]) -> dict[str, float]:
    import torch

    input_ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(input_ids)
    hidden = _run(sessions["encoder"], {"input_ids": input_ids, "attention_mask": mask})["last_hidden_state"]
    feeds = {"encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    tokens = [model.config.decoder_start_token_id]
    outputs = _run(sessions["decoder"], {**feeds, "input_ids": np.array([tokens], dtype=np.int64)})
    onnx_logits = [outputs["logits"][0]]
    past = _past_from_present(outputs)  # the with-past graph returns only the self-attention cache after this
    for _ in range(STEPS_WITH_PAST):
        tokens.append(int(np.argmax(onnx_logits[-1][-1])))
        outputs = _run(
            sessions["decoder_with_past"], {**feeds, **past, "input_ids": np.array([tokens[-1:]], dtype=np.int64)}
        )
        onnx_logits.append(outputs["logits"][0])
        past.update(_past_from_present(outputs))
    with torch.no_grad():
        reference = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.tensor([tokens]),
            use_cache=False,
        )
    logits = reference.logits[0].numpy()
    return {
        "encoder_hidden_states": _max_diff(hidden, reference.encoder_last_hidden_state.numpy()),
        "logits_first_step": _max_diff(onnx_logits[0], logits[:1]),
        "logits_with_past": _max_diff(np.concatenate(onnx_logits[1:]), logits[1:]),
    }
