"""Top-1 agreement of reduced-precision engines with float32 PyTorch, on the benchmark's random-weight GPT-2.

The int8 goal asks for >= 99% top-1 agreement with fp32. On random weights the best next token leads the second by a
few hundredths of a logit, so any 8-bit rounding flips some of them; this script measures how many, for onnxgen and
for its peers on the same weights and the same token ids, so the number can be read against what the peers reach:

    onnxgen int8 / fp16   the runtime itself (prefill, then one teacher-forced step per token)
    optimum int8          the graph that onnxruntime-genai int8 runs (optimum's export, optimised, quantize_dynamic)
    ctranslate2 int8      CTranslate2's own int8 conversion of the same checkpoint (forward_batch)

Reference: transformers fp32 logits of the whole sequence (teacher forcing). Samples: seeded uniform random ids (the
synthetic tokenizer has no real words), several sequences. Run with the benchmark venv, after bench.py has built
the artifacts (it reads them as they are: rebuild them with bench.py after changing the exporter):

    python benchmarks/agreement.py --model gpt2 --sequences 4 --length 128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (benchmarks/models.py)


def reference_logits(hf_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def onnxgen_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    """Every position's logits through onnxgen's runtime: prefill the first token, then one step per token."""
    from onnxgen.manifest import load_manifest
    from onnxgen.model import load_model

    model = load_model(load_manifest(directory), directory, "cpu")
    prefill = model.prefill([row[:1].tolist() for row in ids], max_new_tokens=ids.shape[1])
    out = [prefill.logits]
    for position in range(1, ids.shape[1]):
        out.append(prefill.state.step(ids[:, position].astype(np.int64)))
    return np.stack(out, axis=1)


def optimum_logits(directory: Path, ids: np.ndarray, num_layers: int, num_heads: int, head_size: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.astype(np.int64)}
    names = {i.name for i in session.get_inputs()}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones_like(ids, dtype=np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))
    empty = np.zeros((ids.shape[0], num_heads, 0, head_size), dtype=np.float32)
    for layer in range(num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{layer}.{kind}"] = empty
    return session.run(["logits"], feed)[0]


def ctranslate2_logits(directory: Path, ids: np.ndarray, compute_type: str) -> np.ndarray:
    import ctranslate2

    generator = ctranslate2.Generator(str(directory), device="cpu", compute_type=compute_type)
    return np.asarray(generator.forward_batch(ids.astype(np.int32).tolist()), dtype=np.float32)


def agreement(got: np.ndarray, reference: np.ndarray) -> dict:
    agree = got.argmax(-1) == reference.argmax(-1)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    margins = (top2[..., 1] - top2[..., 0])
    return {
        "agreement": round(float(agree.mean()), 4),
        "positions": int(agree.size),
        "max_abs_diff": round(float(np.abs(got - reference).max()), 4),
        "largest_margin_disagreeing": round(float(margins[~agree].max()), 4) if not agree.all() else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=[m for m in models.MODELS if models.family(m) == "gpt2"])
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = models.config_numbers(args.model)
    layers, heads = config["n_layer"], config["n_head"]
    head_size = config["n_embd"] // heads
    ids = np.random.default_rng(args.seed).integers(0, config["vocab_size"], (args.sequences, args.length))
    reference = reference_logits(models.path(args.model, "hf"), ids)
    median_margin = float(np.median(np.diff(np.sort(reference, axis=-1)[..., -2:], axis=-1)))
    print(f"{args.model}: {args.sequences} x {args.length} random ids (seed {args.seed}), fp32 PyTorch reference; "
          f"median top-1 lead {median_margin:.4f} logit", flush=True)

    engines = {
        "onnxgen int8": lambda: onnxgen_logits(models.path(args.model, "onnxgen-int8"), ids),
        "onnxgen fp16": lambda: onnxgen_logits(models.path(args.model, "onnxgen-fp16"), ids),
        "onnxgen fp32": lambda: onnxgen_logits(models.path(args.model, "onnxgen"), ids),
        "optimum/genai int8": lambda: optimum_logits(models.path(args.model, "optimum-int8"), ids, layers, heads,
                                                     head_size),
        "ctranslate2 int8": lambda: ctranslate2_logits(models.path(args.model, "ct2"), ids, "int8"),
    }
    for name, run in engines.items():
        try:
            record = agreement(run(), reference)
        except Exception as exc:  # an artifact not built, an engine not installed: say so and go on
            record = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"engine": name, **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
