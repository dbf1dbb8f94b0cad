"""A small ONNX graph builder: named initializers, nodes with generated output names, one save function.

Only what the architecture builders need; each node is one line in the caller, so a builder reads like the
model's forward pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxgen.export.onnx_files import match_permissions
from onnxgen.manifest import TOKEN_EMBEDDINGS_FILE

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators
OPSET = 17  # LayerNormalization is opset 17; onnxruntime 1.17+ runs it everywhere
MS_OPSET = 1
INLINE_TENSOR_BYTES = 1024  # as onnx's default: tiny tensors stay in the graph file
# The LM head is cut into Gemms over row ranges of at most this many bytes. onnxruntime holds a weight's source and
# its prepacked copy at once while packing it, so one (V, D) head would add its whole size to the load's peak
# (GPT-2 small: +147 MiB); chunks add one chunk. Measured on GPT-2 small, per-token time the same with 1 to 10
# chunks; the process's peak over a load and a 64-token generation was 558.6 MB with 32 MiB chunks and 547 MB with
# 16 MiB (8 MiB: 547 too, as the generation's own peak is then the higher one).
HEAD_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class TokenTable:
    """The (vocab, hidden) token embedding saved as .npy beside the graphs.

    The runtime reads the rows it needs from the file, so no graph holds the table for a Gather; a tied LM head
    reads row ranges of the same bytes as external data instead of a second copy.
    """

    file: str
    offset: int  # bytes before the data (the .npy header)
    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.dtype.itemsize


def save_token_table(directory: str | Path, table: np.ndarray, file: str = TOKEN_EMBEDDINGS_FILE) -> TokenTable:
    path = Path(directory) / file
    table = np.ascontiguousarray(table)
    if table.ndim != 2:
        raise ValueError(f"a token table is (vocab, hidden), got shape {table.shape}")
    np.save(path, table, allow_pickle=False)
    offset = int(np.load(path, mmap_mode="r").offset)
    return TokenTable(file, offset, (int(table.shape[0]), int(table.shape[1])), table.dtype)


def head_chunks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of a (rows, D) head, about equal, each at most HEAD_CHUNK_BYTES (or one row)."""
    per_chunk = max(1, HEAD_CHUNK_BYTES // row_bytes)
    count = max(1, math.ceil(rows / per_chunk))
    bounds = np.linspace(0, rows, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class GraphBuilder:
    """Accumulates inputs, outputs, initializers and nodes of one graph."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._names: set[str] = set()
        self._counter = 0

    def input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return self._claim(name)

    def output(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """A weight or constant; float64 arrays are refused (a builder must choose the dtype)."""
        array = np.ascontiguousarray(array)
        if array.dtype == np.float64:
            raise TypeError(f"initializer {name!r} is float64; convert it to the graph's dtype first")
        self.initializers.append(numpy_helper.from_array(array, self._claim(name)))
        return name

    def table_rows(self, name: str, table: TokenTable, start: int, end: int) -> str:
        """An initializer holding rows start..end-1 of `table`, read from its file (external data), not copied."""
        tensor = TensorProto()
        tensor.name = self._claim(name)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(table.dtype)
        tensor.dims.extend([end - start, table.shape[1]])
        tensor.data_location = TensorProto.EXTERNAL
        where = {"location": table.file, "offset": table.offset + start * table.row_bytes,
                 "length": (end - start) * table.row_bytes}
        for key, value in where.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
        return name

    def vocab_projection(
        self, hidden: str, output: str, *, table: TokenTable | None = None, weight: np.ndarray | None = None,
        alpha: float = 1.0,
    ) -> str:
        """alpha * hidden @ W^T for a (V, D) W: `table`'s rows (a tied head) or `weight`, as one Gemm per row
        chunk (:data:`HEAD_CHUNK_BYTES`) joined along the vocabulary."""
        if (table is None) == (weight is None):
            raise ValueError("vocab_projection needs exactly one of table and weight")
        rows, row_bytes = (table.shape[0], table.row_bytes) if table else (weight.shape[0], weight[0].nbytes)
        chunks = head_chunks(rows, row_bytes)
        parts = []
        for index, (start, end) in enumerate(chunks):
            name = f"lm_head.{index}"
            matrix = self.table_rows(name, table, start, end) if table else self.initializer(name, weight[start:end])
            out = [output] if len(chunks) == 1 else 1
            parts.append(self.node("Gemm", [hidden, matrix], out, transB=1, alpha=alpha))  # the rows not copied
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, [output], axis=1)

    def log_softmax(self, logits: str, output: str) -> str:
        """log_softmax over the vocabulary as a second output beside the logits. The search needs it every step
        (beam scores, each token's log-probability) and onnxruntime's vectorised kernel takes ~15 µs per 32k-row
        where NumPy's exp alone takes ~70 µs on an AVX2 CPU."""
        return self.node("LogSoftmax", [logits], [output], axis=-1)

    def constant(self, name: str, values, dtype) -> str:
        return self.initializer(name, np.asarray(values, dtype=dtype))

    def node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        *,
        name: str | None = None,
        domain: str = "",
        **attributes,
    ) -> str | list[str]:
        """Add a node; with `outputs` a count, output names are generated. Returns one name or a list."""
        self._counter += 1
        node_name = name or f"{op_type}_{self._counter}"
        if isinstance(outputs, int):
            outputs = [self._claim(f"{node_name}/out{i}") for i in range(outputs)]
        else:
            outputs = [o if o == "" else self._claim(o) for o in outputs]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain, **attributes))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 8  # onnxruntime >= 1.14 reads IR 8; newer onnx defaults may be ahead of it
        return model

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"graph {self.name!r}: the name {name!r} is used twice")
        self._names.add(name)
        return name


def save_model(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> str | None:
    """Write `model` to `path`; weights go to `<file>.data` when they exceed `external_data_threshold` bytes.

    Returns the data file's name, or None when everything stayed in the graph file.
    """
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]  # not a table's rows
    size = sum(int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t) for t in inline)
    if size <= external_data_threshold:
        onnx.save_model(model, str(path))
        return None
    location = path.name + ".data"
    (path.parent / location).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
        size_threshold=INLINE_TENSOR_BYTES,
    )
    match_permissions(path.parent / location, path)
    log.info("wrote %.1f MiB of weights of %s into %s", size / 2**20, path.name, location)
    return location


def _itemsize(tensor: TensorProto) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
