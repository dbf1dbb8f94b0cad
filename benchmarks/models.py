"""Build and cache the benchmark models: one random-weight checkpoint per real config, then each engine's format.

The Hub is not reachable where this runs, so the real configs' numbers are written here (gpt2, gpt2-medium,
t5-small, t5-base as published). Random weights of a real config cost what real weights cost. Every artifact is
built once under ``benchmarks/.cache/<model>/`` (gitignored) and reused:

    hf/        save_pretrained of the model built with torch.manual_seed(0), plus a synthetic word-level tokenizer
               (one token string per id: CTranslate2's converter needs a vocabulary, and there is no real tokenizer
               offline)
    optimum/   optimum's ONNX export (task text-generation-with-past / text2text-generation-with-past)
    ct2/       CTranslate2 conversion of hf/
    genai/     onnxruntime-genai folder (GPT-2 only): optimum's model.onnx linked in, plus a hand-written
               genai_config.json of its generic "decoder" type (its builder supports neither GPT-2 nor T5)
    onnxgen/   onnxgen's own export (onnxgen.export.export_model)
    optimum-int8/  GPT-2 only: optimum's export through onnxruntime's transformer optimizer, then onnxruntime's
               dynamic int8 quantization of every MatMul (the optimizer un-ties the LM head, so it is quantized too)
    genai-int8/    the same graph through genai's generic decoder config
    onnxgen-int8/, onnxgen-fp16/  `onnxgen export --optimize fused --precision int8|fp16`

A folder counts as built when its ``.done`` marker holds the artifact's fingerprint (onnxgen's export is redone
when the exporter's source changes); a failed build leaves no marker and is retried.
This module imports torch/transformers only inside the build functions, so the driver stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
REPO_DIR = Path(__file__).resolve().parent.parent

# The published configs' numbers (https://huggingface.co/<name>/blob/main/config.json), minus fields that only
# matter for training or for the Hub's pipelines.
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256)
GPT2_MEDIUM = dict(GPT2_SMALL, n_embd=1024, n_layer=24, n_head=16)
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                layer_norm_epsilon=1e-6, feed_forward_proj="relu", tie_word_embeddings=True, is_encoder_decoder=True,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, n_positions=512)
T5_BASE = dict(T5_SMALL, d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12)

MODELS = {
    "gpt2": ("gpt2", GPT2_SMALL),
    "gpt2-medium": ("gpt2", GPT2_MEDIUM),
    "t5-small": ("t5", T5_SMALL),
    "t5-base": ("t5", T5_BASE),
}

ARTIFACTS = ("hf", "optimum", "ct2", "genai", "onnxgen", "optimum-int8", "genai-int8", "onnxgen-int8", "onnxgen-fp16",
             "optimum-fp32opt", "genai-fp32opt")
# Random weights predict almost uniformly (the best next token leads the second by ~0.09 logit on GPT-2 small), so
# int8 rounding flips near-ties: ~93% top-1 agreement where a trained model keeps >= 99%. The benchmark accepts
# that and reports the agreement the export measured.
RANDOM_WEIGHTS_MIN_AGREEMENT = 0.85


def family(model: str) -> str:
    """'gpt2' or 't5' for a model name of MODELS."""
    return MODELS[model][0]


def config_numbers(model: str) -> dict:
    """The config fields of MODELS[model], a copy."""
    return dict(MODELS[model][1])


def vocab_size(model: str) -> int:
    return MODELS[model][1]["vocab_size"]


def special_ids(model: str) -> dict:
    """eos (and, for T5, pad/decoder start) ids of the model."""
    cfg = MODELS[model][1]
    return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id") if k in cfg}


def token_strings(model: str) -> list[str]:
    """One string per id of the synthetic tokenizer: specials by their usual names, every other id 't<id>'."""
    n = vocab_size(model)
    toks = [f"t{i}" for i in range(n)]
    if family(model) == "gpt2":
        toks[50256] = "<|endoftext|>"
    else:
        toks[0], toks[1], toks[2] = "<pad>", "</s>", "<unk>"
    return toks


def path(model: str, artifact: str) -> Path:
    return CACHE_DIR / model / artifact


def fingerprint(artifact: str) -> str:
    """What a built folder must match to be reused: onnxgen's export is rebuilt whenever its exporter's source
    (the repository's export/ folder) changes; the peers' formats depend only on the pinned packages."""
    if not artifact.startswith("onnxgen"):
        return "ok"
    digest = hashlib.sha256()
    for f in sorted((REPO_DIR / "export").rglob("*.py")):
        digest.update(f.relative_to(REPO_DIR).as_posix().encode() + b"\0" + f.read_bytes())
    # which graphs were exported is part of what was built: a fused folder is never reused for `none`, nor back
    return f"export-src {digest.hexdigest()[:16]} optimize {onnxgen_optimize()}"


def onnxgen_optimize() -> str:
    """The graphs onnxgen's rows run: fused (default), or ONNXGEN_BENCH_OPTIMIZE=none for the portable ones."""
    return os.environ.get("ONNXGEN_BENCH_OPTIMIZE", "fused")


def is_built(model: str, artifact: str) -> bool:
    done = path(model, artifact) / ".done"
    return done.exists() and done.read_text().strip() == fingerprint(artifact)


def ensure(model: str, artifact: str) -> Path:
    """Build `artifact` of `model` (and what it needs) unless cached; return its folder."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    builders = {"hf": _build_hf, "optimum": _build_optimum, "ct2": _build_ct2, "genai": _build_genai,
                "onnxgen": _build_onnxgen, "optimum-int8": _build_optimum_int8, "genai-int8": _build_genai,
                "onnxgen-int8": _build_onnxgen, "onnxgen-fp16": _build_onnxgen,
                "optimum-fp32opt": _build_optimum_optimized, "genai-fp32opt": _build_genai}
    if artifact not in builders:
        raise ValueError(f"artifact must be one of {sorted(builders)}, got {artifact!r}")
    out = path(model, artifact)
    if is_built(model, artifact):
        return out
    if artifact != "hf":
        ensure(model, "hf")
    if artifact in ("genai", "optimum-int8", "optimum-fp32opt"):
        ensure(model, "optimum")
    if artifact in ("genai-int8", "genai-fp32opt"):
        ensure(model, artifact.replace("genai", "optimum"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log.info("building %s/%s", model, artifact)
    builders[artifact](model, out)
    (out / ".done").write_text(fingerprint(artifact) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- builders

def _build_hf(model: str, out: Path) -> None:
    import torch
    import transformers

    fam, numbers = MODELS[model]
    if fam == "gpt2":
        config = transformers.GPT2Config(**numbers)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.T5Config(**numbers)
        cls = transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    net = cls(config).eval()
    net.save_pretrained(out)
    _save_tokenizer(model, out)


def _save_tokenizer(model: str, out: Path) -> None:
    """A word-level tokenizer with exactly one string per id (no real tokenizer is available offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    toks = token_strings(model)
    if family(model) == "gpt2":
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        specials = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(out)


def _build_optimum(model: str, out: Path) -> None:
    # accelerate must be importable: without it the exporter un-ties GPT-2's LM head from its embedding.
    import accelerate  # noqa: F401
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if family(model) == "gpt2" else "text2text-generation-with-past"
    main_export(str(path(model, "hf")), out, task=task, device="cpu", do_validation=False)


def _build_ct2(model: str, out: Path) -> None:
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(path(model, "hf"))).convert(str(out), force=True)


def _build_optimum_optimized(model: str, out: Path, graph_name: str = "model.onnx") -> Path:
    """optimum's GPT-2 export through onnxruntime's transformer optimizer (what the peers' int8 rows start from,
    and the fp32opt rows run: the peers' graphs optimized as far as onnxruntime's own tool takes them)."""
    from onnxruntime.transformers.optimizer import optimize_model

    if family(model) != "gpt2":
        raise ValueError(f"the optimized peer graphs are built for GPT-2 only; {model} is a T5")
    src, numbers = path(model, "optimum"), config_numbers(model)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".onnx_data", ".onnx.data")) and f.name != ".done":
            shutil.copy(f, out / f.name)
    optimized = optimize_model(str(src / "model.onnx"), model_type="gpt2", num_heads=numbers["n_head"],
                               hidden_size=numbers["n_embd"], opt_level=1)
    optimized.save_model_to_file(str(out / graph_name), use_external_data_format=True)
    return out / graph_name


def _build_optimum_int8(model: str, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _build_optimum_optimized(model, out, "optimized_fp32.onnx")
    quantize_dynamic(str(fp32), str(out / "model.onnx"), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    for f in out.iterdir():
        if f.name.startswith("optimized_fp32"):
            f.unlink()


def _build_genai(model: str, out: Path) -> None:
    if family(model) != "gpt2":
        raise ValueError(f"onnxruntime-genai runs GPT-2 only here (generic decoder config); {model} is a T5")
    src = path(model, out.name.replace("genai", "optimum"))  # genai -> optimum, genai-int8 -> optimum-int8, ...
    for f in src.iterdir():
        if f.name.endswith((".onnx", ".onnx_data", ".onnx.data")) or f.name == "model.onnx_data":
            os.symlink(f, out / f.name)
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, src), indent=2) + "\n")


def genai_config(model: str, optimum_dir: Path, provider: str | None = None, threads: int | None = None) -> dict:
    """onnxruntime-genai's config for optimum's GPT-2 export, as its generic 'decoder' model type."""
    import onnx

    numbers = config_numbers(model)
    graph = onnx.load(str(optimum_dir / "model.onnx"), load_external_data=False).graph
    names = {i.name for i in graph.input}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in names:
        inputs["position_ids"] = "position_ids"
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if provider:
        session_options["provider_options"] = [{provider: {}}]
    if threads:
        session_options["intra_op_num_threads"] = threads
        session_options["inter_op_num_threads"] = 1
    heads, hidden = numbers["n_head"], numbers["n_embd"]
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": numbers["bos_token_id"],
            "eos_token_id": numbers["eos_token_id"],
            "pad_token_id": numbers["eos_token_id"],
            "vocab_size": numbers["vocab_size"],
            "context_length": numbers["n_positions"],
            "decoder": {
                "filename": "model.onnx",
                "session_options": session_options,
                "head_size": hidden // heads,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "num_hidden_layers": numbers["n_layer"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": numbers["n_positions"], "min_length": 0,
                   "past_present_share_buffer": False, "top_k": 50, "top_p": 1.0, "temperature": 1.0,
                   "length_penalty": 1.0, "early_stopping": True, "num_return_sequences": 1,
                   "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def _build_onnxgen(model: str, out: Path) -> None:
    from onnxgen.export import export_model

    # onnxgen's fused graphs (what `onnxgen export --optimize fused` gives; CPU only).
    # ONNXGEN_BENCH_OPTIMIZE=none measures the portable optimum graphs (what CUDA needs).
    precision = out.name.split("-", 1)[1] if "-" in out.name else "fp32"
    export_model(str(path(model, "hf")), str(out), force=True, optimize=onnxgen_optimize(), precision=precision,
                 min_agreement=RANDOM_WEIGHTS_MIN_AGREEMENT)


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build the cached benchmark models (benchmarks/.cache/).")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--artifacts", nargs="+", default=list(ARTIFACTS), choices=list(ARTIFACTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for m in args.models:
        for a in args.artifacts:
            if a in ("genai", "genai-int8", "optimum-int8") and family(m) != "gpt2":
                continue
            try:
                print(m, a, ensure(m, a))
            except Exception as exc:  # report and go on: one engine's failure must not stop the others
                print(m, a, f"FAILED: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
