"""benchmarks/step_overhead.py's stand-in model drives the real generator: the harness keeps working as the
generator changes, and its draws are real (a fixed-logits model, so every step sees the same distribution)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if not (BENCHMARKS / "step_overhead.py").exists():  # CI's runtime-only run copies tests/ without benchmarks/
    pytest.skip("benchmarks/ is not beside this test tree", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
import step_overhead  # noqa: E402

from onnxgen.config import ModelDefaults, resolve  # noqa: E402
from onnxgen.generator import Generator  # noqa: E402
from onnxgen.params import config_from_kwargs  # noqa: E402


def test_the_stand_in_model_generates_greedy_top_k_and_beam_tokens():
    model = step_overhead.FixedLogitsModel(vocab_size=4_000)
    defaults = ModelDefaults(samples_by_default=False)
    outputs = {}
    for mode in step_overhead.MODES:
        generator = Generator(model)
        generator.start([[1, 2, 3]], [resolve(config_from_kwargs(step_overhead._params(mode, 40)), defaults)])
        while not generator.is_done():
            generator.step()
        outputs[mode] = generator.results()[0][0].token_ids
    best = int(np.argmax(model.logits[0, :-1]))  # EOS (the last id) is suppressed by min_new_tokens
    assert outputs["greedy"] == [best] * 40
    assert outputs["beam4"] == [best] * 40  # the same distribution at every step: the best beam is all argmax too
    top50 = set(np.argsort(model.logits[0])[-51:].tolist())
    assert len(outputs["sample"]) == 40 and set(outputs["sample"]) <= top50 and len(set(outputs["sample"])) > 5


def test_generator_alone_reports_every_mode():
    found = step_overhead.generator_alone(vocab_size=1_000, new_tokens=4, rounds=1)
    assert set(found) == {"greedy", "sample", "beam4"} and all(us > 0 for us in found.values())
