"""A small ONNX graph builder: named initializers, nodes with generated output names, one save function.

Only what the architecture builders need; each node is one line in the caller, so a builder reads like the
model's forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxgen.export.onnx_files import match_permissions

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators
OPSET = 17  # LayerNormalization is opset 17; onnxruntime 1.17+ runs it everywhere
MS_OPSET = 1
INLINE_TENSOR_BYTES = 1024  # as onnx's default: tiny tensors stay in the graph file


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
    size = sum(int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t) for t in model.graph.initializer)
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
