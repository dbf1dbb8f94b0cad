"""Where a decoding step's time goes outside the model: onnxgen's per-step Python work, two ways.

    python benchmarks/step_overhead.py                       # the generator alone, over a fixed-logits model
    python benchmarks/step_overhead.py --model-dir DIR       # a real model: time inside and outside onnxruntime

The first runs `Generator` over a stand-in model whose step returns the same logits at once (warm caches: the floor
of the Python work). The second runs `TextGeneration.generate_ids` on an exported directory and splits each token's
time into onnxruntime's session runs and everything else (prefill included, spread over the tokens),
greedy, top-k sampling and beam 4 alternated, median of the runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import numpy as np

from onnxgen.config import ModelDefaults, resolve
from onnxgen.generator import Generator
from onnxgen.model.base import Prefill
from onnxgen.params import config_from_kwargs
from onnxgen.processors import log_softmax

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=50, top_p=1.0, temperature=1.0),  # as bench.py samples
    "beam4": dict(do_sample=False, num_beams=4),
}


def _params(mode: str, new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0, **MODES[mode])


class _FixedState:
    def __init__(self, logits: np.ndarray, logprobs: np.ndarray, rows: int):
        self.logits, self.fixed_logprobs, self.rows = logits, logprobs, rows
        self.logprobs = None

    @property
    def num_rows(self) -> int:
        return self.rows

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        # Copies, as the real states return copies of their bound outputs.
        self.logprobs = np.repeat(self.fixed_logprobs, self.rows, axis=0)
        return np.repeat(self.logits, self.rows, axis=0)

    def select(self, rows: np.ndarray) -> None:
        self.rows = len(rows)


class FixedLogitsModel:
    """A LanguageModel whose every step returns the same random logits (and their log_softmax) at no cost."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = (vocab_size - 1,)
        self.logits = (np.random.default_rng(seed).standard_normal((1, vocab_size)) * 2).astype(np.float32)
        self.logprobs = log_softmax(self.logits)

    def prefill(self, prompts, max_new_tokens=None) -> Prefill:
        rows = len(prompts)
        return Prefill(
            _FixedState(self.logits, self.logprobs, rows), np.repeat(self.logits, rows, axis=0), np.array(prompts),
            np.array([len(p) for p in prompts]), np.repeat(self.logprobs, rows, axis=0),
        )


def generator_alone(vocab_size: int, new_tokens: int, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` µs per step of the generator over FixedLogitsModel, per mode."""
    defaults = ModelDefaults(samples_by_default=False, sampling_temperature=1.0, generation_defaults=(),
                             max_positions=None)
    model = FixedLogitsModel(vocab_size)
    found = {}
    for mode in MODES:
        plan = resolve(config_from_kwargs(_params(mode, new_tokens)), defaults)
        times = []
        for _ in range(rounds + 1):  # the first round warms up
            generator = Generator(model)
            generator.start([list(range(32))], [plan])
            start = time.perf_counter()
            while not generator.is_done():
                generator.step()
            times.append((time.perf_counter() - start) / new_tokens * 1e6)
        found[mode] = min(times[1:])
    return found


def inside_and_outside(model_dir: str, new_tokens: int, rounds: int, threads: int | None) -> dict[str, tuple]:
    """Median ms per token (total, inside onnxruntime, outside it) of generate_ids on a real model, per mode."""
    import onnxruntime

    from onnxgen import TextGeneration

    tg = TextGeneration(model_dir, device="cpu", intra_op_threads=threads)
    inside = [0.0]

    def timed(method):
        def run(session, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(session, *args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start
        return run

    session_class = onnxruntime.InferenceSession
    prompt = [list(range(100, 132))]
    samples: dict[str, list] = {mode: [] for mode in MODES}
    # Both ways a session runs: fused graphs bind their inputs, optimum's portable graphs use run().
    with mock.patch.object(session_class, "run_with_iobinding", timed(session_class.run_with_iobinding)), \
            mock.patch.object(session_class, "run", timed(session_class.run)):
        for round_ in range(rounds + 1):
            for mode in MODES:  # alternated, so drift hits both alike
                inside[0] = 0.0
                start = time.perf_counter()
                tg.generate_ids(prompt, **_params(mode, new_tokens))
                total = time.perf_counter() - start
                if round_:
                    samples[mode].append((total, inside[0], total - inside[0]))
    return {mode: tuple(np.median(np.array(rows), axis=0) * 1e3 / new_tokens) for mode, rows in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="an exported model directory (default: the fixed-logits stand-in)")
    parser.add_argument("--vocab-size", type=int, default=50257, help="the stand-in's vocabulary (default GPT-2's)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="timed runs (default: 20 alone, 7 on a model)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.model_dir is None:
        for mode, micros in generator_alone(args.vocab_size, args.new_tokens, args.rounds or 20).items():
            print(f"{mode}: {micros:.1f} µs per step (generator alone, vocabulary {args.vocab_size})")
    else:
        for mode, (total, inside, outside) in inside_and_outside(args.model_dir, args.new_tokens, args.rounds or 7,
                                                                  args.threads).items():
            print(f"{mode}: {total:.2f} ms per token = {inside:.2f} in onnxruntime + {outside:.3f} outside")
    return 0


if __name__ == "__main__":
    sys.exit(main())
