"""The exporter: checkpoint folder in, self-contained onnxgen directory out, and every way that can be refused."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="exporting needs the export extra (torch, transformers, optimum)")
pytest.importorskip("optimum.exporters.onnx")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

import tiny_models  # noqa: E402
from onnxgen.export import ExportError, export_model  # noqa: E402
from onnxgen.export import onnx_files  # noqa: E402
from onnxgen.export.checkpoint import TASKS  # noqa: E402
from onnxgen.export.cli import add_export_arguments, run_export  # noqa: E402
from onnxgen.manifest import MANIFEST_FILE, check_graph_io, load_manifest  # noqa: E402

MULTI_BYTE_TEXTS = ["Hello, my dog is cute", "café crème € 25", "pizza 🍕 and coffee ☕", "東京は日本の首都です。"]

EXPECTED = {
    "gpt2": {
        "files": {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", MANIFEST_FILE},
        "graphs": {"decoder": "model.onnx"},
        "max_positions": 256,
    },
    "t5": {
        "files": {
            "encoder_model.onnx",
            "decoder_model.onnx",
            "decoder_with_past_model.onnx",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            MANIFEST_FILE,
        },
        "graphs": {
            "encoder": "encoder_model.onnx",
            "decoder": "decoder_model.onnx",
            "decoder_with_past": "decoder_with_past_model.onnx",
        },
        "max_positions": None,
    },
}


def _special_tokens(architecture: str, checkpoint) -> dict:
    if architecture == "gpt2":
        eos = AutoTokenizer.from_pretrained(checkpoint).convert_tokens_to_ids(tiny_models.GPT2_EOS)
        return {"eos_token_id": eos, "pad_token_id": None, "bos_token_id": eos, "decoder_start_token_id": None,
                "other_eos_token_ids": ()}
    return {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None, "decoder_start_token_id": 0,
            "other_eos_token_ids": ()}


@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_export_writes_a_self_contained_directory(architecture, request):
    directory = request.getfixturevalue(f"tiny_{architecture}_onnx")
    checkpoint = request.getfixturevalue(f"tiny_{architecture}_checkpoint")
    expected = EXPECTED[architecture]

    names = {p.name for p in directory.iterdir()}
    assert expected["files"] <= names
    assert not any(name.startswith("decoder_model_merged") for name in names)

    manifest = load_manifest(directory)
    assert manifest.source == "onnxgen"
    assert manifest.architecture == architecture
    assert {name: spec.file for name, spec in manifest.graphs.items()} == expected["graphs"]
    for name, spec in manifest.graphs.items():
        inputs, outputs = onnx_files.graph_io_names(directory / spec.file)
        check_graph_io(manifest, name, inputs, outputs)
    assert (manifest.num_layers, manifest.num_heads, manifest.head_size, manifest.hidden_size) == (2, 4, 16, 64)
    assert manifest.vocab_size == len(AutoTokenizer.from_pretrained(checkpoint))
    assert manifest.max_positions == expected["max_positions"]
    assert vars(manifest.special_tokens) == _special_tokens(architecture, checkpoint)
    assert manifest.dtype == "float32"
    assert manifest.optimizations == ()
    assert manifest.generation_defaults["eos_token_id"] == manifest.special_tokens.eos_token_id
    assert "transformers_version" not in manifest.generation_defaults
    assert {"onnxgen", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"} <= set(
        manifest.producer
    )
    check = manifest.verification
    assert check["passed"] is True
    assert 0 <= check["max_abs_diff"] <= check["atol"] == 1e-3
    assert check["sample"]


@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_tokenizer_json_matches_the_checkpoint_tokenizer(architecture, request):
    directory = request.getfixturevalue(f"tiny_{architecture}_onnx")
    reference = AutoTokenizer.from_pretrained(request.getfixturevalue(f"tiny_{architecture}_checkpoint"))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    manifest = load_manifest(directory)
    assert manifest.tokenizer.clean_up_tokenization_spaces == reference.clean_up_tokenization_spaces
    for text in MULTI_BYTE_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=manifest.tokenizer.add_special_tokens).ids
        assert ids == reference(text)["input_ids"], text
        if architecture == "gpt2":  # byte-level BPE round-trips exactly
            assert tokenizer.decode(ids) == text
    if architecture == "t5":
        assert ids[-1] == manifest.special_tokens.eos_token_id  # the T5 post-processor appends </s>


def test_special_tokens_written_in_text_stay_text_when_the_tokenizer_says_so(tiny_gpt2_checkpoint, tiny_gpt2_onnx,
                                                                            tmp_path):
    import shutil

    from onnxgen import TextGeneration
    from onnxgen.export import export_model

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_gpt2_checkpoint, checkpoint)
    AutoTokenizer.from_pretrained(checkpoint, split_special_tokens=True).save_pretrained(checkpoint)
    reference = AutoTokenizer.from_pretrained(checkpoint)
    assert reference.split_special_tokens
    export_model(checkpoint, tmp_path / "onnx", progress=False)
    ours = TextGeneration(tmp_path / "onnx", device="cpu").tokenizer
    text = f"a{tiny_models.GPT2_EOS}b"
    assert ours.encode(text) == reference(text)["input_ids"]
    assert reference.convert_tokens_to_ids(tiny_models.GPT2_EOS) not in ours.encode(text)  # no control token
    assert load_manifest(tmp_path / "onnx").tokenizer.split_special_tokens
    plain = AutoTokenizer.from_pretrained(tiny_gpt2_checkpoint)  # the default: the text is the special token
    assert TextGeneration(tiny_gpt2_onnx, device="cpu").tokenizer.encode(text) == plain(text)["input_ids"]
    assert "split_special_tokens" not in json.loads((tiny_gpt2_onnx / "onnxgen.json").read_text())["tokenizer"]


def test_verification_failure_raises_and_records_it(tiny_gpt2_checkpoint, tmp_path, monkeypatch):
    from onnxgen.export import exporter

    real_export_graphs = exporter._export_graphs

    def export_then_perturb(checkpoint, output):
        real_export_graphs(checkpoint, output)
        with torch.no_grad():  # PyTorch now disagrees with the graphs just written
            checkpoint.model.transformer.ln_f.bias += 0.5

    monkeypatch.setattr(exporter, "_export_graphs", export_then_perturb)
    with pytest.raises(ExportError, match=r"verification failed.*atol=0\.001") as info:
        export_model(tiny_gpt2_checkpoint, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    record = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["verification"]
    assert record["passed"] is False and record["max_abs_diff"] > 1e-3


def test_no_verify_records_that_it_was_skipped(tiny_gpt2_checkpoint, tmp_path):
    manifest = export_model(tiny_gpt2_checkpoint, tmp_path / "out", verify=False, progress=False)
    assert manifest.verification == {"skipped": True}


def test_non_empty_output_dir_needs_force(tiny_gpt2_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_model(tiny_gpt2_checkpoint, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    export_model(tiny_gpt2_checkpoint, out, force=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert load_manifest(out).architecture == "gpt2"


def test_force_never_overwrites_the_source(tiny_gpt2_checkpoint, tmp_path):
    source = tmp_path / "checkpoint"
    shutil.copytree(tiny_gpt2_checkpoint, source)
    for out in (source, tmp_path):
        with pytest.raises(ExportError, match="overwrite the source"):
            export_model(source, out, force=True, progress=False)
    assert (source / "config.json").exists()


def test_large_weights_go_to_external_data(tiny_gpt2_checkpoint, tiny_gpt2_onnx, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="onnxgen.export"):
        manifest = export_model(tiny_gpt2_checkpoint, out, external_data_threshold=0)
    messages = " ".join(r.getMessage() for r in caplog.records)
    for step in ("loading checkpoint", "exporting with optimum", "verifying", "writing manifest"):
        assert step in messages

    graph = out / manifest.graphs["decoder"].file
    data = out / (manifest.graphs["decoder"].file + ".data")
    assert data.exists() and data.stat().st_size > graph.stat().st_size
    assert data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777  # onnx alone would leave it 0600
    assert manifest.verification["passed"] is True  # verified on the external-data graph
    assert onnx_files.externalize_if_large(graph, 0) is None  # already external: left alone

    feeds = _gpt2_feeds(manifest)
    external = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    inline_graph = tiny_gpt2_onnx / "model.onnx"
    inline = ort.InferenceSession(str(inline_graph), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(external, inline, rtol=0, atol=1e-6)

    moved = tmp_path / "moved"  # the directory is self-contained: it still loads from elsewhere
    shutil.move(out, moved)
    ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])


def _gpt2_feeds(manifest) -> dict:
    empty = np.zeros((1, manifest.num_heads, 0, manifest.head_size), dtype=np.float32)
    feeds = {
        "input_ids": np.array([[5, 6, 7]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.arange(3, dtype=np.int64)[None],
    }
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(manifest.num_layers) for kv in ("key", "value")})
    return feeds


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ExportError, match=r"'bert'.*gpt2, mt5, t5"):
        export_model(tmp_path / "bert", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_gives_one_line_with_the_local_folder_recipe(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError) as info:
        export_model("gpt2-does-not-exist-here", tmp_path / "out", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "Hugging Face Hub is unreachable" in message
    assert "save_pretrained" in message and "onnxgen export DIR OUTPUT_DIR" in message


def test_connection_errors_read_as_an_unreachable_hub():
    import requests

    from onnxgen.export.checkpoint import translate_load_errors

    with pytest.raises(ExportError, match="Hugging Face Hub is unreachable"), translate_load_errors("gpt2"):
        try:
            raise requests.ConnectionError("Failed to resolve 'huggingface.co'")
        except requests.ConnectionError as exc:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\n...") from exc


def test_missing_local_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_model(str(tmp_path / "no" / "such" / "folder"), tmp_path / "out", progress=False)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="onnxgen export")
    add_export_arguments(parser)
    return parser.parse_args(argv)


def test_cli_exports_and_reports_errors_with_status_2(tiny_gpt2_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_export(_parse([str(tiny_gpt2_checkpoint), str(out), "--atol", "0.01"])) == 0
    assert "verified" in capsys.readouterr().out
    assert load_manifest(out).verification["atol"] == 0.01

    assert run_export(_parse([str(tiny_gpt2_checkpoint), str(out)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err

    assert run_export(_parse(["gpt2-does-not-exist-here", str(tmp_path / "other")])) == 2
    assert "Hugging Face Hub is unreachable" in capsys.readouterr().err


def test_cli_module_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['optimum'] = None\n"
        "import argparse, onnxgen.export, onnxgen.export.cli as cli\n"
        "p = argparse.ArgumentParser(); cli.add_export_arguments(p)\n"
        "args = p.parse_args(['gpt2', 'out'])\n"
        "raise SystemExit(cli.run_export(args))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'onnxgen[export]'" in result.stderr


@pytest.mark.filterwarnings("ignore")  # optimum's own export leaves torch's tracer warnings on
@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_optimum_cli_directory_loads_with_a_derived_manifest(architecture, request, tmp_path):
    pytest.importorskip("onnxgen.model.session", reason="graph_io_names is not written yet")
    from optimum.exporters.onnx import main_export

    checkpoint = request.getfixturevalue(f"tiny_{architecture}_checkpoint")
    ours = load_manifest(request.getfixturevalue(f"tiny_{architecture}_onnx"))
    out = tmp_path / "optimum"
    main_export(str(checkpoint), out, task=TASKS[architecture], do_validation=False)
    assert (out / "tokenizer.json").exists()  # optimum saves the tokenizer files next to the graphs

    derived = load_manifest(out)
    assert derived.source == "optimum"
    for field in ("architecture", "num_layers", "num_heads", "head_size", "hidden_size", "vocab_size",
                  "max_positions", "special_tokens", "tokenizer"):
        assert getattr(derived, field) == getattr(ours, field), field
    assert {n: (g.file, set(g.inputs), set(g.outputs)) for n, g in derived.graphs.items()} == {
        n: (g.file, set(g.inputs), set(g.outputs)) for n, g in ours.graphs.items()
    }


def test_eager_eos_gpt2_stops_a_few_tokens_in(eager_eos_gpt2_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(eager_eos_gpt2_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(eager_eos_gpt2_checkpoint)
    eos = tokenizer.eos_token_id
    for prompt in ["Hi", "Hello, my dog is cute"]:
        ids = tokenizer(prompt, return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=eos)[0, ids.input_ids.shape[1] :]
        assert new.tolist()[-1] == eos and eos not in new.tolist()[:-1]
        assert ids.input_ids.shape[1] + len(new) - 1 == tiny_models.EAGER_EOS_GPT2_POSITION + 2  # EOS's index


def test_eager_eos_t5_stops_a_few_tokens_in(eager_eos_t5_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(eager_eos_t5_checkpoint)
    model = AutoModelForSeq2SeqLM.from_pretrained(eager_eos_t5_checkpoint)
    for prompt in ["Hi", "translate English to German: Hello, my dog is cute"]:
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=20, do_sample=False)[0]
        generated = out.tolist()[1:]  # after the decoder start token
        assert len(generated) == tiny_models.EAGER_EOS_T5_MIN_STEPS + 1 and generated[-1] == 1


def test_fused_export_through_export_model_and_the_cli(tiny_gpt2_checkpoint, tiny_t5_checkpoint, tmp_path):
    from onnxgen import TextGeneration
    from onnxgen.export.cli import add_export_arguments, run_export

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "fused"
    assert run_export(parser.parse_args([str(tiny_gpt2_checkpoint), str(out), "--optimize", "fused"])) == 0
    manifest = json.loads((out / "onnxgen.json").read_text())
    assert "static-kv" in manifest["optimizations"] and manifest["verification"]["passed"] is True
    graph = out / manifest["graphs"]["decoder"]["file"]
    data = graph.with_name(graph.name + ".data")  # fused graphs keep their weights outside by default
    assert data.stat().st_size > graph.stat().st_size
    assert data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777
    fused = TextGeneration(out, device="cpu")("The café", do_sample=False, max_new_tokens=8)
    export_model(tiny_gpt2_checkpoint, tmp_path / "plain")
    assert fused == TextGeneration(tmp_path / "plain", device="cpu")("The café", do_sample=False, max_new_tokens=8)
    with pytest.raises(ExportError, match="precision='fp16' is not available for t5's fused graphs; available: fp32, int8"):
        export_model(tiny_t5_checkpoint, tmp_path / "t5", optimize="fused", precision="fp16")
