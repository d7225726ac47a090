"""Run a model with some of its intermediate tensors exposed as outputs (for scores and recovery)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES, initializer_bytes
from pipeline.threads import session_options


class Probe:
    """An ONNX Runtime session over a copy of the model whose outputs are the named tensors.

    The copy is serialised in memory, so the model must be under the 2 GiB protobuf limit, unless
    its weights live in an external data file (`external_copy`): then only the graph is written
    and ONNX Runtime reads the weights it needs from that file.
    """

    def __init__(
        self, model: ir.Model, tensors: list[str], threads: int = 0, optimize: bool = True, folder: Path | None = None
    ) -> None:
        """Build the session.

        Args:
            model: The model (value types known for the tensors; run shape inference first).
            tensors: Names of the values to return.
            threads: ONNX Runtime intra-op threads (0: the job's budget).
            optimize: Let ONNX Runtime optimise the graph. Off, the graph runs as written: a QDQ
                model computes in float with fake quantization, and no fusion rewires a tensor
                (e.g. a Relu before a QuantizeLinear is removed when optimising).
            folder: Where the model's external data file is (see `external_copy`): the probe's
                graph is written there, next to it, instead of being passed as bytes.

        Raises:
            ValueError: A tensor is not in the graph, or the model is too big to probe in memory.
        """
        if folder is None and initializer_bytes(model) >= PROTOBUF_LIMIT_BYTES:
            raise ValueError("the model's weights exceed 2 GiB; probing intermediate tensors needs a smaller model")
        values = {value.name: value for node in model.graph for value in node.outputs}
        values.update({value.name: value for value in model.graph.inputs})
        missing = [name for name in tensors if name not in values]
        if missing:
            raise ValueError(f"no tensor named {', '.join(missing)} in the graph")
        proto = ir.to_proto(model)
        del proto.graph.output[:]
        proto.graph.output.extend(ir.serde.serialize_value(values[name]) for name in tensors)
        _keep_needed(proto.graph, set(tensors))
        options = session_options(threads)
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.tensors = tensors
        if folder is None:
            self._session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:
            path = folder / f"probe-{uuid.uuid4().hex}.onnx"
            onnx.save_model(proto, str(path))
            try:
                self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            finally:
                path.unlink()
        self._inputs = [i.name for i in self._session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The exposed tensors on one batch."""
        outputs = self._session.run(self.tensors, {name: feeds[name] for name in self._inputs})
        return dict(zip(self.tensors, outputs, strict=True))


def external_copy(model: ir.Model, folder: Path, name: str) -> ir.Model:
    """Save the model into `folder` with its weights in one external file; load it back lazily.

    Probes of the copy then serialise only the graph (the weights stay on disk until ONNX
    Runtime reads the ones a probe needs), which keeps repeated probing of a big model cheap.
    """
    path = folder / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data", size_threshold_bytes=1024)
    return ir.load(path)


def _keep_needed(graph: onnx.GraphProto, tensors: set[str]) -> None:
    """Drop the nodes and initializers the tensors do not depend on (ONNX Runtime runs them all)."""
    needed = set(tensors)
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name read inside a node's subgraphs (If / Loop / Scan bodies may read outer names)."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs] if attribute.HasField("g") or attribute.graphs else []:
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def channel_rows(array: np.ndarray, axis: int, mask: np.ndarray | None = None) -> np.ndarray:
    """A tensor as rows of channel values [positions, channels].

    Args:
        array: The tensor.
        axis: Its channel axis.
        mask: A [batch, sequence] token mask (e.g. the attention mask); when it matches the
            tensor's leading dims, only the rows of real tokens are kept: padding positions do not
            reach the model's outputs, so they must not steer channel ranking or recovery.
    """
    moved = np.moveaxis(array, axis, -1)
    if mask is not None and moved.ndim > mask.ndim and moved.shape[: mask.ndim] == mask.shape:
        moved = moved[mask.astype(bool)]
    return moved.reshape(-1, moved.shape[-1])
