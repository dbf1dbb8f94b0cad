"""Shared fixtures: tiny random-weight GPT-2 and T5 checkpoints and their onnxgen exports.

Built once per session from scratch (no Hub access; see ``tiny_models.py``). In an environment without torch,
point ``ONNXGEN_TEST_MODELS`` at a folder built beforehand with ``python tests/tiny_models.py DIR``: the ``*_onnx``
fixtures then come from there and the ``*_checkpoint`` fixtures skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once: tests never reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, whatever pytest's import mode
import tiny_models  # noqa: E402

PREBUILT_ENV = "ONNXGEN_TEST_MODELS"


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] = None, as tests that block torch do
        return False


@pytest.fixture(scope="session")
def prebuilt_models() -> Path | None:
    value = os.environ.get(PREBUILT_ENV)
    if not value:
        return None
    root = Path(value)
    if not (root / tiny_models.ONNX_DIR).is_dir():
        pytest.fail(f"{PREBUILT_ENV}={value!r} has no {tiny_models.ONNX_DIR}/ folder; build it with tests/tiny_models.py")
    return root


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """Where checkpoints and exports are built when they are not prebuilt."""
    return tmp_path_factory.mktemp("tiny-models")


def _checkpoint(name: str, prebuilt: Path | None, root: Path) -> Path:
    if not torch_available():
        pytest.skip("torch is not installed: the tiny checkpoints need the export extra")
    if prebuilt is not None and (prebuilt / tiny_models.CHECKPOINTS_DIR / name / "config.json").exists():
        return prebuilt / tiny_models.CHECKPOINTS_DIR / name
    return tiny_models.build_checkpoint(name, root)


def _onnx(name: str, prebuilt: Path | None, root: Path) -> Path:
    if prebuilt is not None:
        path = prebuilt / tiny_models.ONNX_DIR / name
        if not (path / "onnxgen.json").exists():
            pytest.fail(f"{PREBUILT_ENV}: {path} holds no onnxgen export; rebuild it with tests/tiny_models.py")
        return path
    if not torch_available():
        pytest.skip(f"torch is not installed: set {PREBUILT_ENV} to a folder built by `python tests/tiny_models.py DIR`")
    return tiny_models.export_checkpoint(name, root)


@pytest.fixture(scope="session")
def tiny_gpt2_checkpoint(prebuilt_models, tiny_models_root) -> Path:
    return _checkpoint("tiny_gpt2", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def tiny_t5_checkpoint(prebuilt_models, tiny_models_root) -> Path:
    return _checkpoint("tiny_t5", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def eager_eos_gpt2_checkpoint(prebuilt_models, tiny_models_root) -> Path:
    return _checkpoint("eager_eos_gpt2", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def eager_eos_t5_checkpoint(prebuilt_models, tiny_models_root) -> Path:
    return _checkpoint("eager_eos_t5", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def tiny_gpt2_onnx(prebuilt_models, tiny_models_root) -> Path:
    return _onnx("tiny_gpt2", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def tiny_t5_onnx(prebuilt_models, tiny_models_root) -> Path:
    return _onnx("tiny_t5", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def eager_eos_gpt2_onnx(prebuilt_models, tiny_models_root) -> Path:
    return _onnx("eager_eos_gpt2", prebuilt_models, tiny_models_root)


@pytest.fixture(scope="session")
def eager_eos_t5_onnx(prebuilt_models, tiny_models_root) -> Path:
    return _onnx("eager_eos_t5", prebuilt_models, tiny_models_root)
