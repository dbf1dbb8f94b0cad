"""Graph builders: ONNX graphs of onnxruntime's fused operators written straight from a checkpoint's weights.

optimum's export stays the portable path and the reference these graphs are tested against; a builder emits the
layout the runtime's fast path binds (see ``onnxgen.manifest.STATIC_KV``). Builders need onnx and numpy, and read
the weights of an already loaded transformers model; they import neither torch nor transformers themselves.
"""

from __future__ import annotations

from onnxgen.export.builders.gpt2 import GRAPH_FILE as GPT2_GRAPH_FILE
from onnxgen.export.builders.gpt2 import OPTIMIZATIONS as GPT2_OPTIMIZATIONS
from onnxgen.export.builders.gpt2 import build_gpt2_graph, write_gpt2

__all__ = ["GPT2_GRAPH_FILE", "GPT2_OPTIMIZATIONS", "build_gpt2_graph", "write_gpt2"]
