"""Small operations on exported ONNX files: I/O names, weight sizes, external data, removal."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

log = logging.getLogger(__name__)

EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
# onnx's default: tiny tensors stay in the graph (optimum notes some ops break when everything is external).
_INLINE_TENSOR_BYTES = 1024


def graph_io_names(path: Path) -> tuple[list[str], list[str]]:
    """The graph's real inputs (initializers excluded, as old opsets list them as inputs too) and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return inputs, [o.name for o in model.graph.output]


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers and constant tensors, subgraphs (If/Loop bodies) included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The files (relative to the graph) that hold tensors of ``model``, loaded with load_external_data=False."""
    files = set()
    for tensor in _all_tensors(model.graph):
        if _is_external(tensor):
            files.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return files


def data_files_of(path: Path) -> set[str]:
    return external_data_files(onnx.load(str(path), load_external_data=False))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers and constants, from their shapes (works whether the data is loaded or not)."""
    total = 0
    for tensor in _all_tensors(model.graph):
        if tensor.data_type == TensorProto.STRING:
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def externalize_if_large(path: Path, threshold_bytes: int) -> str | None:
    """Move the weights of ``path`` into ``<file>.data`` when they exceed ``threshold_bytes``.

    Returns the data file's name, or None when nothing was moved: the weights are small enough, or the graph
    already keeps them outside (torch.onnx and optimum do that themselves for graphs over protobuf's 2 GiB).
    """
    model = onnx.load(str(path), load_external_data=False)
    existing = external_data_files(model)
    if existing:
        log.debug("%s already keeps its weights in %s", path.name, sorted(existing))
        return None
    size = weight_bytes(model)
    if size <= threshold_bytes:
        return None
    location = path.name + EXTERNAL_DATA_SUFFIX
    # onnx appends to an existing data file, which would leave stale bytes behind.
    (path.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=_INLINE_TENSOR_BYTES,
    )
    match_permissions(path.parent / location, path)
    log.info("moved %.1f MiB of weights of %s into %s", size / 2**20, path.name, location)
    return location


def match_permissions(data_file: Path, graph_file: Path) -> None:
    """Give a weights file its graph's permissions: onnx creates data files readable by their owner only (0600),
    which breaks a model directory shared with the user a server runs as."""
    data_file.chmod(graph_file.stat().st_mode & 0o777)


def remove_graph(path: Path, keep: set[str] = frozenset()) -> None:
    """Delete a graph and its external data files, except those in ``keep`` (used by the graphs that stay)."""
    if not path.exists():
        return
    model = onnx.load(str(path), load_external_data=False)
    for name in external_data_files(model) - set(keep):
        (path.parent / name).unlink(missing_ok=True)
    path.unlink()
