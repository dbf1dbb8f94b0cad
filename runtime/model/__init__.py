"""The model layer: ONNX Runtime sessions and key/value caches. It knows nothing about search."""

from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest
from .base import LanguageModel, ModelState, Prefill
from .session import resolve_device


def load_model(manifest: Manifest, directory: str | Path, device: str = "auto", intra_op_threads: int | None = None):
    """Open the graphs a manifest names on `device` ("auto", "cpu" or "cuda")."""
    if manifest.has_static_kv:
        # The static layout runs on CPU only, so "auto" picks the CPU even where CUDA is available.
        device = "cpu" if device == "auto" else resolve_device(device)
        if manifest.is_encoder_decoder:
            from .static_encoder_decoder import StaticEncoderDecoderModel

            return StaticEncoderDecoderModel(manifest, Path(directory), device, intra_op_threads)
        from .static_decoder import StaticDecoderModel

        return StaticDecoderModel(manifest, Path(directory), device, intra_op_threads)
    device = resolve_device(device)
    directory = Path(directory)
    if manifest.is_encoder_decoder:
        from .encoder_decoder import EncoderDecoderModel

        return EncoderDecoderModel(manifest, directory, device, intra_op_threads)
    from .decoder_only import DecoderOnlyModel

    return DecoderOnlyModel(manifest, directory, device, intra_op_threads)


__all__ = ["LanguageModel", "ModelState", "Prefill", "load_model"]
