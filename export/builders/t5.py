"""T5 as two ONNX graphs of onnxruntime's fused operators, built straight from the checkpoint's weights.

The encoder graph runs once per prompt and also projects its output into every decoder layer's cross-attention
keys and values, so decoding never touches those weights again. The decoder graph runs one token per row per
call, the first call (the decoder start token) included. Shapes for B rows, S encoder tokens, D = d_model,
N heads of size H (inner size I = N H), L decoder layers::

    encoder   x = T5LayerNorm(x) ... as in T5Stack; RMS norms are (Skip)SimplifiedLayerNormalization
              self-attention: MultiHeadAttention(q, k, v, key_padding_mask, bias (1, N, S, S)), scale 1
              present.{i}.encoder.key/value = heads(hidden @ EncDecAttention.k/v)   (B, N, S, H)

    decoder   qkv = RMSNorm(x) @ [q|k|v]                              (B, 1, 3I)
              a   = GroupQueryAttention(qkv, self K/V buffers, seqlens_k, bias (B, N, 1, T)), scale 1
              c   = MultiHeadAttention(RMSNorm(x) @ q, cross K/V, key_padding_mask = encoder_attention_mask)
              FFN: wo(relu(wi x)) or wo(act(wi_0 x) * wi_1 x); residual sums ride in SkipSimplifiedLayerNormalization
              logits = Gemm(RMSNorm(x), lm_head, transB) (B, V), in row chunks (graph.HEAD_CHUNK_BYTES) joined
              by Concat; tied heads fold T5's d_model**-0.5 into alpha; logprobs = LogSoftmax(logits)

Both graphs take the token embeddings' rows (``inputs_embeds``): the runtime looks tokens up in the shared table,
written as its own .npy (``manifest.TOKEN_LOOKUP``), and a tied LM head reads row chunks of that file as external
data, so neither session holds a copy of the table for a Gather.

T5 does not scale q.k by 1/sqrt(H) (its initialisation absorbs it), hence scale=1. The relative position bias,
computed by layer 0 and shared by every layer of a stack, is a lookup table indexed by clipped distance: every
distance at or beyond relative_attention_max_distance falls in the same bucket, so the table is finite and
computed here with T5's own float32 arithmetic. The decoder's self-attention keys/values are buffers
(B, N, capacity, H) bound as both past and present; GroupQueryAttention writes position seqlens_k[b] in place.

Encoder inputs: inputs_embeds (B, S, D) float32 = shared[input_ids]; attention_mask (B, S) int64.
Decoder inputs: inputs_embeds (B, 1, D) float32; seqlens_k (B,) int32 = decoder tokens in the row after this call - 1;
total_sequence_length () int32 = max(seqlens_k) + 1; encoder_attention_mask (B, S) int32;
past_key_values.{i}.decoder.key/value (B, N, capacity, H); past_key_values.{i}.encoder.key/value (B, N, S, H).
Outputs: logits (B, V) float32; logprobs (B, V) float32 = log_softmax(logits); present.{i}.decoder.key/value, the same buffers as the past inputs.
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
from onnxgen.export.builders.gpt2 import ERF_GELUS, TANH_GELUS, _to_numpy, quantize_columns
from onnxgen.export.builders.graph import MS_DOMAIN, GraphBuilder, TokenTable, save_model, save_token_table
from onnxgen.export.errors import ExportError
from onnxgen.manifest import FUSED_GQA, LAST_LOGITS, STATIC_KV, TOKEN_LOOKUP, GraphSpec

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_fused.onnx"
DECODER_FILE = "decoder_fused.onnx"
OPTIMIZATIONS = (FUSED_GQA, LAST_LOGITS, STATIC_KV, TOKEN_LOOKUP)
PRECISIONS = ("fp32", "int8")
ACTIVATIONS = TANH_GELUS + ERF_GELUS + ("relu", "silu")
MASKED = float(np.finfo(np.float32).min)  # what transformers adds to masked scores


@dataclass(frozen=True)
class T5Dims:
    """The hyperparameters the graphs need, read from a T5Config (or MT5Config)."""

    encoder_layers: int
    decoder_layers: int
    num_heads: int
    head_size: int  # d_kv
    hidden_size: int  # d_model
    vocab_size: int
    epsilon: float
    activation: str  # dense_act_fn
    gated: bool  # wo(act(wi_0 x) * wi_1 x) instead of wo(act(wi x))
    num_buckets: int
    max_distance: int
    tied: bool  # tie_word_embeddings: the LM head is `shared`, after a d_model**-0.5 rescale

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_size

    @classmethod
    def from_config(cls, config: Any) -> T5Dims:
        head_size = int(config.d_kv)
        if head_size % 8:
            raise ExportError(
                f"d_kv {head_size} is not a multiple of 8, which onnxruntime's GroupQueryAttention needs on CPU; "
                "export without the fused graphs"
            )
        activation = str(config.dense_act_fn)
        if activation not in ACTIVATIONS:
            raise ExportError(
                f"feed_forward_proj activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        buckets, distance = int(config.relative_attention_num_buckets), int(config.relative_attention_max_distance)
        # the decoder's log-spaced buckets start at half the buckets and grow up to max_distance: at exactly half
        # they have no range (transformers' own bucketing divides by log(1) there)
        if buckets < 4 or distance <= buckets // 2:
            raise ExportError(
                f"relative_attention_num_buckets {buckets} with relative_attention_max_distance {distance} is not "
                "supported; at least 4 buckets and a max distance above half the buckets are needed"
            )
        decoder_layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        return cls(
            encoder_layers=int(config.num_layers), decoder_layers=int(decoder_layers), num_heads=int(config.num_heads),
            head_size=head_size, hidden_size=int(config.d_model), vocab_size=int(config.vocab_size),
            epsilon=float(config.layer_norm_epsilon), activation=activation, gated=bool(config.is_gated_act),
            num_buckets=buckets, max_distance=distance, tied=bool(getattr(config, "tie_word_embeddings", True)),
        )


class T5Weights:
    """T5ForConditionalGeneration's state_dict as float32 arrays; Linear weights transposed to (in, out) for MatMul."""

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self._arrays = dict(state_dict)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise ExportError(f"the checkpoint has no weight {name!r} (is it a T5ForConditionalGeneration?)")
        return _to_numpy(self._arrays[name])

    def linear(self, *names: str) -> np.ndarray:
        """The (in, out) matrix of one Linear, or of several side by side (one MatMul for q, k and v)."""
        return np.ascontiguousarray(np.concatenate([self[n + ".weight"].T for n in names], axis=1))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5Attention._relative_position_bucket in NumPy, float32 like PyTorch's, so bucket edges fall alike."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    exact = num_buckets // 2
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)  # distances below `exact` are not used
    scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(num_buckets - exact)
    large = np.minimum(exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(distance < exact, distance, large)


def position_bias_table(weight: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bias (heads per row) of every distinct relative position, key minus query.

    Bidirectional: rows for -max_distance .. max_distance (index = relative position + max_distance).
    Causal: rows for distances query - key = 0 .. max_distance. Anything further shares the last bucket.
    """
    positions = np.arange(-max_distance, max_distance + 1) if bidirectional else -np.arange(max_distance + 1)
    return np.ascontiguousarray(weight[relative_position_bucket(positions, bidirectional, num_buckets, max_distance)])


def token_table(state_dict: Mapping[str, Any]) -> np.ndarray:
    """The (V, D) float32 table the runtime looks tokens up in: `shared`, the encoder's and decoder's embedding."""
    return T5Weights(state_dict)["shared.weight"]


def build_t5_graphs(
    config: Any, state_dict: Mapping[str, Any], table: TokenTable, precision: str = "fp32"
) -> dict[str, Any]:
    """{"encoder": ModelProto, "decoder": ModelProto} of the layout described in the module docstring.

    `table` is where :func:`token_table` was saved (`graph.save_token_table`); a tied fp32 LM head reads its rows.
    precision: "fp32", or "int8": every MatMul of both graphs, the LM head included, is a DynamicQuantizeMatMul
    (per-column uint8 weights, activations quantized per call); norms, attention and the buffers stay float32.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)} for T5, got {precision!r}")
    dims = T5Dims.from_config(config)
    weights = T5Weights(state_dict)
    if table.shape != (dims.vocab_size, dims.hidden_size) or table.dtype != np.float32:
        raise ExportError(
            f"the token table is {table.dtype} {table.shape}; these graphs need float32 "
            f"{(dims.vocab_size, dims.hidden_size)}"
        )
    return {"encoder": _encoder_graph(dims, weights, precision), "decoder": _decoder_graph(dims, weights, table, precision)}


def _encoder_graph(dims: T5Dims, weights: T5Weights, precision: str):
    g = GraphBuilder("t5_encoder_fused")
    linear = _Linear(g, weights, precision)
    x = g.input("inputs_embeds", TensorProto.FLOAT, ["batch", "encoder_sequence", dims.hidden_size])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch", "encoder_sequence"])
    kv_shape = ["batch", dims.num_heads, "encoder_sequence", dims.head_size]
    outputs = [f"present.{i}.encoder.{kv}" for i in range(dims.decoder_layers) for kv in ("key", "value")]
    for name in outputs:
        g.output(name, TensorProto.FLOAT, kv_shape)
    padding = g.node("Cast", [mask], to=TensorProto.INT32)  # (B, S): MultiHeadAttention's key_padding_mask
    bias = _encoder_position_bias(g, dims, weights, x)  # (1, N, S, S)
    normed, residual = _norm(g, weights, x, None, "encoder.block.0.layer.0.layer_norm", dims.epsilon)
    for i in range(dims.encoder_layers):
        p = f"encoder.block.{i}.layer."
        qkv = linear(normed, *(p + f"0.SelfAttention.{w}" for w in "qkv"))
        q, k, v = g.node("Split", [qkv], 3, axis=2)
        attention = g.node(
            "MultiHeadAttention", [q, k, v, "", padding, bias], domain=MS_DOMAIN, num_heads=dims.num_heads,
            scale=1.0, mask_filter_value=MASKED,
        )
        x = linear(attention, p + "0.SelfAttention.o")
        normed, residual = _norm(g, weights, x, residual, p + "1.layer_norm", dims.epsilon)
        x = _feed_forward(g, dims, linear, normed, p + "1.DenseReluDense")
        last = i + 1 == dims.encoder_layers
        following = "encoder.final_layer_norm" if last else f"encoder.block.{i + 1}.layer.0.layer_norm"
        normed, residual = _norm(g, weights, x, residual, following, dims.epsilon, last=last)
    heads = g.constant("encoder_heads_shape", [0, -1, dims.num_heads, dims.head_size], np.int64)
    for i in range(dims.decoder_layers):
        for kind in ("key", "value"):
            projected = linear(normed, f"decoder.block.{i}.layer.1.EncDecAttention.{kind[0]}")
            split = g.node("Reshape", [projected, heads])  # (B, S, N, H)
            g.node("Transpose", [split], [f"present.{i}.encoder.{kind}"], perm=[0, 2, 1, 3])
    return g.model(producer="onnxgen.export.builders.t5")


def _encoder_position_bias(g, dims, weights, inputs_embeds):
    """(1, N, S, S): table[clip(key - query, -max_distance, max_distance) + max_distance], heads first."""
    weight = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    table = position_bias_table(weight, True, dims.num_buckets, dims.max_distance)
    width = g.node("Squeeze", [g.node("Shape", [inputs_embeds], start=1, end=2), g.constant("axes_0", [0], np.int64)])
    positions = g.node("Range", [g.constant("zero_i64", 0, np.int64), width, g.constant("one_i64", 1, np.int64)])
    keys = g.node("Unsqueeze", [positions, g.constant("axes_0b", [0], np.int64)])  # (1, S)
    queries = g.node("Unsqueeze", [positions, g.constant("axes_1", [1], np.int64)])  # (S, 1)
    limit = dims.max_distance
    relative = g.node("Clip", [g.node("Sub", [keys, queries]), g.constant("min_rel", -limit, np.int64),
                               g.constant("max_rel", limit, np.int64)])
    index = g.node("Add", [relative, g.constant("rel_offset", limit, np.int64)])
    bias = g.node("Gather", [g.initializer("encoder.relative_position_bias", table), index])  # (S, S, N)
    return g.node("Unsqueeze", [g.node("Transpose", [bias], perm=[2, 0, 1]), g.constant("axes_0c", [0], np.int64)])


def _decoder_graph(dims: T5Dims, weights: T5Weights, table: TokenTable, precision: str):
    g = GraphBuilder("t5_decoder_fused_static_kv")
    linear = _Linear(g, weights, precision)
    buffer = ["batch", dims.num_heads, "max_length", dims.head_size]
    cross = ["batch", dims.num_heads, "encoder_sequence", dims.head_size]
    x = g.input("inputs_embeds", TensorProto.FLOAT, ["batch", 1, dims.hidden_size])
    seqlens_k = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    padding = g.input("encoder_attention_mask", TensorProto.INT32, ["batch", "encoder_sequence"])
    g.output("logits", TensorProto.FLOAT, ["batch", dims.vocab_size])
    g.output("logprobs", TensorProto.FLOAT, ["batch", dims.vocab_size])
    bias = _decoder_position_bias(g, dims, weights, seqlens_k, total)  # (B, N, 1, T)
    normed, residual = _norm(g, weights, x, None, "decoder.block.0.layer.0.layer_norm", dims.epsilon)
    for i in range(dims.decoder_layers):
        p = f"decoder.block.{i}.layer."
        qkv = linear(normed, *(p + f"0.SelfAttention.{w}" for w in "qkv"))
        pasts = [g.input(f"past_key_values.{i}.decoder.{kv}", TensorProto.FLOAT, buffer) for kv in ("key", "value")]
        presents = [g.output(f"present.{i}.decoder.{kv}", TensorProto.FLOAT, buffer) for kv in ("key", "value")]
        attention = g.node(
            "GroupQueryAttention", [qkv, "", "", *pasts, seqlens_k, total, "", "", "", bias],
            [f"self_attention.{i}", *presents], domain=MS_DOMAIN, num_heads=dims.num_heads,
            kv_num_heads=dims.num_heads, scale=1.0,
        )[0]
        x = linear(attention, p + "0.SelfAttention.o")
        normed, residual = _norm(g, weights, x, residual, p + "1.layer_norm", dims.epsilon)
        q = linear(normed, p + "1.EncDecAttention.q")
        keys = [g.input(f"past_key_values.{i}.encoder.{kv}", TensorProto.FLOAT, cross) for kv in ("key", "value")]
        attention = g.node(
            "MultiHeadAttention", [q, *keys, "", padding], domain=MS_DOMAIN, num_heads=dims.num_heads, scale=1.0,
            mask_filter_value=MASKED,
        )
        x = linear(attention, p + "1.EncDecAttention.o")
        normed, residual = _norm(g, weights, x, residual, p + "2.layer_norm", dims.epsilon)
        x = _feed_forward(g, dims, linear, normed, p + "2.DenseReluDense")
        last = i + 1 == dims.decoder_layers
        following = "decoder.final_layer_norm" if last else f"decoder.block.{i + 1}.layer.0.layer_norm"
        normed, residual = _norm(g, weights, x, residual, following, dims.epsilon, last=last)
    hidden = g.node("Squeeze", [normed, g.constant("axes_1", [1], np.int64)])  # (B, D): one token per row
    if precision == "int8":  # (D, V) quantized per vocabulary column; a tied head's rescale folded in first
        head = weights["shared.weight"] * np.float32(dims.hidden_size**-0.5) if dims.tied else weights["lm_head.weight"]
        linear.matrix(hidden, "lm_head.weight_t", np.ascontiguousarray(head.T), output="logits")
    elif dims.tied:  # T5 rescales by d_model**-0.5 before a tied head
        g.vocab_projection(hidden, "logits", table=table, alpha=dims.hidden_size**-0.5)
    else:
        g.vocab_projection(hidden, "logits", weight=weights["lm_head.weight"])
    g.log_softmax("logits", "logprobs")
    return g.model(producer="onnxgen.export.builders.t5")


def _decoder_position_bias(g, dims, weights, seqlens_k, total):
    """(B, N, 1, T): row b's query sits at seqlens_k[b]; key j gets table[clip(seqlens_k[b] - j, 0, max_distance)].

    Keys past seqlens_k[b] (another row's longer history) get a bias too, but GroupQueryAttention masks them.
    """
    weight = weights["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    table = position_bias_table(weight, False, dims.num_buckets, dims.max_distance)
    keys = g.node("Range", [g.constant("zero_i32", 0, np.int32), total, g.constant("one_i32", 1, np.int32)])
    queries = g.node("Unsqueeze", [seqlens_k, g.constant("axes_1b", [1], np.int64)])  # (B, 1)
    distance = g.node("Clip", [g.node("Sub", [queries, keys]), g.constant("min_dist", 0, np.int32),
                               g.constant("max_dist", dims.max_distance, np.int32)])  # (B, T)
    bias = g.node("Gather", [g.initializer("decoder.relative_position_bias", table), distance])  # (B, T, N)
    return g.node("Unsqueeze", [g.node("Transpose", [bias], perm=[0, 2, 1]), g.constant("axes_2", [2], np.int64)])


class _Linear:
    """x @ W for one Linear (or several side by side) of the checkpoint: a MatMul, or for int8 a
    DynamicQuantizeMatMul over per-column uint8 weights (the GPT-2 builder's scheme, see its module docstring)."""

    def __init__(self, g: GraphBuilder, weights: T5Weights, precision: str) -> None:
        self.g, self.weights, self.precision = g, weights, precision

    def __call__(self, x: str, *linears: str) -> str:
        name = linears[0] if len(linears) == 1 else linears[0].rsplit(".", 1)[0] + ".qkv"
        return self.matrix(x, name + ".weight", self.weights.linear(*linears))

    def matrix(self, x: str, name: str, matrix: np.ndarray, output: str | None = None) -> str:
        """x @ matrix for an (in, out) float32 matrix."""
        g, outputs = self.g, [output] if output else 1
        if self.precision == "fp32":
            return g.node("MatMul", [x, g.initializer(name, matrix)], outputs)
        quantized, scale, zero_point = quantize_columns(matrix)
        inputs = [x, g.initializer(name + ".quantized", quantized), g.initializer(name + ".scale", scale),
                  g.initializer(name + ".zero_point", zero_point)]
        return g.node("DynamicQuantizeMatMul", inputs, outputs, domain=MS_DOMAIN)


def _norm(g, weights, x, residual, norm, epsilon, last=False):
    """T5LayerNorm(x + residual) and, unless `last`, the new residual x + residual (x itself when there is none)."""
    scale = g.initializer(norm + ".weight", weights[norm + ".weight"])
    if residual is None:
        return g.node("SimplifiedLayerNormalization", [x, scale], axis=-1, epsilon=epsilon), x
    outputs = 1 if last else [f"{norm}/out", "", "", f"{norm}/residual"]
    skip = "SkipSimplifiedLayerNormalization"
    result = g.node(skip, [x, residual, scale], outputs, domain=MS_DOMAIN, epsilon=epsilon)
    return (result, None) if last else (result[0], result[3])


def _feed_forward(g, dims, linear, x, prefix):
    if dims.gated:
        gate = _activation(g, dims.activation, linear(x, prefix + ".wi_0"))
        x = g.node("Mul", [gate, linear(x, prefix + ".wi_1")])
    else:
        x = _activation(g, dims.activation, linear(x, prefix + ".wi"))
    return linear(x, prefix + ".wo")


def _activation(g, activation, x):
    if activation in TANH_GELUS:
        return g.node("FastGelu", [x], domain=MS_DOMAIN)
    if activation in ERF_GELUS:
        return g.node("Gelu", [x], domain=MS_DOMAIN)
    if activation == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    return g.node("Relu", [x])


def write_t5(
    model: Any, output_dir: str | Path, *, external_data_threshold: int = 2 * 1024**3, precision: str = "fp32"
) -> dict[str, GraphSpec]:
    """Build the graphs of a T5ForConditionalGeneration into ``output_dir``, its token table beside them
    (``manifest.TOKEN_EMBEDDINGS_FILE``); return {name: spec} for the manifest.

    The manifest that names these graphs must list :data:`OPTIMIZATIONS` so the runtime binds their layout.
    """
    state_dict = model.state_dict()
    table = save_token_table(output_dir, token_table(state_dict))
    graphs = build_t5_graphs(model.config, state_dict, table, precision)
    specs = {}
    for name, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
        onnx_model = graphs[name]
        save_model(onnx_model, Path(output_dir) / file, external_data_threshold)
        graph = onnx_model.graph
        specs[name] = GraphSpec(file, tuple(i.name for i in graph.input), tuple(o.name for o in graph.output))
    return specs
