"""int8 graphs from the T5 builder: what they are made of, and that they keep the model's predictions.

As for GPT-2 (test_precision.py), a random-weight model predicts almost uniformly, so the agreement tests use a
tiny T5 trained for a few seconds to copy the agreement sample, which, like a real model, is confident about what
comes next.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import tiny_models  # noqa: E402

from onnxgen import TextGeneration  # noqa: E402
from onnxgen.export.builders.verify import AGREEMENT_POSITIONS, AGREEMENT_SAMPLE  # noqa: E402
from onnxgen.manifest import TOKEN_EMBEDDINGS_FILE, load_manifest  # noqa: E402

TRAIN_STEPS = 150
PROMPTS = ["The old lighthouse keeper climbed the stairs", "Nobody remembered when the lamp had last failed"]


@pytest.fixture(scope="module")
def trained_t5(tiny_t5_checkpoint, tmp_path_factory):
    """The tiny test T5, trained to copy the agreement sample (what the export check reads of it) and the prompts
    from encoder to decoder."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_t5_checkpoint)
    config = transformers.T5Config.from_pretrained(tiny_t5_checkpoint)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    checked = tokenizer(AGREEMENT_SAMPLE).input_ids[: AGREEMENT_POSITIONS + 1]  # what the export check reads
    texts = [tokenizer.decode(checked, skip_special_tokens=True)] + PROMPTS
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    path = tmp_path_factory.mktemp("trained") / "t5"
    return tiny_models.train_on_one_batch(model, tokenizer, path, steps=TRAIN_STEPS, lr=1e-2, max_loss=0.8, **batch,
                                          labels=labels)


@pytest.fixture(scope="module")
def exported(trained_t5, tmp_path_factory):
    """precision -> fused model directory, int8 exported with the default min_agreement (0.99)."""
    return tiny_models.export_precisions(trained_t5, tmp_path_factory.mktemp("precision_t5"), ("fp32", "int8"))


def _graph(directory, name):
    return onnx.load(str(directory / load_manifest(directory).graphs[name].file)).graph


def test_int8_graphs_quantize_every_matmul_and_the_lm_head(exported):
    manifest = load_manifest(exported["int8"])
    for name in ("encoder", "decoder"):
        graph = _graph(exported["int8"], name)
        ops = [node.op_type for node in graph.node]
        assert "DynamicQuantizeMatMul" in ops and not {"MatMul", "Gemm"} & set(ops), name
        weights = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "DynamicQuantizeMatMul":
                matrix, scale, zero_point = (weights[n] for n in node.input[1:4])
                assert matrix.data_type == zero_point.data_type == onnx.TensorProto.UINT8
                assert list(scale.dims) == list(zero_point.dims) == [matrix.dims[1]]
    head = next(n for n in _graph(exported["int8"], "decoder").node if n.output[0] == "logits")
    assert head.op_type == "DynamicQuantizeMatMul"
    assert np.load(exported["int8"] / TOKEN_EMBEDDINGS_FILE, mmap_mode="r").dtype == np.float32  # the lookup
    assert manifest.dtype == "int8" and load_manifest(exported["fp32"]).dtype == "float32"


def test_int8_agrees_with_pytorch_and_the_manifest_says_so(exported):
    check = load_manifest(exported["int8"]).verification
    assert check["check"] == "top1-agreement" and check["passed"]
    assert check["agreement"] >= 0.99 and check["positions"] >= 64


def test_int8_generates_what_pytorch_generates(trained_t5, exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_t5)
    model = transformers.T5ForConditionalGeneration.from_pretrained(trained_t5).eval()
    generation = TextGeneration(exported["int8"], device="cpu")
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, do_sample=False, max_new_tokens=12)
        got = generation.generate_ids([ids[0].tolist()], do_sample=False, max_new_tokens=12)
        assert got[0][0] == expected[0, 1:].tolist()  # transformers' output starts with the decoder start token


def test_int8_runs_every_search_in_batches_as_fp32_does(exported):
    fp32 = TextGeneration(exported["fp32"], device="cpu")
    int8 = TextGeneration(exported["int8"], device="cpu")
    for kwargs in (dict(num_beams=3, max_new_tokens=12), dict(do_sample=False, max_new_tokens=12)):
        assert int8(PROMPTS, **kwargs) == fp32(PROMPTS, **kwargs)  # the trained model is far from any tie
    sampled = int8(PROMPTS, do_sample=True, top_k=5, seed=3, max_new_tokens=8, num_generations=2)
    assert [len(row) for row in sampled] == [2, 2]
