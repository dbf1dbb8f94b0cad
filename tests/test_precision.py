"""fp16 and int8 graphs from the GPT-2 builder: what they are made of, and that they keep the model's predictions.

A random-weight model predicts almost uniformly (its best next token leads the second by ~0.01 logit), so any
rounding flips near-ties and top-1 agreement says little about it. The agreement tests therefore use a tiny GPT-2
trained for a few seconds on the agreement sample, which, like a real model, is confident about what comes next.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import tiny_models  # noqa: E402

from onnxgen import TextGeneration  # noqa: E402
from onnxgen.export import export_model  # noqa: E402
from onnxgen.export.builders.gpt2 import quantize_columns  # noqa: E402
from onnxgen.export.builders.verify import AGREEMENT_SAMPLE  # noqa: E402
from onnxgen.export.cli import add_export_arguments, run_export  # noqa: E402
from onnxgen.export.errors import ExportError  # noqa: E402
from onnxgen.manifest import TOKEN_EMBEDDINGS_FILE, load_manifest  # noqa: E402

TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def trained_gpt2(tiny_gpt2_checkpoint, tmp_path_factory):
    """A tiny GPT-2 (the test tokenizer) that has learnt the agreement sample by heart."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_checkpoint)
    config = transformers.GPT2Config.from_pretrained(tiny_gpt2_checkpoint)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.tensor([tokenizer(AGREEMENT_SAMPLE)["input_ids"][: config.n_positions]])
    path = tmp_path_factory.mktemp("trained") / "gpt2"
    return tiny_models.train_on_one_batch(
        model, tokenizer, path, steps=TRAIN_STEPS, lr=3e-3, max_loss=0.5, input_ids=ids, labels=ids
    )


@pytest.fixture(scope="module")
def exported(trained_gpt2, tmp_path_factory):
    """precision -> model directory, each exported with the default min_agreement (0.99)."""
    return tiny_models.export_precisions(trained_gpt2, tmp_path_factory.mktemp("precision"), ("fp32", "fp16", "int8"))


def _graph(directory):
    return onnx.load(str(directory / load_manifest(directory).graphs["decoder"].file)).graph


def test_int8_graph_quantizes_every_matmul_and_the_lm_head(exported):
    graph = _graph(exported["int8"])
    ops = [node.op_type for node in graph.node]
    layers = load_manifest(exported["int8"]).num_layers
    assert ops.count("DynamicQuantizeMatMul") == 4 * layers + 1  # qkv, attention out, mlp in/out; LM head
    assert not {"MatMul", "Gemm"} & set(ops)
    head = next(n for n in graph.node if n.output[0] == "logits")
    assert head.op_type == "DynamicQuantizeMatMul"
    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DynamicQuantizeMatMul":  # uint8 weights, one scale and zero point per output column
            matrix, scale, zero_point = (weights[name] for name in node.input[1:4])
            assert matrix.data_type == zero_point.data_type == onnx.TensorProto.UINT8
            assert list(scale.dims) == list(zero_point.dims) == [matrix.dims[1]]
    assert np.load(exported["int8"] / TOKEN_EMBEDDINGS_FILE, mmap_mode="r").dtype == np.float32  # the lookup


def test_fp16_graph_stores_half_floats_and_returns_float32_logits(exported):
    graph = _graph(exported["fp16"])
    floats = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT16
    assert np.load(exported["fp16"] / TOKEN_EMBEDDINGS_FILE, mmap_mode="r").dtype == np.float16


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_agrees_with_pytorch_and_the_manifest_says_so(exported, precision):
    manifest = load_manifest(exported[precision])
    check = manifest.verification
    assert check["check"] == "top1-agreement" and check["passed"]
    assert check["agreement"] >= 0.99 and check["positions"] >= 64
    assert manifest.dtype == {"fp16": "float16", "int8": "int8"}[precision]
    assert load_manifest(exported["fp32"]).dtype == "float32"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_generates_what_pytorch_generates(trained_gpt2, exported, precision):
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_gpt2)
    model = transformers.GPT2LMHeadModel.from_pretrained(trained_gpt2).eval()
    prompts = ["The old lighthouse keeper", "From the top he could"]
    generation = TextGeneration(exported[precision], device="cpu")
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
        got = generation.generate_ids([ids[0].tolist()], do_sample=False, max_new_tokens=24, min_new_tokens=24)
        assert got[0][0] == expected[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_runs_every_search_in_batches(exported, precision):
    fp32 = TextGeneration(exported["fp32"], device="cpu")
    reduced = TextGeneration(exported[precision], device="cpu")
    prompts = ["The old lighthouse keeper", "Nobody remembered", "he checked the wick and the oil"]
    for kwargs in (dict(num_beams=3, max_new_tokens=12), dict(do_sample=False, max_new_tokens=12)):
        assert reduced(prompts, **kwargs) == fp32(prompts, **kwargs)  # the trained model is far from any tie
    sampled = reduced(prompts, do_sample=True, top_k=5, seed=3, max_new_tokens=8, num_generations=2)
    assert [len(row) for row in sampled] == [2, 2, 2]


def test_quantize_columns_rounds_each_column_within_half_a_step():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(96, 7)).astype(np.float32) * np.array([1, 10, 0.01, 1, 1, 1, 1], np.float32)
    matrix[:, 3] = 0.0  # an all-zero column
    matrix[:, 4] = np.abs(matrix[:, 4])  # a column without negatives: its range is widened to include 0
    quantized, scale, zero_point = quantize_columns(matrix)
    assert quantized.dtype == zero_point.dtype == np.uint8 and scale.shape == (7,)
    restored = (quantized.astype(np.float32) - zero_point) * scale
    assert np.all(np.abs(restored - matrix) <= scale / 2 * 1.0001)
    assert np.all(restored[:, 3] == 0)
    assert zero_point[4] == 0 and quantized[:, 4].max() == 255


def test_a_random_model_at_int8_misses_a_strict_agreement_and_keeps_the_files(tiny_gpt2_checkpoint, tmp_path):
    # The random tiny model's next-token margins are ~0.01 logit: int8 rounding flips some of them.
    with pytest.raises(ExportError, match=r"min_agreement=1\b.*--min-agreement"):
        export_model(
            tiny_gpt2_checkpoint, tmp_path / "int8", optimize="fused", precision="int8", min_agreement=1.0,
            progress=False,
        )
    record = json.loads((tmp_path / "int8" / "onnxgen.json").read_text())["verification"]
    assert record["passed"] is False and record["agreement"] < 1.0
    assert record["largest_margin_disagreeing"] < 0.05  # the flips are near-ties, not errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(precision="int4", optimize="fused"), r"precision must be one of fp32, fp16, int8, got 'int4'"),
        (dict(precision="int8"), r"precision='int8' needs optimize='fused'"),
        (dict(precision="fp16", optimize="fused", min_agreement=1.5), r"min_agreement must be .* got 1.5"),
    ],
)
def test_bad_precision_arguments_are_refused(tiny_gpt2_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_model(tiny_gpt2_checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_cli_exports_int8(trained_gpt2, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "int8"
    assert run_export(parser.parse_args([str(trained_gpt2), str(out), "--optimize", "fused", "--precision", "int8"])) == 0
    assert "int8, top-1 agreement with PyTorch" in capsys.readouterr().out
    assert load_manifest(out).dtype == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args([str(trained_gpt2), str(out), "--precision", "int4"])
