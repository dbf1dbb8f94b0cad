"""ONNX Runtime sessions: importing the right flavour, choosing the provider, session settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "onnxgen needs ONNX Runtime, which is not installed: `pip install onnxgen[cpu]` for CPU or "
            "`pip install onnxgen[cuda]` for NVIDIA GPUs (install only one of the two)"
        ) from None
    return onnxruntime


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when its provider is available; asking for 'cuda' without it is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            f"device='cuda' was asked for, but ONNX Runtime's CUDA provider is not available (providers: "
            f"{', '.join(available)}); install `onnxgen[cuda]` (onnxruntime-gpu) instead of `onnxgen[cpu]`, "
            "or pass device='cpu'"
        )
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def session_options(intra_op_threads: int | None = None) -> Any:
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Decoding runs one small graph after another; a spinning thread pool wastes the other cores between steps
    # only when threads outnumber cores, so the default (one per physical core) is kept unless asked.
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    return options


def create_session(path: str | Path, device: str, intra_op_threads: int | None = None) -> Any:
    ort = import_onnxruntime()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": int(os.environ.get("ONNXGEN_CUDA_DEVICE", 0))})] + providers
    logger.debug("loading %s on %s", path, device)
    return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads), providers=providers)

