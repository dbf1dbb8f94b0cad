"""Models whose config lists several EOS ids: a sequence ends at any of them, as in transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from onnxgen import TextGeneration
from onnxgen.manifest import MANIFEST_FILE, SpecialTokens, load_manifest

PROMPT = "The old lighthouse keeper"


def _an_id_greedy_reaches(tg: TextGeneration) -> tuple[list[int], int]:
    """Unconstrained greedy ids for PROMPT and an id that first appears a few tokens in."""
    ids = tg.generate_ids([tg.tokenizer.encode(PROMPT)], do_sample=False, max_new_tokens=12, min_new_tokens=12)[0][0]
    position = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    return ids, position


def test_a_second_eos_id_in_the_manifest_ends_the_sequence(tiny_gpt2_onnx, tmp_path):
    full, position = _an_id_greedy_reaches(TextGeneration(tiny_gpt2_onnx, device="cpu"))
    directory = tmp_path / "model"
    shutil.copytree(tiny_gpt2_onnx, directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert "other_eos_token_ids" not in manifest["special_tokens"]  # single-EOS manifests keep their old form
    manifest["special_tokens"]["other_eos_token_ids"] = [full[position]]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))

    tg = TextGeneration(directory, device="cpu")
    assert tg.manifest.special_tokens.eos_token_ids == (manifest["special_tokens"]["eos_token_id"], full[position])
    details = tg(PROMPT, do_sample=False, max_new_tokens=12, return_details=True)
    assert details.token_ids == full[: position + 1] and details.finish_reason == "eos"
    beams = tg.generate_ids([tg.tokenizer.encode(PROMPT)], num_beams=3, max_new_tokens=12)[0][0]
    assert len(beams) <= 12


def test_special_tokens_from_a_list_of_eos_ids():
    tokens = SpecialTokens.with_eos([7, 3, 9], pad_token_id=None)
    assert (tokens.eos_token_id, tokens.eos_token_ids) == (7, (7, 3, 9))
    assert SpecialTokens.with_eos(5, pad_token_id=0).eos_token_ids == (5,)
    assert SpecialTokens.with_eos(None, pad_token_id=0).eos_token_ids == ()


@pytest.mark.parametrize("optimize", ["none", "fused"])
def test_an_export_of_a_config_with_several_eos_ids_matches_transformers(tiny_gpt2_checkpoint, tmp_path, optimize):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnxgen.export import export_model

    full, position = _an_id_greedy_reaches(TextGeneration(_export(tiny_gpt2_checkpoint, tmp_path / "plain", "none")))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_gpt2_checkpoint, checkpoint)
    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    eos = [model.generation_config.eos_token_id, full[position]]
    model.generation_config.eos_token_id = eos
    model.generation_config.max_length = 64  # greedy below passes max_new_tokens, which wins
    model.generation_config.save_pretrained(checkpoint)

    directory = tmp_path / "several"
    export_model(checkpoint, directory, optimize=optimize, progress=False)
    manifest = load_manifest(directory)
    assert manifest.special_tokens.eos_token_ids == tuple(eos)
    # the checkpoint's own generation config, whichever exporter wrote the graphs
    assert manifest.generation_defaults["max_length"] == 64 and manifest.generation_defaults["eos_token_id"] == eos
    tg = TextGeneration(directory, device="cpu")
    prompt_ids = tg.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12)[0, len(prompt_ids):]
    assert expected.tolist() == full[: position + 1]  # transformers stops at the second EOS id too
    assert tg.generate_ids([prompt_ids], do_sample=False, max_new_tokens=12)[0][0] == expected.tolist()


def _export(checkpoint, directory, optimize):
    from onnxgen.export import export_model

    export_model(checkpoint, directory, optimize=optimize, progress=False)
    return directory
