"""Export GPT-2 and T5 checkpoints to an onnxgen model directory (ONNX graphs, tokenizer, manifest).

This is the only part of onnxgen that imports torch, transformers and optimum, and it imports them only when an
export runs: ``import onnxgen.export`` and ``onnxgen.export.cli`` stay cheap and work without the ``export``
extra, so the command line can describe ``onnxgen export`` everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxgen.export.errors import ExportError

if TYPE_CHECKING:
    from onnxgen.export.exporter import export_model

__all__ = ["ExportError", "export_model"]


def __getattr__(name: str) -> Any:
    # Deferred so that importing the package does not pull in torch (see the module docstring).
    if name == "export_model":
        from onnxgen.export.exporter import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
