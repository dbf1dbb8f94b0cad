"""`onnxgen generate` and `onnxgen info` as a user runs them: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onnxgen import TextGeneration


def onnxgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxgen.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_what_the_api_returns(tiny_gpt2_onnx):
    result = onnxgen("generate", str(tiny_gpt2_onnx), "The café", "Prices rose", "--max-new-tokens", "6",
                     "--do-sample", "false", "--repetition-penalty", "1.3")
    assert result.returncode == 0, result.stderr
    expected = TextGeneration(tiny_gpt2_onnx, device="cpu")(
        ["The café", "Prices rose"], max_new_tokens=6, do_sample=False, repetition_penalty=1.3
    )
    assert result.stdout.splitlines() == expected


def test_generate_streams_and_prints_details(tiny_t5_onnx):
    streamed = onnxgen("generate", str(tiny_t5_onnx), "summarize: a text", "--stream", "--max-new-tokens", "5")
    details = onnxgen("generate", str(tiny_t5_onnx), "summarize: a text", "--json", "--max-new-tokens", "5",
                      "--num-beams", "2", "--num-generations", "2", "--early-stopping", "never")
    assert streamed.returncode == 0 and details.returncode == 0, streamed.stderr + details.stderr
    rows = [json.loads(line) for line in details.stdout.splitlines()]
    assert len(rows) == 2 and {"text", "token_ids", "finish_reason", "score"} <= rows[0].keys()


def test_streaming_prints_what_the_same_call_without_stream_prints(tiny_gpt2_onnx):
    args = ("generate", str(tiny_gpt2_onnx), "The café", "--max-new-tokens", "6", "--do-sample", "false")
    for extra in ((), ("--return-full-text", "false")):
        plain, streamed = onnxgen(*args, *extra), onnxgen(*args, *extra, "--stream")
        assert plain.returncode == streamed.returncode == 0, plain.stderr + streamed.stderr
        assert streamed.stdout == plain.stdout
    assert onnxgen(*args, "--stream").stdout.startswith("The café")  # GPT-2 shows the prompt by default
    both = onnxgen(*args, "--stream", "--json")
    assert both.returncode != 0 and "--stream prints text as it comes and --json" in both.stderr and not both.stdout


def test_info_prints_the_manifest(tiny_t5_onnx):
    result = onnxgen("info", str(tiny_t5_onnx))
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["architecture"] == "t5" and info["format_version"] == 1  # portable graphs keep version 1
    assert info["loadable"] is True and "problem" not in info


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "1.5"], "top_p must be a number in [0, 1], got 1.5"),
        (["--num-beams", "2", "--num-generations", "3"], "num_generations (3) must be <= num_beams (2)"),
        (["--do-sample", "true", "--temperature", "0"], "contradiction"),
    ],
)
def test_bad_parameters_are_one_line_and_exit_2(tiny_gpt2_onnx, args, message):
    result = onnxgen("generate", str(tiny_gpt2_onnx), "The cat", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_a_missing_model_directory_is_one_line(tmp_path):
    result = onnxgen("generate", str(tmp_path / "nope"), "The cat")
    assert result.returncode == 2 and "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("onnxgen.json", "[1, 2]", "expected a JSON object, got list"),
        ("onnxgen.json", "{not json", "not valid JSON"),
        ("config.json", '{"model_type": "gpt2"}', "the field 'n_layer' is missing"),
        ("config.json", '"gpt2"', "expected a JSON object, got str"),
    ],
)
def test_a_malformed_directory_is_one_line_and_exit_2(tmp_path, file, text, message):
    (tmp_path / file).write_text(text, encoding="utf-8")
    (tmp_path / "model.onnx").write_bytes(b"")  # an optimum GPT-2 graph's name, so the config is what fails
    for command in (["info", str(tmp_path)], ["generate", str(tmp_path), "The cat"]):
        result = onnxgen(*command)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"onnxgen {command[0]}: error:")
