"""Checks of a parsed ONNX model that need no file: tensor element types and sizes, dims, the graph's
inputs against the job's ``[[inputs]]``, and the memory constant-producing nodes would take.

Each check raises `ModelProblem` (where, what); `pipeline.intake` names the user's file and
turns it into a `JobError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from pipeline.job import InputSpec

# A dim at or above this does not fit the 32-bit sizes many kernels (and ONNX Runtime's CPU
# allocator arithmetic on some paths) use; no real model needs one.
DIM_LIMIT = 2**31
# Nodes whose output size the graph fixes by itself (a constant shape, repeats or range): their
# outputs are materialised whatever the input, e.g. by ONNX Runtime's constant folding.
CONSTANT_PRODUCERS = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "RandomNormal", "RandomUniform", "EyeLike", "Resize", "Upsample"}
    | {"Pad"}
)
# Tensors up to this size keep their data in the copy shape inference sees (shape inputs,
# Range bounds); bigger ones keep only their type and dims.
_SHAPE_DATA_BYTES = 8192


class ModelProblem(Exception):
    """Something wrong in a model, found by a check.

    Attributes:
        where: The tensor, node or input it is about, e.g. ``tensor 'W'``.
        problem: What is wrong and what to do.
        key: The job key it is about, when it is a mismatch with the job (e.g. ``inputs[0].shape``).
    """

    def __init__(self, where: str, problem: str, key: str | None = None) -> None:
        self.where = where
        self.problem = problem
        self.key = key
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class ConstantEstimate:
    """The memory one constant-producing node's output takes.

    Attributes:
        node: The node's name (or its output's name when unnamed).
        op_type: Its operator.
        shape: Its output's static shape.
        nbytes: Its output's size in bytes.
    """

    node: str
    op_type: str
    shape: tuple[int, ...]
    nbytes: int


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers, sparse initializers and node attributes, in every
    graph, subgraph and function."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
        for value in [*sparse, *attribute.sparse_tensors]:
            yield from (value.values, value.indices)
        graphs = [attribute.g] if attribute.HasField("g") else []
        for graph in [*graphs, *attribute.graphs]:
            yield from _graph_tensors(graph)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and every subgraph in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            graphs = [attribute.g] if attribute.HasField("g") else []
            for sub in [*graphs, *attribute.graphs]:
                yield from all_graphs(sub)


def check_text(message: Message, where: str = "model") -> None:
    """Every string field of a model (names, dims, locations, ops) is valid UTF-8 text; the parser
    hands invalid ones over as bytes, which every later library fails on.

    Raises:
        ModelProblem: A string field holds bytes that are not UTF-8.
    """
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        values = list(value) if field.is_repeated else [value]
        for index, item in enumerate(values):
            path = f"{where}.{field.name}[{index}]" if field.is_repeated else f"{where}.{field.name}"
            if isinstance(item, bytes):
                raise ModelProblem(path, f"is not valid UTF-8 text ({item[:40]!r}); the file is damaged: re-export it")
            if field.type == field.TYPE_MESSAGE:
                check_text(item, path)


# ONNX Runtime's kernels start at opset 7 of the default domain (older Gemm, BatchNorm... have none).
_ORT_OLDEST_OPSET = 7


def check_opsets(model: onnx.ModelProto) -> None:
    """The standard domains' opset versions are ones this onnx knows and ONNX Runtime runs.

    Raises:
        ModelProblem: A version is older than ONNX Runtime runs, or newer than the newest known.
    """
    newest_ml = max(row[3] for row in onnx.helper.VERSION_TABLE)
    newest = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version(), "ai.onnx.ml": newest_ml}
    for entry in model.opset_import:
        limit = newest.get(entry.domain)
        oldest = _ORT_OLDEST_OPSET if entry.domain in ("", "ai.onnx") else 1
        if limit is not None and not oldest <= entry.version <= limit:
            domain = entry.domain or "ai.onnx"
            raise ModelProblem(
                f"opset_import {domain!r}",
                f"asks for opset {entry.version}; the versions that run here are {oldest} .. {limit}: re-export "
                f"the model with an opset in that range (or convert it with onnx.version_converter)",
            )


def _dtype_name(data_type: int) -> str:
    known = data_type in onnx.TensorProto.DataType.values()
    return onnx.TensorProto.DataType.Name(data_type) if known else str(data_type)


def _bits(tensor: onnx.TensorProto) -> int:
    """Bits per element of a tensor's element type (0 for strings).

    Raises:
        ModelProblem: The type is UNDEFINED or not an ONNX type.
    """
    where = f"tensor {tensor.name!r}"
    if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in onnx.TensorProto.DataType.values():
        raise ModelProblem(
            where,
            f"has no valid element type ({_dtype_name(tensor.data_type)}); the file is damaged or was written by "
            "a broken tool: re-export the model",
        )
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    return int(ir.DataType(tensor.data_type).bitwidth)


def check_dims(where: str, dims: Iterable[int]) -> int:
    """Elements of a shape whose dims are all in 0 .. 2^31 - 1.

    Raises:
        ModelProblem: A dim is negative or 2^31 or more.
    """
    dims = list(dims)
    for axis, dim in enumerate(dims):
        if dim < 0 or dim >= DIM_LIMIT:
            raise ModelProblem(where, f"has dim {dim} on axis {axis} (dims {dims}); dims must lie in 0 .. 2^31 - 1")
    return math.prod(dims)


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's data takes, from its dims and element type (None: strings and types whose
    packing is not byte-aligned per element group, e.g. 6-bit floats).

    Raises:
        ModelProblem: Its element type is invalid or a dim is out of range.
    """
    bits = _bits(tensor)
    elements = check_dims(f"tensor {tensor.name!r}", tensor.dims)
    if bits == 0 or (bits % 8 and bits not in (2, 4)):
        return None
    return math.ceil(elements * bits / 8)


def _typed_entries(tensor: onnx.TensorProto, elements: int, bits: int) -> int | None:
    """How many entries of its typed field (float_data, int32_data, ...) a tensor needs."""
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * elements
    if bits in (2, 4):
        return math.ceil(elements * bits / 8)
    return None if bits % 8 else elements


def check_tensor(tensor: onnx.TensorProto) -> None:
    """A tensor's element type is valid, its dims in range and its inline data as big as they say.

    External data is checked with its file (`pipeline.external_data`).

    Raises:
        ModelProblem: The type is UNDEFINED or unknown, a dim is out of range, or the data does not
            match the dims and type.
    """
    where = f"tensor {tensor.name!r}"
    nbytes = tensor_nbytes(tensor)
    if tensor.HasField("segment"):
        raise ModelProblem(where, "is a segment of a larger tensor, which onnxforge does not support")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    elements = math.prod(tensor.dims)
    kind = _dtype_name(tensor.data_type)
    if tensor.HasField("raw_data"):
        if nbytes is not None and len(tensor.raw_data) != nbytes:
            raise ModelProblem(
                where,
                f"holds {len(tensor.raw_data)} bytes but its dims {list(tensor.dims)} and type {kind} need {nbytes}; "
                "the file is damaged: re-export the model",
            )
        return
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    count = len(getattr(tensor, field))
    is_string = tensor.data_type == onnx.TensorProto.STRING
    expected = elements if is_string else _typed_entries(tensor, elements, _bits(tensor))
    if expected is not None and count != expected:
        raise ModelProblem(
            where,
            f"holds {count} values in {field} but its dims {list(tensor.dims)} and type {kind} need {expected}; "
            "the file is damaged: re-export the model",
        )


def check_value_dims(model: onnx.ModelProto) -> None:
    """Every fixed dim the graphs declare (inputs, outputs, value infos) is in 0 .. 2^31 - 1.

    Raises:
        ModelProblem: One is not.
    """
    for graph in all_graphs(model.graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                dims = [dim.dim_value for dim in value.type.tensor_type.shape.dim if dim.HasField("dim_value")]
                check_dims(f"value {value.name!r}", dims)


def check_inputs(graph: onnx.GraphProto, specs: list[InputSpec], hint: str) -> None:
    """The graph's inputs are the job's ``[[inputs]]``: same names, element types and ranks; a dim the
    job names (dynamic) is not fixed by the graph, a dim the job fixes is not fixed otherwise.

    Args:
        graph: The model's main graph.
        specs: The job's inputs.
        hint: What to do when a named dim is fixed (depends on where the model came from).

    Raises:
        ModelProblem: (with the job key) The first mismatch.
    """
    initializers = {tensor.name for tensor in graph.initializer}
    values = {value.name: value for value in graph.input if value.name not in initializers}
    for index, spec in enumerate(specs):
        value = values.get(spec.name)
        if value is None:
            raise ModelProblem(
                f"input {spec.name!r}",
                f"is not an input of the model; its inputs are {list(values)}: name [[inputs]] after them",
                key=f"inputs[{index}].name",
            )
        _check_input(index, spec, value, hint)
    extra = [name for name in values if name not in {spec.name for spec in specs}]
    if extra:
        raise ModelProblem(
            f"input {extra[0]!r}",
            f"is an input of the model that the job does not list (all unlisted: {extra}); add an [[inputs]] "
            "entry for each",
            key="inputs",
        )


def _check_input(index: int, spec: InputSpec, value: onnx.ValueInfoProto, hint: str) -> None:
    where = f"input {spec.name!r}"
    if not value.type.HasField("tensor_type"):
        raise ModelProblem(where, "is not a tensor in the model", key=f"inputs[{index}]")
    tensor_type = value.type.tensor_type
    expected = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    if tensor_type.elem_type != expected:
        raise ModelProblem(
            where,
            f"has element type {_dtype_name(tensor_type.elem_type)} in the model; the job says {spec.dtype}",
            key=f"inputs[{index}].dtype",
        )
    if not tensor_type.HasField("shape"):
        return  # any rank: nothing to compare
    dims = tensor_type.shape.dim
    if len(dims) != len(spec.shape):
        raise ModelProblem(
            where, f"has rank {len(dims)} in the graph; the job says {spec.shape}", key=f"inputs[{index}].shape"
        )
    for axis, (dim, wanted) in enumerate(zip(dims, spec.shape, strict=True)):
        fixed = dim.dim_value if dim.HasField("dim_value") else None
        if isinstance(wanted, str) and fixed is not None:
            raise ModelProblem(
                where,
                f"axis {axis} ({wanted!r}) should be dynamic but the graph fixes it to {fixed}; {hint}",
                key=f"inputs[{index}].shape",
            )
        if isinstance(wanted, int) and fixed is not None and fixed != wanted:
            raise ModelProblem(
                where, f"axis {axis} is {fixed} in the graph; the job says {wanted}", key=f"inputs[{index}].shape"
            )


def inference_view(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes]) -> onnx.ModelProto:
    """A copy of the model for shape inference: small tensors with their data (shape inputs, Range
    bounds; external ones read through `read`), big main-graph initializers with type and dims only."""
    view = onnx.ModelProto()
    graph = model.graph
    view.graph.node.extend(graph.node)
    view.graph.input.extend(graph.input)
    view.graph.output.extend(graph.output)
    view.graph.value_info.extend(graph.value_info)
    view.graph.sparse_initializer.extend(graph.sparse_initializer)
    view.ir_version = model.ir_version
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    for tensor in graph.initializer:
        copy = view.graph.initializer.add()
        nbytes = tensor_nbytes(tensor)
        small = nbytes is not None and nbytes <= _SHAPE_DATA_BYTES
        if small and tensor.data_location == onnx.TensorProto.EXTERNAL:
            copy.CopyFrom(onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type))
            copy.raw_data = read(tensor)
        elif small:
            copy.CopyFrom(tensor)
        else:
            copy.CopyFrom(onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type))
    return view


def constant_estimates(inferred: onnx.ModelProto) -> list[ConstantEstimate]:
    """The statically known output sizes of constant-producing nodes, every graph included.

    Args:
        inferred: The model after shape inference (its value infos give the output shapes).

    Raises:
        ModelProblem: An inferred dim is 2^31 or more.
    """
    graphs = list(all_graphs(inferred.graph))
    types = {
        value.name: value.type.tensor_type
        for graph in graphs
        for value in [*graph.value_info, *graph.output]
        if value.type.HasField("tensor_type")
    }
    estimates = []
    for graph in graphs:
        for node in graph.node:
            if node.op_type not in CONSTANT_PRODUCERS or not node.output or node.output[0] not in types:
                continue
            tensor_type = types[node.output[0]]
            dims = tensor_type.shape.dim
            if not tensor_type.HasField("shape") or not all(dim.HasField("dim_value") for dim in dims):
                continue  # depends on the inputs: not a constant
            name = node.name or node.output[0]
            shape = tuple(dim.dim_value for dim in dims)
            elements = check_dims(f"node {name!r} ({node.op_type}) output", shape)
            bits = _element_bits(tensor_type.elem_type)
            estimates.append(ConstantEstimate(name, node.op_type, shape, math.ceil(elements * bits / 8)))
    return estimates


def _element_bits(elem_type: int) -> int:
    try:
        return int(ir.DataType(elem_type).bitwidth)
    except (TypeError, ValueError):  # UNDEFINED, STRING or unknown: count a byte per element
        return 8
