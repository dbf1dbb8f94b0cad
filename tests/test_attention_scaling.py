"""GPT-2 configs that scale attention scores differently export what the config describes (eager attention).

transformers' default SDPA attention ignores these two flags in the versions the exporter pins, so a model
loaded the default way and one loaded with eager attention disagree; the export must follow the eager one.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxgen import TextGeneration  # noqa: E402
from onnxgen.export import export_model  # noqa: E402

PROMPTS = ["The old lighthouse keeper climbed the stairs", "A"]


@pytest.fixture(scope="module", params=[dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)],
                ids=["inverse-layer-idx", "unscaled"])
def scaled_checkpoint(request, tiny_gpt2_checkpoint, tmp_path_factory):
    config = transformers.GPT2Config.from_pretrained(tiny_gpt2_checkpoint, **request.param)
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("scaled") / "checkpoint"
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_gpt2_checkpoint).save_pretrained(path)
    return path


def _greedy(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("optimize", ["none", "fused"])
def test_the_export_follows_the_config_not_the_sdpa_shortcut(scaled_checkpoint, tmp_path, optimize):
    tokenizer = transformers.AutoTokenizer.from_pretrained(scaled_checkpoint)
    eager = transformers.GPT2LMHeadModel.from_pretrained(scaled_checkpoint, attn_implementation="eager").eval()
    sdpa = transformers.GPT2LMHeadModel.from_pretrained(scaled_checkpoint, attn_implementation="sdpa").eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (eager(ids).logits - sdpa(ids).logits).abs().max().item()
    assert gap > 1e-3  # the two really differ on this config, so agreeing with eager means something

    manifest = export_model(scaled_checkpoint, tmp_path / optimize, optimize=optimize, progress=False)
    assert manifest.verification["passed"]
    tg = TextGeneration(tmp_path / optimize, device="cpu")
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        details = tg(prompt, do_sample=False, max_new_tokens=10, min_new_tokens=10, return_details=True)
        assert details.token_ids == _greedy(eager, tokenizer, prompt)
        # tokens rarely flip on tiny random weights; the log-probabilities show which model the graphs follow
        with torch.no_grad():
            logits = eager(torch.tensor([prompt_ids + details.token_ids])).logits[0, len(prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(details.token_ids)[:, None])[:, 0]
        assert details.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
