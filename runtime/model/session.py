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
    # Defaults kept on purpose (measured on GPT-2 small, fp32, 2 threads): weight prepacking adds ~200 MB here
    # (150 MB of it because the LM head's table is also the embedding Gather's, so it is held packed and plain),
    # but turning it off makes a token about a third slower. The CPU arena stays too: without
    # it the packed weights are malloc'ed one by one and fragment the heap (+40 to 100 MB at load); its growth
    # with long prompts is undone per run instead (`prefill_run_options`).
    # Decoding runs one small graph after another; a spinning thread pool wastes the other cores between steps
    # only when threads outnumber cores, so the default (one per physical core) is kept unless asked.
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    return options


def prefill_run_options() -> Any:
    """Run options for a run whose size follows the prompt (a prefill, an encoder pass).

    ONNX Runtime's CPU arena keeps every region it ever grew to, so one long prompt would leave the process that
    much bigger for good (GPT-2 small: +60 MB after a 1000-token prompt). With these options the arena hands back
    the regions this run no longer uses when it ends. Decoding steps have a steady size and run without them,
    so they reuse the arena at no cost.
    """
    options = import_onnxruntime().RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


# A prefill of at least this many tokens (rows x width) hands the memory it freed back to the system.
TRIM_AFTER_TOKENS = 256
_malloc_trim = None


def release_freed_heap() -> None:
    """Give the heap memory freed so far back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps what a large run frees in its heap for reuse, and runs of different sizes fragment it: measured on
    GPT-2 small, rounds of batch-8 prompts grew the process by 10-20 MB each (577 -> 635 MB over 5 rounds) with no
    live allocation behind it (tracemalloc: 1 MB). Trimming after each such prefill kept it at ~566 MB, at 1-2.5 ms
    per call, which is why only large prefills (TRIM_AFTER_TOKENS) pay it.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", False)
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def device_id(device: str) -> int:
    """Which GPU "cuda" means: ONNXGEN_CUDA_DEVICE (default 0). Sessions, cached keys/values and bound outputs
    all use it, so nothing crosses between GPUs."""
    if device != "cuda":
        return 0
    value = os.environ.get("ONNXGEN_CUDA_DEVICE", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ONNXGEN_CUDA_DEVICE must be a GPU index (0, 1, ...), got {value!r}") from None


def create_session(path: str | Path, device: str, intra_op_threads: int | None = None) -> Any:
    ort = import_onnxruntime()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device_id(device)})] + providers
    logger.debug("loading %s on %s", path, device)
    return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads), providers=providers)

