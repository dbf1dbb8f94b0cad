"""Tiny random-weight GPT-2 and T5 checkpoints with real trained tokenizers, built offline at test time.

The checkpoints are folders a user could have written with ``save_pretrained()``: ``config.json``, the weights,
``generation_config.json`` and the tokenizer files. The tokenizers are trained on :data:`CORPUS`, which mixes
accents, the euro sign, emoji and CJK so that byte-level merges and multi-byte decoding get exercised.

The "eager EOS" variants end their answers early, on purpose, so min_length tests have something to suppress:

* GPT-2: the EOS logit follows the absolute position. The logits at positions up to
  :data:`EAGER_EOS_GPT2_POSITION` (8) never pick EOS and those from position 9 on always do, so greedy search
  ends a prompt shorter than 10 tokens with EOS at index 10 of the full sequence.
* T5: the EOS logit follows the number of decoder tokens; greedy search generates exactly
  :data:`EAGER_EOS_T5_MIN_STEPS` (3) tokens and then EOS, whatever the prompt.

CI builds these once in an environment with torch and writes the ONNX exports to a folder
(``python tests/tiny_models.py OUT``); a torch-free environment then runs the runtime tests against that folder by
setting ``ONNXGEN_TEST_MODELS=OUT`` (see ``tests/conftest.py``). torch and transformers are imported inside the
builders so that importing this module costs nothing in that environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

# The prebuilt layout: ROOT/checkpoints/NAME and ROOT/onnx/NAME.
CHECKPOINTS_DIR = "checkpoints"
ONNX_DIR = "onnx"
MODEL_NAMES = ("tiny_gpt2", "tiny_t5", "eager_eos_gpt2", "eager_eos_t5")

GPT2_EOS = "<|endoftext|>"
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
VOCAB_SIZE = 1000

EAGER_EOS_GPT2_POSITION = 8
EAGER_EOS_T5_MIN_STEPS = 3

_SENTENCES = [
    "Hello, my dog is cute.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little house in the big forest.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "It was the best of times, it was the worst of times.",
    "The weather today is sunny with a chance of rain in the evening.",
    "Please translate this sentence into German and French.",
    "translate English to German: The house is wonderful.",
    "summarize: The committee met on Tuesday and agreed on a new budget for the school.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text too.",
    "A café in Zürich serves crème brûlée and a naïve piñata for the fiancée.",
    "Das Mädchen spielt im Garten, während die Großmutter Kuchen backt.",
    "El niño comió una manzana y bebió jugo de naranja por la mañana.",
    "The ticket costs 25 € or about £21, which is cheaper than last year.",
    "Prices rose by 5 € per month, so the total is 60 € a year.",
    "I love pizza 🍕 and coffee ☕ on rainy days 🌧️.",
    "Great job! 🎉🎉 See you soon 👋 and take care ❤️.",
    "東京は日本の首都です。",
    "我喜欢学习中文和写汉字。",
    "한국어도 조금 할 수 있어요.",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Emoji and text mixed: 😀 happy, 😢 sad, 🤖 robot.",
    "Tabs\tand  double  spaces   should survive the round trip.",
    "The model generates text one token at a time until it sees the end of text.",
    "Beam search keeps several candidates and picks the most probable sequence.",
    "Sampling with temperature, top-k and top-p makes the output more varied.",
]
# Repeated so that frequent pairs clear the trainers' thresholds; the order is fixed so training is repeatable.
CORPUS = _SENTENCES * 4


def train_gpt2_tokenizer():
    """A byte-level BPE tokenizer in the style of GPT-2's, wrapped as ``GPT2TokenizerFast``."""
    from tokenizers.implementations import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False)
    bpe.add_special_tokens([GPT2_EOS])  # after training, so it gets the last id as in GPT-2 (50256)
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS
    )


def train_t5_tokenizer():
    """A SentencePiece-style Unigram tokenizer that appends ``</s>`` like T5's, wrapped as ``T5TokenizerFast``."""
    from tokenizers.implementations import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        CORPUS, vocab_size=VOCAB_SIZE, show_progress=False, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>"
    )
    backend = unigram._tokenizer
    backend.model = _canonical_unigram(backend)
    eos_id = backend.token_to_id("</s>")
    backend.post_processor = TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _canonical_unigram(backend):
    """The trained Unigram model with its ids in a fixed order.

    The trainer is not deterministic in two ways: pieces of equal score come out in a run-dependent order (their
    scores differing in the last bits), and the rare characters it appends at the end take a ladder of scores
    (0.0001 apart) in a run-dependent order. Left so, the same corpus gave different ids from run to run, hence a
    different tiny T5 (its embeddings are drawn in id order) and precision tests that passed or failed by chance.
    Here pieces whose scores lie within 0.001 of the next form one group; a group keeps its scores, handed out
    in piece order. Special tokens keep their ids.
    """
    import json

    from tokenizers.models import Unigram

    model = json.loads(backend.to_str())["model"]
    special = [tuple(item) for item in model["vocab"][: len(T5_SPECIAL_TOKENS)]]
    assert [piece for piece, _ in special] == list(T5_SPECIAL_TOKENS), special
    rest = sorted(((piece, round(score, 9)) for piece, score in model["vocab"][len(special):]), key=lambda i: -i[1])
    groups, previous = [], None
    for piece, score in rest:
        if previous is None or previous - score >= 1e-3:
            groups.append([])
        groups[-1].append((piece, score))
        previous = score
    vocab = list(special)
    for group in groups:
        vocab += zip(sorted(piece for piece, _ in group), [score for _, score in group])
    return Unigram(vocab, unk_id=model["unk_id"], byte_fallback=model.get("byte_fallback", False))


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_on_one_batch(model, tokenizer, path: Path, *, steps: int, lr: float, max_loss: float, **batch) -> Path:
    """Fit `model` to one fixed batch (`model(**batch).loss`, AdamW) until it is confident about it, like a real
    model (a random one predicts almost uniformly), and save it with `tokenizer` at `path`."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < max_loss, f"the tiny model did not learn its batch (loss {loss.item():.3f})"
    return _save(model, tokenizer, path)


def export_precisions(checkpoint: Path, root: Path, precisions: tuple[str, ...]) -> dict[str, Path]:
    """precision -> fused export of `checkpoint` under `root`, each with the default min_agreement."""
    from onnxgen.export import export_model

    for precision in precisions:
        export_model(checkpoint, root / precision, optimize="fused", precision=precision, progress=False)
    return {precision: root / precision for precision in precisions}


def build_gpt2(path: Path, *, eager_eos: bool = False) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(GPT2_EOS)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=len(tokenizer),
        bos_token_id=eos, eos_token_id=eos,
        # Untied like fine-tuned heads can be, so the EOS row can be edited without touching the EOS embedding.
        tie_word_embeddings=not eager_eos,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    if eager_eos:
        _make_gpt2_eager_eos(model, eos)
    else:
        _weaken_embeddings(model)
    return _save(model, tokenizer, path)


def _weaken_embeddings(model) -> None:
    """Shrink the (tied) token embeddings so the layers, not the input token, dominate the last hidden state.

    With random weights and tied embeddings every token otherwise predicts itself, so greedy search repeats the
    prompt's last token forever (T5 repeats ``<pad>``); this gives more varied output to test against.
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.3)


def _make_gpt2_eager_eos(model, eos: int) -> None:
    """Reserve hidden coordinate 0 for a position ramp that only the EOS row of the LM head reads.

    Nothing but the position embedding writes coordinate 0, so after the final LayerNorm its sign is the sign of
    ``position - EAGER_EOS_GPT2_POSITION - 0.5``, and the EOS logit is that value times a large weight.
    """
    import torch

    with torch.no_grad():
        t = model.transformer
        t.wte.weight[:, 0] = 0.0
        positions = torch.arange(t.wpe.weight.shape[0], dtype=torch.float32)
        # Zero between positions, never at one, so the sign at every position is clear-cut.
        t.wpe.weight[:, 0] = 0.05 * (positions - EAGER_EOS_GPT2_POSITION - 0.5)
        for block in t.h:  # Conv1D weights are (in, out): column 0 is what a block adds to coordinate 0.
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight[:, 0] = 0.0
                proj.bias[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos] = 0.0
        model.lm_head.weight[eos, 0] = 3.0


def build_t5(path: Path, *, eager_eos: bool = False) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = train_t5_tokenizer()
    config = T5Config(
        num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=128, vocab_size=len(tokenizer),
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        # Tied like t5-small; the eager variant is untied like flan-t5 (and so is rescaled differently).
        tie_word_embeddings=not eager_eos,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    if eager_eos:
        _make_t5_eager_eos(model, eos=1, start=0)
    else:
        _weaken_embeddings(model)
    return _save(model, tokenizer, path)


def _make_t5_eager_eos(model, *, eos: int, start: int) -> None:
    """Make the EOS logit grow with the number of decoder tokens, which T5 (relative positions) cannot see directly.

    Head 0 of the first decoder self-attention is made uniform (no query, no position bias) and reads hidden
    coordinate 1, which only the decoder start token sets, so its output is ``marker / n`` for ``n`` decoder
    tokens. That is written negatively into coordinate 0 on top of a constant offset that every embedding carries,
    so coordinate 0, and the EOS logit that reads it, is negative while ``n <= EAGER_EOS_T5_MIN_STEPS`` and
    positive afterwards. No other decoder layer writes coordinates 0 or 1.
    """
    import torch

    d_kv = model.config.d_kv
    offset = 3.0
    with torch.no_grad():
        shared = model.shared.weight
        shared[:, 0] = offset
        shared[:, 1] = 0.0
        shared[start, 1] = offset
        first = model.decoder.block[0].layer[0]
        marker = float(first.layer_norm(shared[start])[1])  # what head 0 will read from the start token
        attention = first.SelfAttention
        attention.q.weight[:d_kv] = 0.0
        attention.relative_attention_bias.weight[:, 0] = 0.0
        attention.v.weight[:d_kv] = 0.0
        attention.v.weight[:d_kv, 1] = 1.0
        for block in model.decoder.block:
            for layer in block.layer:
                for name in ("SelfAttention", "EncDecAttention", "DenseReluDense"):
                    if hasattr(layer, name):
                        output = getattr(layer, name)
                        (output.o if name != "DenseReluDense" else output.wo).weight[:2] = 0.0
        # Coordinate 0 = offset - (offset * (MIN_STEPS + 0.5)) / n: its sign flips between MIN_STEPS and +1.
        attention.o.weight[0, :d_kv] = -offset * (EAGER_EOS_T5_MIN_STEPS + 0.5) / (marker * d_kv)
        # Small logits elsewhere so that a positive coordinate 0 makes EOS the clear winner.
        model.lm_head.weight.mul_(0.05)
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos] = 0.0
        model.lm_head.weight[eos, 0] = 30.0


BUILDERS = {
    "tiny_gpt2": lambda path: build_gpt2(path),
    "tiny_t5": lambda path: build_t5(path),
    "eager_eos_gpt2": lambda path: build_gpt2(path, eager_eos=True),
    "eager_eos_t5": lambda path: build_t5(path, eager_eos=True),
}


def build_checkpoint(name: str, root: Path) -> Path:
    path = Path(root) / CHECKPOINTS_DIR / name
    if not (path / "config.json").exists():
        BUILDERS[name](path)
    return path


def export_checkpoint(name: str, root: Path) -> Path:
    from onnxgen.export import export_model

    path = Path(root) / ONNX_DIR / name
    if not (path / "onnxgen.json").exists():
        export_model(build_checkpoint(name, root), path, force=True, progress=False)
    return path


def build_all(root: Path) -> dict[str, Path]:
    """Build every checkpoint and its onnxgen export under ``root``.

    Returns ``{"tiny_gpt2_checkpoint": ..., "tiny_gpt2_onnx": ..., ...}`` for every name in :data:`MODEL_NAMES`.
    """
    paths = {}
    for name in MODEL_NAMES:
        paths[f"{name}_checkpoint"] = build_checkpoint(name, root)
        paths[f"{name}_onnx"] = export_checkpoint(name, root)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test checkpoints and their ONNX exports.")
    parser.add_argument("root", type=Path, help="folder to write checkpoints/ and onnx/ into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    for key, path in build_all(args.root).items():
        print(f"{key}: {path}")
    print(f"built in {time.perf_counter() - start:.1f} s; run the runtime tests with ONNXGEN_TEST_MODELS={args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
