"""`TextGeneration`: Backprop's call signature over an exported model directory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DecodingPlan, ModelDefaults, resolve
from .generator import Generator
from .manifest import Manifest, load_manifest
from .model import load_model
from .params import config_from_kwargs
from .search import SequenceOutput
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

GPT2_SAMPLING_TEMPERATURE = 0.7  # Backprop's default when GPT-2 samples without a temperature


@dataclass(frozen=True)
class Generation:
    """One generated sequence with its details (`return_details=True`)."""

    text: str
    token_ids: list[int]  # generated ids only (EOS included when the sequence ended on it)
    finish_reason: str  # "length", "eos", "stop" or "cancelled"
    logprobs: list[float] | None  # per generated token under the model's distribution; None for beam search
    score: float | None = None  # beam search: the hypothesis score
    prompt_tokens: int = 0


class TextGeneration:
    """Generate text from an exported model directory (`onnxgen export`) on ONNX Runtime.

    >>> tg = TextGeneration("models/gpt2")
    >>> tg("Geralt knew the signs: the monster was a", temperature=1.2, max_length=50)
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", intra_op_threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        if self.manifest.verification.get("passed") is False:
            logger.warning(
                "%s failed its export check against PyTorch (max abs diff %s > atol %s): outputs may be wrong",
                self.model_dir, self.manifest.verification.get("max_abs_diff"), self.manifest.verification.get("atol"),
            )
        self.model = load_model(self.manifest, self.model_dir, device, intra_op_threads)
        self.device = self.model.device
        self._tokenizer: TextTokenizer | None = None  # loaded on first use (`tokenizer`)
        is_gpt2 = self.manifest.architecture == "gpt2"
        self.defaults = ModelDefaults(
            samples_by_default=is_gpt2,
            sampling_temperature=GPT2_SAMPLING_TEMPERATURE if is_gpt2 else 1.0,
            generation_defaults=tuple(sorted(self.manifest.generation_defaults.items())),
            max_positions=self.manifest.max_positions,
        )

    @property
    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer, loaded on first use: ids-only callers (`generate_ids` without stop strings)
        never pay for it (GPT-2's takes 12 MB of memory and ~0.1 s)."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.model_dir, self.manifest.tokenizer)
        return self._tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- the Backprop call ------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str],
        *,
        return_full_text: bool | None = None,
        return_details: bool = False,
        batch_size: int | None = None,
        truncation: bool = False,
        **params: Any,
    ):
        """`str` -> `str`; `list[str]` -> `list[str]`; with `num_generations > 1` a list per input.
        `return_details=True` gives `Generation` objects in the same shape."""
        prompts, single = _prompts(text)
        full_text = self._full_text(return_full_text)
        plan = self.plan(params)
        ids = self.encode(prompts, plan, truncation)
        size = _batch_size(batch_size, len(prompts))
        outputs: list[list[Generation]] = []
        for start in range(0, len(prompts), size):
            chunk = ids[start : start + size]
            outputs.extend(self._run(chunk, plan, full_text))
        shaped = [
            [g if return_details else g.text for g in gens] if plan.num_return_sequences > 1
            else (gens[0] if return_details else gens[0].text)
            for gens in outputs
        ]
        return shaped[0] if single else shaped

    def stream(self, text: str, *, truncation: bool = False, **params: Any) -> Iterator[str]:
        """Yield the continuation's text piece by piece as tokens come (beam search: once, at the end).
        The pieces concatenate to what `tg(text, return_full_text=False, **params)` returns."""
        if not isinstance(text, str):
            raise TypeError(f"stream takes one prompt string, got {type(text).__name__}")
        prompts, _ = _prompts(text)
        plan = self.plan(params)
        if plan.num_return_sequences != 1:
            raise ValueError(f"stream yields one sequence: num_generations must be 1, got {plan.num_return_sequences}")
        ids = self.encode(prompts, plan, truncation)
        generator = Generator(self.model, self.tokenizer.decode)
        generator.start(ids, [plan])
        pieces = self.tokenizer.incremental_decoder(plan.stop)
        tokens: list[int] = []
        while not generator.is_done():
            for event in generator.step():
                if event.token_id is None:
                    continue
                tokens.append(event.token_id)
                if event.finish_reason is None:
                    piece = pieces.piece(tokens)
                    if piece:
                        yield piece
        (output,) = generator.results()[0]
        final = pieces.finish(self._continuation_text(output))
        if final:
            yield final

    def generate_ids(self, prompts: list[list[int]], **params: Any) -> list[list[list[int]]]:
        """Token ids in, generated ids out (per prompt, per sequence): the tokenizer-free path."""
        plan = self.plan(params)
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token id")
            self._check_context(len(ids), plan)
        generator = Generator(self.model, self._decode)  # stop strings decode; nothing else needs the tokenizer
        generator.start([list(map(int, p)) for p in prompts], [plan] * len(prompts))
        while not generator.is_done():
            generator.step()
        return [[out.token_ids for out in outs] for outs in generator.results()]

    # -- pieces ------------------------------------------------------------------------------------------
    def plan(self, params: dict[str, Any]) -> DecodingPlan:
        return resolve(config_from_kwargs(params), self.defaults)

    def encode(self, prompts: list[str], plan: DecodingPlan, truncation: bool = False) -> list[list[int]]:
        ids = self.tokenizer.encode_batch(prompts)
        for i, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise ValueError(f"text[{i}] encodes to no tokens; give a non-empty prompt")
            ids[i] = self._check_context(len(prompt_ids), plan, truncation, prompt_ids)
        return ids

    def _check_context(self, length: int, plan: DecodingPlan, truncation: bool = False, ids=None):
        limit = self.manifest.max_positions
        counted = 1 if self.manifest.is_encoder_decoder else length
        _, max_new = plan.new_token_bounds(counted)  # raises when max_length leaves no room
        if limit is None or length + max_new <= limit:
            return ids
        if plan.max_new_tokens is None and not self.manifest.is_encoder_decoder:
            # max_length counts the prompt: a shorter prompt only buys more new tokens, so cropping cannot help
            raise ValueError(
                f"max_length ({plan.max_length}) exceeds the model's context of {limit} tokens; lower max_length "
                f"to at most {limit}, or use max_new_tokens"
            )
        room = limit - max_new
        if not truncation or room < 1:
            raise ValueError(
                f"prompt of {length} tokens plus {max_new} new tokens exceeds the model's context of {limit} "
                f"tokens; shorten the prompt, lower max_new_tokens/max_length, or pass truncation=True to keep "
                f"the last {max(room, 0)} prompt tokens"
            )
        logger.info("truncating a prompt of %d tokens to its last %d", length, room)
        return ids[-room:]

    def _full_text(self, return_full_text: bool | None) -> bool:
        if return_full_text is None:
            return not self.manifest.is_encoder_decoder
        if not isinstance(return_full_text, bool):
            raise TypeError(f"return_full_text must be True or False, got {return_full_text!r}")
        if return_full_text and self.manifest.is_encoder_decoder:
            raise ValueError("return_full_text=True applies to GPT-2 only: T5 returns its output text")
        return return_full_text

    def _run(self, prompt_ids: list[list[int]], plan: DecodingPlan, full_text: bool) -> list[list[Generation]]:
        generator = Generator(self.model, self.tokenizer.decode)
        generator.start(prompt_ids, [plan] * len(prompt_ids))
        while not generator.is_done():
            generator.step()
        results = []
        for ids, outputs in zip(prompt_ids, generator.results()):
            results.append([self._generation(ids, out, full_text, plan) for out in outputs])
        return results

    def _continuation_text(self, output: SequenceOutput) -> str:
        return output.text if output.text is not None else self.tokenizer.decode(output.token_ids)

    def _generation(self, prompt_ids: list[int], output: SequenceOutput, full_text: bool, plan) -> Generation:
        if not full_text:
            text = self._continuation_text(output)
        elif output.text is None:
            text = self.tokenizer.decode(prompt_ids + output.token_ids)
        else:
            text = self.tokenizer.decode(prompt_ids) + output.text
        return Generation(
            text=text,
            token_ids=output.token_ids,
            finish_reason=output.finish_reason,
            logprobs=None if plan.is_beam_search else output.logprobs,
            score=output.score,
            prompt_tokens=len(prompt_ids),
        )

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "directory": str(self.model_dir),
            "architecture": m.architecture,
            "device": self.device,
            "layers": m.num_layers,
            "heads": m.num_heads,
            "hidden_size": m.hidden_size,
            "vocab_size": m.vocab_size,
            "max_positions": m.max_positions,
            "dtype": m.dtype,
            "graphs": {name: g.file for name, g in m.graphs.items()},
            "source": m.source,
            "producer": m.producer,
            "verification": m.verification,
        }


def _prompts(text: Any) -> tuple[list[str], bool]:
    if isinstance(text, str):
        prompts, single = [text], True
    elif isinstance(text, (list, tuple)):
        prompts, single = list(text), False
        if not prompts:
            raise ValueError("text must be a string or a non-empty list of strings, got an empty list")
    else:
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"text[{i}] must be a string, got {type(prompt).__name__} ({prompt!r})")
        if not prompt:
            raise ValueError(f"text[{i}] is an empty string; give a non-empty prompt")
    return prompts, single


def _batch_size(batch_size: Any, count: int) -> int:
    if batch_size is None:
        return count
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size
