"""The T5 graph builder and the static encoder-decoder runtime, against transformers and against optimum's graphs.

A static directory is a tiny checkpoint's fused export (optimize="fused"): the builder's graphs (an encoder
that also writes the cross-attention keys/values, a decoder step over self-attention buffers shared between past
and present). Logits must match transformers, and generation through it must give transformers' tokens and the
optimum path's tokens for every search and batching the generator does. Besides the shared tiny T5 (ReLU, tied),
a gated-GELU, untied T5 with few position buckets and a short max distance makes decoding run past the
relative-position table's last bucket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import tiny_models  # noqa: E402
from test_builder_gpt2 import check_rows_are_read_not_mapped  # noqa: E402
from test_parity import T5_PROMPTS, HFReference, _check_ids_and_text  # noqa: E402

from onnxgen import TextGeneration  # noqa: E402
from onnxgen.export import export_model  # noqa: E402
from onnxgen.export.builders import t5 as t5_builder  # noqa: E402
from onnxgen.export.builders.verify_t5 import verify_static_t5  # noqa: E402
from onnxgen.export.errors import ExportError  # noqa: E402
from onnxgen.generator import Generator  # noqa: E402
from onnxgen.manifest import STATIC_KV, TOKEN_EMBEDDINGS_FILE, expected_io, load_manifest  # noqa: E402
from onnxgen.model import load_model, static_encoder_decoder  # noqa: E402
from onnxgen.model.encoder_decoder import EncoderDecoderModel  # noqa: E402
from onnxgen.model.static_encoder_decoder import StaticEncoderDecoderModel  # noqa: E402

ATOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 1], [12, 13, 1], [14, 15, 16, 17, 1]]  # different lengths: padded encoder rows
# Gated GELU (v1.1 / mT5), untied head, and a position table that runs out after 12 tokens.
GATED_CONFIG = dict(
    num_layers=3, num_decoder_layers=2, num_heads=2, d_model=48, d_kv=24, d_ff=96, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, relative_attention_num_buckets=8, relative_attention_max_distance=12,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)


def make_static_dir(checkpoint: Path, output: Path) -> Path:
    """The fused export of `checkpoint` (verified against PyTorch on the way)."""
    manifest = export_model(checkpoint, output, force=True, progress=False, optimize="fused")
    assert manifest.verification["passed"] and manifest.optimizations == t5_builder.OPTIMIZATIONS
    return output


def build_gated_checkpoint(path: Path) -> Path:
    tokenizer = tiny_models.train_t5_tokenizer()
    torch.manual_seed(1)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=len(tokenizer), **GATED_CONFIG))
    return tiny_models._save(model.eval(), tokenizer, path)


@pytest.fixture(scope="module")
def static_dir(tiny_t5_checkpoint, tmp_path_factory):
    return make_static_dir(tiny_t5_checkpoint, tmp_path_factory.mktemp("static") / "tiny_t5")


@pytest.fixture(scope="module")
def eager_static_dir(eager_eos_t5_checkpoint, tmp_path_factory):
    return make_static_dir(eager_eos_t5_checkpoint, tmp_path_factory.mktemp("static") / "eager_eos_t5")


@pytest.fixture(scope="module")
def gated_checkpoint(tmp_path_factory):
    return build_gated_checkpoint(tmp_path_factory.mktemp("checkpoints") / "gated_t5")


@pytest.fixture(scope="module")
def gated_onnx(gated_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("onnx") / "gated_t5"
    export_model(gated_checkpoint, output, force=True, progress=False)
    return output


@pytest.fixture(scope="module")
def gated_static_dir(gated_checkpoint, tmp_path_factory):
    return make_static_dir(gated_checkpoint, tmp_path_factory.mktemp("static") / "gated_t5")


@pytest.fixture(scope="module", params=["tiny", "gated"])
def pair(request, tiny_t5_onnx, static_dir, gated_onnx, gated_static_dir):
    """(dynamic, static) TextGeneration over the same weights."""
    dynamic, static = (tiny_t5_onnx, static_dir) if request.param == "tiny" else (gated_onnx, gated_static_dir)
    return TextGeneration(dynamic, device="cpu"), TextGeneration(static, device="cpu")


# -- the graphs ---------------------------------------------------------------------------------------------


def _graph(directory: Path, name: str):
    path = directory / load_manifest(directory).graphs[name].file
    return onnx.load(str(path), load_external_data=False).graph  # external tensors keep their locations


def _external_location(graph, name: str) -> str | None:
    tensor = next(t for t in graph.initializer if t.name == name)
    return dict((e.key, e.value) for e in tensor.external_data).get("location")


def test_the_graphs_are_made_of_fused_operators_and_take_embeddings(static_dir, gated_static_dir):
    decoder = _graph(static_dir, "decoder")
    ops = {node.op_type for node in decoder.node}
    assert {"GroupQueryAttention", "MultiHeadAttention", "SkipSimplifiedLayerNormalization", "Gemm"} <= ops
    assert not ops & {"Softmax", "Pow", "ReduceMean", "Attention"}
    names = [t.name for t in decoder.initializer]
    assert "shared.weight" not in names and "lm_head.weight" not in names
    head = next(node for node in decoder.node if node.op_type == "Gemm")
    # tied: the head is the token table's rows, read from its file and rescaled by alpha
    assert _external_location(decoder, head.input[1]) == TOKEN_EMBEDDINGS_FILE
    assert not any("EncDecAttention.k" in name for name in names)  # the encoder graph projects those
    encoder = _graph(static_dir, "encoder")
    encoder_ops = {node.op_type for node in encoder.node}
    assert {"MultiHeadAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= encoder_ops
    for graph in (encoder, decoder):
        assert "inputs_embeds" in [i.name for i in graph.input] and "input_ids" not in [i.name for i in graph.input]
        assert all("relative_position_bias" in node.input[0] for node in graph.node if node.op_type == "Gather")
    gated = _graph(gated_static_dir, "decoder")
    head = next(node for node in gated.node if node.op_type == "Gemm")
    assert _external_location(gated, head.input[1]) != TOKEN_EMBEDDINGS_FILE  # untied: its own weight
    assert "FastGelu" in {node.op_type for node in gated.node}


def test_the_runtime_reads_token_rows_for_the_encoder_and_the_decoder(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    check_rows_are_read_not_mapped(model, static_dir)
    with pytest.raises(ValueError, match=f"token id {model.vocab_size} is outside"):
        model.prefill([[5, 6, model.vocab_size]])


def test_the_manifest_names_the_layout_and_dispatches_by_architecture(static_dir, tiny_t5_onnx):
    manifest = load_manifest(static_dir)
    assert manifest.has_static_kv and STATIC_KV in manifest.optimizations
    assert set(manifest.graphs) == {"encoder", "decoder"}
    inputs, _ = expected_io(manifest)["decoder"]
    assert {"seqlens_k", "total_sequence_length", "past_key_values.0.encoder.key"} <= inputs
    assert isinstance(load_model(manifest, static_dir, "auto"), StaticEncoderDecoderModel)
    dynamic = load_manifest(tiny_t5_onnx)
    assert not dynamic.has_static_kv
    assert isinstance(load_model(dynamic, tiny_t5_onnx, "cpu"), EncoderDecoderModel)


@pytest.mark.parametrize("which", ["tiny", "gated"])
def test_the_export_check_passes(which, tiny_t5_checkpoint, static_dir, gated_checkpoint, gated_static_dir):
    tiny = which == "tiny"
    checkpoint, directory = (tiny_t5_checkpoint, static_dir) if tiny else (gated_checkpoint, gated_static_dir)
    model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    record = verify_static_t5(model, tokenizer, directory, load_manifest(directory).graphs, ATOL)
    assert record["passed"], record
    assert record["rows"][0] > record["rows"][1]


def test_position_buckets_are_transformers_buckets():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 700)
    for buckets, distance in ((32, 128), (8, 12), (16, 128), (64, 256), (32, 20)):
        for bidirectional in (True, False):
            expected = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional, buckets, distance)
            got = t5_builder.relative_position_bucket(relative, bidirectional, buckets, distance)
            np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(d_kv=12), "d_kv 12 is not a multiple of 8"),
        (dict(feed_forward_proj="gated-tanh"), "activation 'tanh' is not supported"),
        (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets 2"),
        (dict(relative_attention_num_buckets=8, relative_attention_max_distance=4), "max distance above half"),
    ],
    ids=["head-size", "activation", "buckets", "max-distance-at-half"],
)
def test_configs_the_graphs_cannot_represent_are_refused(change, message):
    config = transformers.T5Config(**{**GATED_CONFIG, "vocab_size": 50, **change})
    with pytest.raises(ExportError, match=message):
        t5_builder.T5Dims.from_config(config)


# -- logits -------------------------------------------------------------------------------------------------


def _run_steps(model, prompts: list[list[int]], steps: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """Prefill (the start token), then greedy steps; the logits of every call and the decoder sequences."""
    prefill = model.prefill(prompts)
    logits, state = [prefill.logits], prefill.state
    sequences = [[int(prefill.history[r, 0])] for r in range(len(prompts))]
    for _ in range(steps):
        tokens = logits[-1].argmax(axis=-1)
        for row, token in zip(sequences, tokens):
            row.append(int(token))
        logits.append(state.step(tokens.astype(np.int64)))
    return logits, sequences


def test_logits_match_transformers_past_the_last_position_bucket(gated_checkpoint, gated_static_dir):
    hf = transformers.T5ForConditionalGeneration.from_pretrained(gated_checkpoint).eval()
    model = load_model(load_manifest(gated_static_dir), gated_static_dir, "cpu")
    steps = GATED_CONFIG["relative_attention_max_distance"] + 6
    logits, sequences = _run_steps(model, PROMPTS, steps)
    with torch.no_grad():
        for r, prompt in enumerate(PROMPTS):
            out = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([sequences[r]]))
            got = np.stack([step[r] for step in logits])
            np.testing.assert_allclose(got, out.logits[0].numpy(), atol=ATOL, rtol=0)


def test_logits_match_optimums_graphs(static_dir, tiny_t5_onnx):
    static = load_model(load_manifest(static_dir), static_dir, "cpu")
    dynamic = load_model(load_manifest(tiny_t5_onnx), tiny_t5_onnx, "cpu")
    static_logits, static_sequences = _run_steps(static, PROMPTS, steps=5)
    dynamic_logits, dynamic_sequences = _run_steps(dynamic, PROMPTS, steps=5)
    assert static_sequences == dynamic_sequences
    np.testing.assert_allclose(np.stack(static_logits), np.stack(dynamic_logits), atol=ATOL, rtol=0)


def test_steps_write_the_bound_buffer_in_place(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    state = model.prefill(PROMPTS).state
    buffer = state.kv
    assert np.any(buffer[:, :, :, :, 0] != 0) and np.all(buffer[:, :, :, :, 1:] == 0)  # the start token only
    state.step(np.array([1, 2, 3]))
    assert state.kv is buffer and np.any(buffer[:, :, :, :, 1] != 0) and np.all(buffer[:, :, :, :, 2:] == 0)
    assert list(state.lengths) == [2, 2, 2]
    np.testing.assert_array_equal(state.mask, [[1] * 8, [1] * 3 + [0] * 5, [1] * 5 + [0] * 3])


def test_select_reorders_rows_across_prompts_and_regrows_within_the_allocation(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    state = model.prefill(PROMPTS).state
    state.step(np.array([4, 5, 6]))
    state.select(np.array([2, 1]))  # drop a row: the allocation stays 3 rows
    state.select(np.array([1, 0, 1]))  # back to 3 rows, the third slot's old contents must not be trusted
    got = state.step(np.array([7, 8, 9]))
    fresh = model.prefill([PROMPTS[1], PROMPTS[2], PROMPTS[1]]).state
    fresh.step(np.array([5, 6, 5]))
    np.testing.assert_allclose(got, fresh.step(np.array([7, 8, 9])), atol=1e-5, rtol=0)


def test_rows_moved_between_prompts_after_an_expansion_read_their_new_prompts_encoding(static_dir):
    # Expanding past the allocation (beams) rebuilds the encoder-side arrays; a later move of rows between prompts
    # at the same row count copies them in place, which the bound graph must see.
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    first, second = PROMPTS[0], PROMPTS[1]
    state = model.prefill([first, second]).state
    state.select(np.array([0, 0, 1, 1]))
    assert state.cross.flags.c_contiguous
    state.step(np.array([4, 4, 5, 5]))
    state.select(np.array([2, 3, 0, 1]))
    got = state.step(np.array([6, 6, 7, 7]))
    fresh = model.prefill([second, first]).state
    fresh.select(np.array([0, 0, 1, 1]))
    fresh.step(np.array([5, 5, 4, 4]))
    np.testing.assert_allclose(got, fresh.step(np.array([6, 6, 7, 7])), atol=1e-5, rtol=0)


def test_history_and_prompt_lengths_are_the_optimum_paths(static_dir, tiny_t5_onnx):
    static = load_model(load_manifest(static_dir), static_dir, "cpu").prefill(PROMPTS)
    dynamic = load_model(load_manifest(tiny_t5_onnx), tiny_t5_onnx, "cpu").prefill(PROMPTS)
    np.testing.assert_array_equal(static.history, dynamic.history)
    np.testing.assert_array_equal(static.prompt_lengths, dynamic.prompt_lengths)


# -- tokens: static against dynamic, and against transformers -------------------------------------------------

SEARCHES = [
    ("greedy", dict(do_sample=False, max_new_tokens=20)),
    ("beam3-n2", dict(num_beams=3, max_new_tokens=12, num_generations=2)),
    ("beam4-lp0.5", dict(num_beams=4, max_new_tokens=10, length_penalty=0.5)),
    ("sampling", dict(do_sample=True, top_k=20, temperature=1.1, max_new_tokens=15, seed=3, num_generations=2)),
    ("repetition-ngram", dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in SEARCHES], ids=[c[0] for c in SEARCHES])
def test_static_gives_the_dynamic_paths_tokens_on_a_mixed_length_batch(pair, kwargs):
    dynamic, static = pair
    prompts = [dynamic.tokenizer.encode(p) for p in T5_PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    assert static.generate_ids(prompts, **kwargs) == dynamic.generate_ids(prompts, **kwargs)


def _join_mid_run(tg: TextGeneration) -> list[list[int]]:
    """A greedy prompt runs two steps alone, then a beam prompt and a second greedy one join it."""
    prompts = [tg.tokenizer.encode(p) for p in T5_PROMPTS]
    generator = Generator(tg.model, tg.tokenizer.decode)
    handles = generator.add([prompts[2]], [tg.plan(dict(do_sample=False, max_new_tokens=12))])
    generator.step()
    generator.step()
    handles += generator.add(prompts[:2], [tg.plan(dict(num_beams=3, max_new_tokens=8)),
                                           tg.plan(dict(do_sample=False, max_new_tokens=10))])
    while not generator.is_done():
        generator.step()
    return [[out.token_ids for out in generator.pop(h)] for h in handles]


def test_a_prompt_joining_mid_run_gets_the_dynamic_paths_tokens(pair):
    dynamic, static = pair
    joined = _join_mid_run(static)
    assert joined == _join_mid_run(dynamic)
    prompts = [static.tokenizer.encode(p) for p in T5_PROMPTS]
    assert joined[1] == static.generate_ids([prompts[0]], num_beams=3, max_new_tokens=8)[0]  # as if alone


def test_buffers_grow_by_chunks_without_changing_tokens(pair, monkeypatch):
    dynamic, static = pair
    monkeypatch.setattr(static_encoder_decoder, "KV_CHUNK", 8)  # 25 new tokens: several growths
    prompts = [dynamic.tokenizer.encode(p) for p in T5_PROMPTS]
    # max_length (decoder tokens, the start token included) leaves the buffers at a chunk, growing
    for kwargs in (dict(do_sample=False, max_length=26), dict(num_beams=3, max_length=26)):
        assert static.generate_ids(prompts, **kwargs) == dynamic.generate_ids(prompts, **kwargs)
    assert static.model.prefill(prompts).state.capacity == 8
    assert static.model.prefill(prompts, max_new_tokens=25).state.capacity == 26  # told: the start token + 25
    for kwargs in (dict(do_sample=False, max_new_tokens=25), dict(num_beams=3, max_new_tokens=25)):
        assert static.generate_ids(prompts, **kwargs) == dynamic.generate_ids(prompts, **kwargs)


def test_cuda_is_refused_by_name(static_dir):
    with pytest.raises(ValueError, match="device='cpu' only"):
        StaticEncoderDecoderModel(load_manifest(static_dir), static_dir, "cuda")


PARITY_CASES = [
    ("greedy", dict(do_sample=False, max_new_tokens=20)),
    ("beam3-lp2", dict(num_beams=3, max_new_tokens=12, length_penalty=2.0)),
    ("beam4-lp0.5-n2", dict(num_beams=4, max_new_tokens=10, length_penalty=0.5, num_return_sequences=2)),
    ("ngram3-beam3", dict(num_beams=3, max_new_tokens=15, no_repeat_ngram_size=3)),
    ("repetition1.5-max-length", dict(do_sample=False, max_length=12, repetition_penalty=1.5)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_static_matches_transformers(tiny_t5_checkpoint, static_dir, gated_checkpoint, gated_static_dir, kwargs):
    for checkpoint, directory in ((tiny_t5_checkpoint, static_dir), (gated_checkpoint, gated_static_dir)):
        hf = HFReference(checkpoint, seq2seq=True)
        _check_ids_and_text(hf, TextGeneration(directory, device="cpu"), T5_PROMPTS, kwargs)


def test_untied_head_with_early_eos_matches_transformers(eager_eos_t5_checkpoint, eager_static_dir):
    hf = HFReference(eager_eos_t5_checkpoint, seq2seq=True)
    tg = TextGeneration(eager_static_dir, device="cpu")
    for kwargs in (dict(do_sample=False, max_new_tokens=20, min_new_tokens=8), dict(num_beams=4, max_new_tokens=15)):
        _check_ids_and_text(hf, tg, T5_PROMPTS, kwargs)
