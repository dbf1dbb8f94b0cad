"""GPT-2 as one ONNX graph of onnxruntime's fused operators, built straight from the checkpoint's weights.

Per layer (hidden size D, N heads of size H, shapes for a batch of B rows of S tokens)::

    qkv     = MatMul(ln_1(x), c_attn.W) + c_attn.b               (B, S, 3D)   Q, K, V heads packed as GPT-2 has them
    a, K, V = GroupQueryAttention(qkv, past K, past V, ...)      (B, S, D)    kv_num_heads = num_heads
    ln_2(x), x = SkipLayerNormalization(a @ c_proj.W, x, c_proj.b)            the residual sum is its 4th output
    m       = FastGelu(MatMul(ln_2(x), c_fc.W), c_fc.b) @ mlp.c_proj.W          gelu_new is the tanh approximation
    ln_1'(x), x = SkipLayerNormalization(m, x, mlp.c_proj.b)                    fused with the next layer's ln_1

The key/value inputs are buffers of a fixed length (B, N, max_length, H) that the runtime binds as both
``past_key_values.{i}.*`` and ``present.{i}.*``: GroupQueryAttention then writes each new position in place at
``seqlens_k`` and attends to positions ``0 .. seqlens_k`` of each row. Rows are right-padded: row b holds its
tokens at positions 0 .. seqlens_k[b]. The last valid position of each row is gathered before the final
projection, so the LM head runs on (B, D) only, prompt included.

The token lookup is the runtime's (``manifest.TOKEN_LOOKUP``): the graph takes the rows of the token embedding,
which is written as its own .npy file. A tied LM head reads that file's rows as external data, transposed by Gemm,
in chunks (``graph.HEAD_CHUNK_BYTES``) so that onnxruntime's prepacking never holds the whole table twice.

Inputs: inputs_embeds (B, S, D) of the graph's float type = wte[input_ids]; position_ids (B, S) int64;
seqlens_k (B,) int32 = tokens in the row after this
call - 1; total_sequence_length () int32 = S for a prompt (every row starts empty), max(seqlens_k) + 1 for a step
of one token; past_key_values.{i}.key/value (B, N, max_length, H) of the graph's float type.
Outputs: logits (B, V) float32; logprobs (B, V) float32 = log_softmax(logits) (``graph.GraphBuilder.log_softmax``);
present.{i}.key/value, the same buffers.

Precisions (:data:`PRECISIONS`):

- ``fp32``: the checkpoint's weights as they are.
- ``fp16``: every weight, activation and key/value buffer in float16; the logits are cast back to float32.
- ``int8``: every MatMul, the LM head included, is a DynamicQuantizeMatMul: activations are quantized to uint8
  per call, weights are stored as uint8 with a scale and zero point per output column. Unsigned weights because
  AVX2 CPUs without VNNI multiply u8 x s8 with an instruction that saturates its int16 pair sums (onnxruntime's
  quantization notes say so); per-column scales because one outlier column would otherwise coarsen every other.
  Measured on GPT-2 small random weights, 2-core AVX2 CPU: symmetric int8 per column ran ~15% faster per token
  but, filling each column's full range, saturated often enough to push the logit error from 0.08 to 0.27 and
  top-1 agreement on the export sample from 95% to 78%.
  The LM head needs the embedding transposed (V, D) -> (D, V) as its own quantized copy (a quarter of the fp32
  size); the token table stays float32. Everything else (norms, attention, key/values) stays float32.

onnxruntime's CPU GroupQueryAttention needs H to be a multiple of 8 (GPT-2 sizes have 64) and one token per row
after the prompt; a prompt must start from empty rows (sequence length == total_sequence_length).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from onnxgen.export.builders.graph import MS_DOMAIN, GraphBuilder, TokenTable, save_model, save_token_table
from onnxgen.export.errors import ExportError
from onnxgen.manifest import FUSED_GQA, LAST_LOGITS, STATIC_KV, TOKEN_LOOKUP, GraphSpec

log = logging.getLogger(__name__)

GRAPH_FILE = "decoder_fused.onnx"
OPTIMIZATIONS = (FUSED_GQA, LAST_LOGITS, STATIC_KV, TOKEN_LOOKUP)
PRECISIONS = ("fp32", "fp16", "int8")
# What the manifest's `dtype` records for each precision: the type the weights are stored in.
WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
# Hugging Face activation names -> how the graph computes them. FastGelu is the tanh approximation
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); BiasGelu is the exact erf form.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ERF_GELUS = ("gelu", "gelu_python")
SILUS = ("silu", "swish")  # x * sigmoid(x), under both of its Hugging Face names
ACTIVATIONS = TANH_GELUS + ERF_GELUS + SILUS + ("relu",)


@dataclass(frozen=True)
class Gpt2Dims:
    """The hyperparameters the graph needs, read from a GPT2Config."""

    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    epsilon: float
    activation: str
    attention_scales: tuple[float, ...]  # per layer: what q.k is multiplied by before the softmax

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: Any) -> Gpt2Dims:
        heads, hidden = int(config.n_head), int(config.n_embd)
        if hidden % heads:
            raise ExportError(f"n_embd ({hidden}) is not a multiple of n_head ({heads})")
        head_size = hidden // heads
        if head_size % 8:
            raise ExportError(
                f"head size {head_size} (n_embd / n_head) is not a multiple of 8, which onnxruntime's "
                "GroupQueryAttention needs on CPU; export without the fused graph"
            )
        activation = getattr(config, "activation_function", "gelu_new")
        if activation not in ACTIVATIONS:
            raise ExportError(
                f"activation_function {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if getattr(config, "add_cross_attention", False):
            raise ExportError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        layers = int(config.n_layer)
        scale = 1.0 / math.sqrt(head_size) if getattr(config, "scale_attn_weights", True) else 1.0
        by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
        scales = tuple(scale / (i + 1) if by_layer else scale for i in range(layers))
        return cls(
            num_layers=layers, num_heads=heads, hidden_size=hidden, vocab_size=int(config.vocab_size),
            max_positions=int(config.n_positions), epsilon=float(config.layer_norm_epsilon), activation=activation,
            attention_scales=scales,
        )


class Gpt2Weights:
    """GPT2LMHeadModel's state_dict as float32 NumPy arrays ("transformer." prefix optional).

    Conv1D weights are (in, out), which is what MatMul wants. `lm_head` is None when it is tied to the token
    embedding (missing from the checkpoint, the same storage, or equal values).
    """

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self._arrays = {_strip(name): value for name, value in state_dict.items()}
        self.wte = self["wte.weight"]
        head = self._arrays.get("lm_head.weight")
        head = None if head is None else _to_numpy(head)
        tied = head is None or np.shares_memory(head, self.wte) or np.array_equal(head, self.wte)
        self.lm_head = None if tied else head

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise ExportError(f"the checkpoint has no weight {name!r} (is it a GPT2LMHeadModel?)")
        return _to_numpy(self._arrays[name])


def _strip(name: str) -> str:
    return name.removeprefix("transformer.")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; imported lazily by whoever made it
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class _Writer:
    """The graph under construction and how it stores weights at the chosen precision."""

    def __init__(self, g: GraphBuilder, weights: Gpt2Weights, precision: str) -> None:
        self.g, self.weights, self.precision = g, weights, precision
        self.float_dtype = np.float16 if precision == "fp16" else np.float32
        self.float_type = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT

    def weight(self, name: str, array: np.ndarray | None = None) -> str:
        """The initializer `name` (from the checkpoint unless `array` is given) in the graph's float type."""
        array = self.weights[name] if array is None else array
        return self.g.initializer(name, array.astype(self.float_dtype))

    def linear(
        self, x: str, name: str, bias: str | None = None, *, array: np.ndarray | None = None, output: str | None = None
    ) -> str:
        """x @ W (+ b) for the (in, out) weight `name`: a MatMul, or a DynamicQuantizeMatMul for int8."""
        g = self.g
        matrix = self.weights[name] if array is None else array
        outputs = [output] if output else 1
        if self.precision != "int8":
            if bias is None:
                return g.node("MatMul", [x, self.weight(name, matrix)], outputs)
            return g.node("Add", [g.node("MatMul", [x, self.weight(name, matrix)]), self.weight(bias)], outputs)
        quantized, scale, zero_point = quantize_columns(matrix)
        inputs = [
            x, g.initializer(name + ".quantized", quantized), g.initializer(name + ".scale", scale),
            g.initializer(name + ".zero_point", zero_point),
        ]
        if bias is not None:
            inputs.append(self.weight(bias))
        return g.node("DynamicQuantizeMatMul", inputs, outputs, domain=MS_DOMAIN)


def quantize_columns(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 quantization of a (K, N) matrix with one scale and zero point per column.

    Each column's range is widened to include 0 so that 0 is represented exactly (as onnxruntime's quantizer
    does); matrix ~= (quantized - zero_point) * scale.
    """
    low = np.minimum(matrix.min(axis=0), 0.0).astype(np.float64)
    high = np.maximum(matrix.max(axis=0), 0.0).astype(np.float64)
    scale = (high - low) / 255.0
    scale[scale == 0] = 1.0  # an all-zero column: any scale represents it
    zero_point = np.clip(np.round(-low / scale), 0, 255)
    quantized = np.clip(np.round(matrix / scale) + zero_point, 0, 255)
    return quantized.astype(np.uint8), scale.astype(np.float32), zero_point.astype(np.uint8)


def token_table(state_dict: Mapping[str, Any], precision: str = "fp32") -> np.ndarray:
    """The (V, D) token embedding the runtime looks tokens up in: the graph's float type (float32 for int8)."""
    check_precision(precision)
    return Gpt2Weights(state_dict).wte.astype(np.float16 if precision == "fp16" else np.float32)


def build_gpt2_graph(config: Any, state_dict: Mapping[str, Any], table: TokenTable, precision: str = "fp32") -> Any:
    """The onnx.ModelProto of the layout described in the module docstring, at `precision` (see PRECISIONS).

    `table` is where :func:`token_table` was saved (`graph.save_token_table`); a tied LM head reads its rows.
    """
    check_precision(precision)
    dims = Gpt2Dims.from_config(config)
    weights = Gpt2Weights(state_dict)
    g = GraphBuilder("gpt2_fused_static_kv")
    w = _Writer(g, weights, precision)
    if table.shape != (dims.vocab_size, dims.hidden_size) or table.dtype != w.float_dtype:
        raise ExportError(
            f"the token table is {table.dtype} {table.shape}; this graph needs {np.dtype(w.float_dtype)} "
            f"{(dims.vocab_size, dims.hidden_size)}"
        )
    buffer = ["batch", dims.num_heads, "max_length", dims.head_size]
    inputs_embeds = g.input("inputs_embeds", w.float_type, ["batch", "sequence", dims.hidden_size])
    position_ids = g.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    seqlens_k = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    g.output("logits", TensorProto.FLOAT, ["batch", dims.vocab_size])  # first, as optimum's graph has it
    g.output("logprobs", TensorProto.FLOAT, ["batch", dims.vocab_size])
    positions = g.node("Gather", [w.weight("wpe.weight"), position_ids])
    x, residual = inputs_embeds, positions  # (B, S, D); the first SkipLayerNormalization adds them
    bias = ""  # what the previous sublayer's output still lacks (its projection's bias)
    for i in range(dims.num_layers):
        p = f"h.{i}."
        normed, residual = _skip_norm(w, x, residual, bias, p + "ln_1", dims.epsilon)
        qkv = w.linear(normed, p + "attn.c_attn.weight", p + "attn.c_attn.bias")
        pasts = [g.input(f"past_key_values.{i}.{kv}", w.float_type, buffer) for kv in ("key", "value")]
        presents = [g.output(f"present.{i}.{kv}", w.float_type, buffer) for kv in ("key", "value")]
        attention = g.node(
            "GroupQueryAttention", [qkv, "", "", *pasts, seqlens_k, total], [f"attention.{i}", *presents],
            domain=MS_DOMAIN, num_heads=dims.num_heads, kv_num_heads=dims.num_heads,
            scale=dims.attention_scales[i],
        )[0]
        x = w.linear(attention, p + "attn.c_proj.weight")
        normed, residual = _skip_norm(w, x, residual, p + "attn.c_proj.bias", p + "ln_2", dims.epsilon)
        x = w.linear(normed, p + "mlp.c_fc.weight")
        x = _activation(g, dims.activation, x, w.weight(p + "mlp.c_fc.bias"))
        x = w.linear(x, p + "mlp.c_proj.weight")
        bias = p + "mlp.c_proj.bias"
    hidden, _ = _skip_norm(w, x, residual, bias, "ln_f", dims.epsilon, last=True)
    last = g.node("GatherND", [hidden, _last_positions(g, inputs_embeds, seqlens_k)], batch_dims=1)  # (B, D)
    if precision == "int8":
        head = weights.wte if weights.lm_head is None else weights.lm_head
        # (D, V) quantized per vocab row
        w.linear(last, "lm_head.weight_t", array=np.ascontiguousarray(head.T), output="logits")
    else:
        out = "logits" if precision == "fp32" else "logits/half"
        if weights.lm_head is None:
            g.vocab_projection(last, out, table=table)
        else:
            g.vocab_projection(last, out, weight=weights.lm_head.astype(w.float_dtype))
        if precision == "fp16":
            g.node("Cast", [out], ["logits"], to=TensorProto.FLOAT)
    g.log_softmax("logits", "logprobs")
    return g.model(producer="onnxgen.export.builders.gpt2")


def _skip_norm(w, x, residual, bias, norm, epsilon, last=False):
    """LayerNorm(x + residual + bias) and, unless `last`, the new residual x + residual + bias."""
    inputs = [x, residual, w.weight(norm + ".weight"), w.weight(norm + ".bias")]
    if bias:
        inputs.append(w.weight(bias))
    outputs = 1 if last else [f"{norm}/out", "", "", f"{norm}/residual"]
    result = w.g.node("SkipLayerNormalization", inputs, outputs, domain=MS_DOMAIN, epsilon=epsilon)
    return (result, None) if last else (result[0], result[3])


def _activation(g, activation, x, bias):
    if activation in TANH_GELUS:
        return g.node("FastGelu", [x, bias], domain=MS_DOMAIN)
    if activation in ERF_GELUS:
        return g.node("BiasGelu", [x, bias], domain=MS_DOMAIN)
    x = g.node("Add", [x, bias])
    if activation in SILUS:
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    return g.node("Relu", [x])


def _last_positions(g, inputs_embeds, seqlens_k):
    """(B, 1) int64: seqlens_k for a prompt (rows are right-padded), 0 for a one-token step: min(seqlens_k, S-1)."""
    width = g.node("Shape", [inputs_embeds], start=1, end=2)  # (1,) = S
    last_column = g.node("Sub", [width, g.constant("one_i64", [1], np.int64)])
    lengths = g.node("Cast", [seqlens_k], to=TensorProto.INT64)
    index = g.node("Min", [lengths, last_column])  # (B,)
    return g.node("Unsqueeze", [index, g.constant("axis_1", [1], np.int64)])


def write_gpt2(
    model: Any,
    output_dir: str | Path,
    *,
    file: str = GRAPH_FILE,
    external_data_threshold: int = 2 * 1024**3,
    precision: str = "fp32",
) -> GraphSpec:
    """Build the graph of a GPT2LMHeadModel into ``output_dir/file``, its token table beside it
    (``manifest.TOKEN_EMBEDDINGS_FILE``); return the graph's spec for the manifest.

    The manifest that names this graph must list :data:`OPTIMIZATIONS` so the runtime binds its layout, and
    record ``WEIGHT_DTYPES[precision]`` as its dtype.
    """
    path = Path(output_dir) / file
    state_dict = model.state_dict()
    table = save_token_table(output_dir, token_table(state_dict, precision))
    onnx_model = build_gpt2_graph(model.config, state_dict, table, precision)
    save_model(onnx_model, path, external_data_threshold)
    graph = onnx_model.graph
    return GraphSpec(file=file, inputs=tuple(i.name for i in graph.input), outputs=tuple(o.name for o in graph.output))
