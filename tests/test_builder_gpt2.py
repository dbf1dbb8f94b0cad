"""The GPT-2 graph builder and the static decode step, against transformers and against optimum's graph.

The static directory is the tiny checkpoint's onnxgen export with its decoder replaced by the builder's graph
(GroupQueryAttention over key/value buffers shared between past and present, last-position logits only). Its logits
must match transformers and optimum's graph, and generation through it must give the same tokens as the dynamic
path for every search and batching the generator does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from test_parity import GPT2_PROMPTS, HFReference, _check_ids_and_text  # noqa: E402

from onnxgen import TextGeneration  # noqa: E402
from onnxgen.export import export_model  # noqa: E402
from onnxgen.export.builders import GPT2_OPTIMIZATIONS, write_gpt2  # noqa: E402
from onnxgen.export.builders.verify import verify_static_gpt2  # noqa: E402
from onnxgen.generator import Generator  # noqa: E402
from onnxgen.processors import log_softmax  # noqa: E402
from onnxgen.export.builders import graph as graph_module  # noqa: E402
from onnxgen.manifest import STATIC_KV, TOKEN_EMBEDDINGS_FILE, ManifestError, expected_io, load_manifest  # noqa: E402
from onnxgen.model import load_model  # noqa: E402
from onnxgen.model import session, static_decoder  # noqa: E402
from onnxgen.model.decoder_only import DecoderOnlyModel  # noqa: E402
from onnxgen.model.static_decoder import StaticDecoderModel  # noqa: E402

ATOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: padded rows in one batch


def make_static_dir(checkpoint: Path, onnx_dir: Path, output: Path) -> Path:
    """The onnxgen export at `onnx_dir` with its decoder replaced by the builder's graph of `checkpoint`."""
    output.mkdir(parents=True, exist_ok=True)
    for path in onnx_dir.iterdir():
        if path.is_file() and not path.name.endswith((".onnx", ".onnx.data", "onnxgen.json")):
            shutil.copy(path, output / path.name)
    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    spec = write_gpt2(model, output)
    manifest = dataclasses.replace(load_manifest(onnx_dir), graphs={"decoder": spec}, optimizations=GPT2_OPTIMIZATIONS)
    manifest.save(output)
    return output


@pytest.fixture(scope="module")
def hf_model(tiny_gpt2_checkpoint):
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_checkpoint).eval()


@pytest.fixture(scope="module")
def static_dir(tiny_gpt2_checkpoint, tiny_gpt2_onnx, tmp_path_factory):
    return make_static_dir(tiny_gpt2_checkpoint, tiny_gpt2_onnx, tmp_path_factory.mktemp("static") / "tiny_gpt2")


@pytest.fixture(scope="module")
def eager_static_dir(eager_eos_gpt2_checkpoint, eager_eos_gpt2_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "eager_eos_gpt2"
    return make_static_dir(eager_eos_gpt2_checkpoint, eager_eos_gpt2_onnx, out)


@pytest.fixture(scope="module")
def pair(tiny_gpt2_onnx, static_dir):
    """(dynamic, static) TextGeneration over the same weights."""
    return TextGeneration(tiny_gpt2_onnx, device="cpu"), TextGeneration(static_dir, device="cpu")


# -- the graph ----------------------------------------------------------------------------------------------


def _graph(directory: Path):
    path = directory / load_manifest(directory).graphs["decoder"].file
    return onnx.load(str(path), load_external_data=False).graph  # external tensors keep their locations


def head_chunks(directory: Path, graph) -> list[np.ndarray]:
    """The LM head's weights in vocabulary order, one per Gemm, read with their external data (table rows)."""
    full = onnx.load(str(directory / load_manifest(directory).graphs["decoder"].file))  # loads external data
    weights = {t.name: t for t in full.graph.initializer}
    gemms = [node for node in graph.node if node.op_type == "Gemm"]
    return [onnx.numpy_helper.to_array(weights[node.input[1]]) for node in gemms]


def external_location(graph, name: str) -> str | None:
    tensor = next(t for t in graph.initializer if t.name == name)
    return dict((e.key, e.value) for e in tensor.external_data).get("location")


def test_the_graph_is_made_of_fused_operators_and_takes_embeddings(static_dir, eager_static_dir):
    graph = _graph(static_dir)
    ops = {node.op_type for node in graph.node}
    assert {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu", "Gemm"} <= ops
    assert not ops & {"Softmax", "Attention", "MultiHeadAttention", "Tanh", "Pow"}
    assert "inputs_embeds" in [i.name for i in graph.input] and "input_ids" not in [i.name for i in graph.input]
    assert [node.input[0] for node in graph.node if node.op_type == "Gather"] == ["wpe.weight"]  # positions only
    # The tied head is the token table's rows, read from its file by Gemm (transB), not a copy in the graph.
    table = np.load(static_dir / TOKEN_EMBEDDINGS_FILE)
    head = next(node for node in graph.node if node.op_type == "Gemm")
    assert onnx.helper.get_attribute_value(head.attribute[0]) == 1
    assert external_location(graph, head.input[1]) == TOKEN_EMBEDDINGS_FILE
    np.testing.assert_array_equal(np.concatenate(head_chunks(static_dir, graph)), table)
    untied = _graph(eager_static_dir)  # untied checkpoint: the head is its own weight
    head = next(node for node in untied.node if node.op_type == "Gemm")
    assert external_location(untied, head.input[1]) != TOKEN_EMBEDDINGS_FILE


def test_a_head_too_big_for_one_chunk_is_split_without_changing_logits(hf_model, static_dir, tmp_path, monkeypatch):
    table_bytes = np.load(static_dir / TOKEN_EMBEDDINGS_FILE, mmap_mode="r").nbytes
    monkeypatch.setattr(graph_module, "HEAD_CHUNK_BYTES", table_bytes // 3 + 1)  # three chunks
    chunked = shutil.copytree(static_dir, tmp_path / "chunked")
    write_gpt2(hf_model, chunked)
    graph = _graph(chunked)
    assert [node.op_type for node in graph.node][-5:] == ["Gemm", "Gemm", "Gemm", "Concat", "LogSoftmax"]
    np.testing.assert_array_equal(
        np.concatenate(head_chunks(chunked, graph)), np.load(static_dir / TOKEN_EMBEDDINGS_FILE)
    )
    whole, split = (load_model(load_manifest(d), d, "cpu") for d in (static_dir, chunked))
    a, b = whole.prefill(PROMPTS), split.prefill(PROMPTS)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.state.step(np.array([1, 2, 3])), a.state.step(np.array([1, 2, 3])), atol=1e-5, rtol=0)


def test_the_graph_returns_log_softmax_and_the_reported_logprobs_are_the_dynamic_paths(pair):
    dynamic, static = pair
    prefill = static.model.prefill(PROMPTS)
    np.testing.assert_allclose(prefill.logprobs, log_softmax(prefill.logits), atol=1e-5, rtol=0)
    logits = prefill.state.step(np.array([1, 2, 3]))
    np.testing.assert_allclose(prefill.state.logprobs, log_softmax(logits), atol=1e-5, rtol=0)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, seed=4, num_generations=2)):
        a, b = (tg(GPT2_PROMPTS, max_new_tokens=8, return_details=True, **kwargs) for tg in (dynamic, static))
        flat = [[g for item in out for g in (item if isinstance(item, list) else [item])] for out in (a, b)]
        assert len(flat[0]) == len(flat[1]) == len(GPT2_PROMPTS) * kwargs.get("num_generations", 1)
        for x, y in zip(*flat):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(y.logprobs, x.logprobs, atol=1e-4, rtol=0)


def check_rows_are_read_not_mapped(model, directory: Path) -> None:
    """The runtime's lookup gives the table's rows, and the process holds no map of the file after using it."""
    table = np.load(directory / TOKEN_EMBEDDINGS_FILE)
    ids = np.array([[3, 1, 4], [1, 5, 9]])
    np.testing.assert_array_equal(model.token_table[ids], table[ids])
    out = np.zeros((2, 1, table.shape[1]), table.dtype)
    model.token_table.lookup(np.array([7, 2]), out=out[:, 0])
    np.testing.assert_array_equal(out[:, 0], table[[7, 2]])
    model.prefill([[5, 6, 7]]).state.step(np.array([8]))
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: a map would make every page read around a token resident (see token_table)
        assert str((directory / TOKEN_EMBEDDINGS_FILE).resolve()) not in maps.read_text()


def test_lookups_into_the_wrong_output_or_outside_the_table_fail_loudly(static_dir):
    table = load_model(load_manifest(static_dir), static_dir, "cpu").token_table
    with pytest.raises(ValueError, match="float32 rows of shape"):
        table.lookup(np.array([1, 2]), out=np.zeros((2, table.shape[1]), np.float64))
    with pytest.raises(ValueError, match="float32 rows of shape"):
        table.lookup(np.array([1, 2]), out=np.zeros((3, table.shape[1]), np.float32))
    with pytest.raises(ValueError, match=f"token id {table.shape[0]} is outside"):
        table.lookup(np.array([1, table.shape[0]]))  # a step's token, not only a prompt's, is checked


def test_the_runtime_reads_token_rows_and_refuses_ids_outside_the_table(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    check_rows_are_read_not_mapped(model, static_dir)
    with pytest.raises(ValueError, match=f"token id {model.vocab_size} is outside"):
        model.prefill([[1, 2, model.vocab_size]])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model.prefill([[-1, 2]])


def test_fused_graphs_of_an_older_export_are_refused_with_the_fix(static_dir, tmp_path):
    old = shutil.copytree(static_dir, tmp_path / "old")
    manifest = load_manifest(old)
    dataclasses.replace(manifest, optimizations=manifest.optimizations[:3], format_version=1).save(old)
    with pytest.raises(ManifestError, match="re-export it: `onnxgen export SOURCE .* --optimize fused --precision fp32`"):
        load_manifest(old)
    # `onnxgen info` still describes it, says why it cannot be loaded, and exits 2.
    result = subprocess.run([sys.executable, "-m", "onnxgen.cli", "info", str(old)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    info = json.loads(result.stdout)
    assert info["architecture"] == "gpt2" and info["format_version"] == 1 and info["loadable"] is False
    assert "re-export it" in info["problem"]
    assert result.stderr.strip().splitlines() == [f"onnxgen info: error: {info['problem']}"]


def test_the_manifest_names_the_layout_and_old_manifests_still_load(static_dir, tiny_gpt2_onnx):
    manifest = load_manifest(static_dir)
    assert manifest.has_static_kv and STATIC_KV in manifest.optimizations
    inputs, outputs = expected_io(manifest)["decoder"]
    assert {"seqlens_k", "total_sequence_length"} <= inputs and "attention_mask" not in inputs
    assert isinstance(load_model(manifest, static_dir, "auto"), StaticDecoderModel)
    dynamic = load_manifest(tiny_gpt2_onnx)
    assert not dynamic.has_static_kv
    assert isinstance(load_model(dynamic, tiny_gpt2_onnx, "cpu"), DecoderOnlyModel)


def test_the_export_check_passes(hf_model, static_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(static_dir)
    record = verify_static_gpt2(hf_model, tokenizer, static_dir, load_manifest(static_dir).graphs, ATOL)
    assert record["passed"], record


# -- logits -------------------------------------------------------------------------------------------------


def _run_steps(model, prompts: list[list[int]], steps: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """Prefill, then greedy steps; the logits of every call and the sequences they lead to."""
    prefill = model.prefill(prompts)
    logits, state = [prefill.logits], prefill.state
    sequences = [list(p) for p in prompts]
    for _ in range(steps):
        tokens = logits[-1].argmax(axis=-1)
        for row, token in zip(sequences, tokens):
            row.append(int(token))
        logits.append(state.step(tokens.astype(np.int64)))
    return logits, sequences


def test_logits_match_transformers_for_a_padded_batch_and_decode_steps(hf_model, static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    logits, sequences = _run_steps(model, PROMPTS, steps=6)
    with torch.no_grad():
        for r, sequence in enumerate(sequences):
            reference = hf_model(torch.tensor([sequence])).logits[0].numpy()
            n = len(PROMPTS[r])
            got = np.stack([step[r] for step in logits])  # after positions n-1, n, ..., n+5
            np.testing.assert_allclose(got, reference[n - 1 : n + len(logits) - 1], atol=ATOL, rtol=0)


def test_logits_match_optimums_graph(static_dir, tiny_gpt2_onnx):
    static = load_model(load_manifest(static_dir), static_dir, "cpu")
    dynamic = load_model(load_manifest(tiny_gpt2_onnx), tiny_gpt2_onnx, "cpu")
    static_logits, static_sequences = _run_steps(static, PROMPTS, steps=5)
    dynamic_logits, dynamic_sequences = _run_steps(dynamic, PROMPTS, steps=5)
    assert static_sequences == dynamic_sequences
    np.testing.assert_allclose(np.stack(static_logits), np.stack(dynamic_logits), atol=ATOL, rtol=0)


def test_steps_write_the_bound_buffer_in_place(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    prefill = model.prefill(PROMPTS)
    state = prefill.state
    buffer = state.kv
    assert np.all(buffer[:, :, :, :, 7:] == 0)  # the prompt wrote its 7 padded columns
    padding = buffer[:, :, 1, :, 2].copy()  # row 1 holds 2 tokens; column 2 is padding until the step
    state.step(np.array([1, 2, 3]))
    assert state.kv is buffer and not np.array_equal(buffer[:, :, 1, :, 2], padding)
    assert np.all(buffer[:, :, 0, :, 8:] == 0) and np.any(buffer[:, :, 0, :, 7] != 0)
    assert list(state.lengths) == [8, 3, 5]


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
    prompts = [dynamic.tokenizer.encode(p) for p in GPT2_PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    assert static.generate_ids(prompts, **kwargs) == dynamic.generate_ids(prompts, **kwargs)


def _join_mid_run(tg: TextGeneration) -> list[list[int]]:
    """A greedy prompt runs two steps alone, then a beam prompt and a second greedy one join it."""
    prompts = [tg.tokenizer.encode(p) for p in GPT2_PROMPTS]
    generator = Generator(tg.model, tg.tokenizer.decode)
    handles = generator.add([prompts[0]], [tg.plan(dict(do_sample=False, max_new_tokens=12))])
    generator.step()
    generator.step()
    handles += generator.add(prompts[1:], [tg.plan(dict(num_beams=3, max_new_tokens=8)),
                                           tg.plan(dict(do_sample=False, max_new_tokens=10))])
    while not generator.is_done():
        generator.step()
    return [[out.token_ids for out in generator.pop(h)] for h in handles]


def test_log_probabilities_follow_their_rows_through_joins_and_beams(pair):
    """A sampling prompt runs two steps, then a beam-sampling and a greedy prompt join: every reported log-prob
    (the graph's log_softmax on the static path, NumPy's on the dynamic one) and `top_logprobs` must agree."""
    outputs = []
    for tg in pair:
        prompts = [tg.tokenizer.encode(p) for p in GPT2_PROMPTS]
        generator = Generator(tg.model, tg.tokenizer.decode)
        handles = generator.add([prompts[0]], [tg.plan(dict(do_sample=True, seed=5, max_new_tokens=10))])
        generator.step()
        generator.step()
        plans = [tg.plan(dict(num_beams=2, do_sample=True, seed=6, max_new_tokens=6)),
                 tg.plan(dict(do_sample=False, max_new_tokens=8))]
        handles += generator.add(prompts[1:], plans)
        top = generator.top_logprobs({handles[0]: 3, handles[2]: 3})
        while not generator.is_done():
            generator.step()
        outputs.append(([[(o.token_ids, o.logprobs) for o in generator.pop(h)] for h in handles], top))
    (dynamic, dynamic_top), (static, static_top) = outputs
    for d, s in zip(sum(dynamic, []), sum(static, [])):
        assert d[0] == s[0]
        np.testing.assert_allclose(s[1], d[1], atol=1e-4, rtol=0)
    assert dynamic_top.keys() == static_top.keys() and len(static_top) == 2
    for key, (ids, logprobs) in static_top.items():
        np.testing.assert_array_equal(ids, dynamic_top[key][0])
        np.testing.assert_allclose(logprobs, dynamic_top[key][1], atol=1e-4, rtol=0)


def test_a_prompt_joining_mid_run_gets_the_dynamic_paths_tokens(pair):
    dynamic, static = pair
    joined = _join_mid_run(static)
    assert joined == _join_mid_run(dynamic)
    prompts = [static.tokenizer.encode(p) for p in GPT2_PROMPTS]
    assert joined[1] == static.generate_ids([prompts[1]], num_beams=3, max_new_tokens=8)[0]  # as if alone


def test_buffers_grow_by_chunks_without_changing_tokens(pair, monkeypatch):
    dynamic, static = pair
    monkeypatch.setattr(static_decoder, "KV_CHUNK", 8)  # prompts of 2-12 tokens up to 40 in all: several growths
    prompts = [dynamic.tokenizer.encode(p) for p in GPT2_PROMPTS]
    # max_length leaves the new-token count to each prompt's length, so the buffers start at a chunk and grow
    for kwargs in (dict(do_sample=False, max_length=40), dict(num_beams=3, max_length=40)):
        assert static.generate_ids(prompts, **kwargs) == dynamic.generate_ids(prompts, **kwargs)
    width = max(len(p) for p in prompts)
    assert static.model.prefill(prompts).state.capacity == 16
    assert static.model.prefill(prompts, max_new_tokens=25).state.capacity == width + 25  # told: exactly that
    generator = Generator(static.model)
    generator.add(prompts, [static.plan(dict(do_sample=False, max_new_tokens=n)) for n in (5, 25, 9)])
    assert generator.cohorts[0].state.capacity == width + 25  # the generator tells the largest bound


def test_large_prefills_hand_freed_heap_back(static_dir, monkeypatch):
    session.release_freed_heap()  # the real call: malloc_trim on glibc, nothing elsewhere
    calls = []
    monkeypatch.setattr(static_decoder, "release_freed_heap", lambda: calls.append(1))
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    model.prefill([[5, 6, 7]])
    assert calls == []  # small prompts do not pay for it
    model.prefill([[5] * 32] * (session.TRIM_AFTER_TOKENS // 32))
    assert calls == [1]


def test_history_is_the_left_padded_prompt_matrix(pair):
    dynamic, static = pair
    a, b = dynamic.model.prefill(PROMPTS), static.model.prefill(PROMPTS)
    np.testing.assert_array_equal(a.history, b.history)
    np.testing.assert_array_equal(a.prompt_lengths, b.prompt_lengths)


def test_a_sequence_longer_than_the_positions_is_refused(static_dir):
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        model.prefill([[1] * 257])


def test_cuda_is_refused_by_name(static_dir):
    with pytest.raises(ValueError, match="device='cpu' only"):
        StaticDecoderModel(load_manifest(static_dir), static_dir, "cuda")


PARITY_CASES = [
    ("greedy", dict(do_sample=False, max_new_tokens=20)),
    ("beam3-lp2", dict(num_beams=3, max_new_tokens=12, length_penalty=2.0)),
    ("beam4-lp0.5-n2", dict(num_beams=4, max_new_tokens=10, length_penalty=0.5, num_return_sequences=2)),
    ("ngram3-beam3", dict(num_beams=3, max_new_tokens=15, no_repeat_ngram_size=3)),
    ("repetition1.5", dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.5)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_static_matches_transformers(tiny_gpt2_checkpoint, pair, kwargs):
    _check_ids_and_text(HFReference(tiny_gpt2_checkpoint, seq2seq=False), pair[1], GPT2_PROMPTS, kwargs)


def test_untied_head_with_early_eos_matches_transformers(eager_eos_gpt2_checkpoint, eager_static_dir):
    hf = HFReference(eager_eos_gpt2_checkpoint, seq2seq=False)
    tg = TextGeneration(eager_static_dir, device="cpu")
    for kwargs in (dict(do_sample=False, max_new_tokens=20, min_new_tokens=8), dict(num_beams=4, max_new_tokens=15)):
        _check_ids_and_text(hf, tg, GPT2_PROMPTS, kwargs)


def test_a_state_returns_copies_unless_its_caller_reuses_the_outputs(static_dir):
    """The generator processes each step's logits before the next step and so takes the bound arrays themselves;
    any other caller gets copies that stay valid."""
    model = load_model(load_manifest(static_dir), static_dir, "cpu")
    state = model.prefill(PROMPTS).state
    first = state.step(np.array([1, 2, 3]))
    kept = first.copy()
    second = state.step(np.array([4, 5, 6]))
    assert second is not first and np.array_equal(first, kept)
    state.reuse_outputs = True
    third = state.step(np.array([7, 8, 9]))
    logprobs = state.logprobs
    fourth = state.step(np.array([1, 1, 1]))
    assert fourth is third and state.logprobs is logprobs  # the bound arrays, overwritten in place
    np.testing.assert_allclose(np.exp(logprobs).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "gelu_pytorch_tanh"])
def test_every_supported_activation_matches_transformers(activation, tiny_gpt2_checkpoint, tmp_path):
    config = transformers.GPT2Config.from_pretrained(tiny_gpt2_checkpoint, activation_function=activation)
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_checkpoint)
    tokenizer.save_pretrained(checkpoint)
    manifest = export_model(checkpoint, tmp_path / "fused", optimize="fused", progress=False)
    assert manifest.verification["passed"]  # logits within atol of PyTorch's on the export's sample
    prompt = tokenizer("The old lighthouse keeper").input_ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    tg = TextGeneration(tmp_path / "fused", device="cpu")
    assert tg.generate_ids([prompt], do_sample=False, max_new_tokens=8, min_new_tokens=8)[0][0] == expected
