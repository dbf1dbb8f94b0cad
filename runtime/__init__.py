"""onnxgen: generate text with GPT-2 and T5 exported to ONNX, on ONNX Runtime, without PyTorch.

    from onnxgen import TextGeneration
    tg = TextGeneration("models/gpt2")
    tg("Geralt knew the signs: the monster was a", temperature=1.2, max_length=50)

Importing onnxgen loads nothing heavy: onnxruntime is imported when a model is opened, and the exporter
(`onnxgen.export`, which needs torch) only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GenerationConfig", "Generation", "Generator", "TextGeneration", "__version__"]

_LAZY = {
    "TextGeneration": ("onnxgen.text_generation", "TextGeneration"),
    "Generation": ("onnxgen.text_generation", "Generation"),
    "Generator": ("onnxgen.generator", "Generator"),
    "GenerationConfig": ("onnxgen.config", "GenerationConfig"),
}

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .generator import Generator
    from .text_generation import Generation, TextGeneration


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'onnxgen' has no attribute {name!r}")
