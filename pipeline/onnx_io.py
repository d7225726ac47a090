"""ONNX model files: saving (with external data for big models), checking by path, describing."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx
import onnx_ir as ir

from pipeline.artifacts import Artifact, sha256_file, staged_files
from pipeline.records import ModelRecord

logger = logging.getLogger(__name__)

# A ModelProto cannot be serialised past 2 GiB; weights beyond that must live in external data.
PROTOBUF_LIMIT_BYTES = 2**31
# Tensors smaller than this stay inside the .onnx file even when the model uses external data.
_INLINE_TENSOR_BYTES = 1024


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of weight data in a model's main graph."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def parameter_count(model: ir.Model) -> int:
    """Elements of every initializer in a model's main graph."""
    return int(sum(math.prod(v.shape.numpy()) for v in model.graph.initializers.values() if v.shape is not None))


def external_data_name(target: Path) -> str:
    """The external data file that goes with a model file: ``<model file name>.data``."""
    return f"{target.name}.data"


def save_model(
    model: ir.Model, target: Path, external_threshold_bytes: int, verify: Callable[[Path], None] | None = None
) -> bool:
    """Write a model atomically; weights go to ``<target>.data`` when they exceed the threshold.

    Args:
        model: The model.
        target: The .onnx file to write.
        external_threshold_bytes: Weight bytes above which external data is used (capped at the
            protobuf limit, above which it is always used).
        verify: Called on the written file before it is moved into place; if it raises,
            nothing is left at `target`.

    Returns:
        Whether external data was written.
    """
    size = initializer_bytes(model)
    external = size > min(external_threshold_bytes, PROTOBUF_LIMIT_BYTES - 1)
    with staged_files(target) as path:
        if external:
            ir.save(model, path, external_data=external_data_name(target), size_threshold_bytes=_INLINE_TENSOR_BYTES)
        else:
            ir.save(model, path)
        if verify is not None:
            verify(path)
    logger.debug("saved %s (%d weight bytes, external data: %s)", target.name, size, external)
    return external


def check_model(path: Path) -> None:
    """Run the ONNX checker with shape inference on a saved file (works past 2 GiB).

    Raises:
        onnx.checker.ValidationError: The model is invalid.
        onnx.shape_inference.InferenceError: Shape inference found an inconsistency.
    """
    onnx.checker.check_model(str(path), full_check=True)


def load_graph_only(path: Path) -> onnx.ModelProto:
    """Load a model's structure without reading external weight files."""
    return onnx.load(str(path), load_external_data=False)


def external_data_files(path: Path) -> list[str]:
    """Names of the external data files a saved model refers to, relative to its folder."""
    graph = load_graph_only(path).graph
    locations = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(locations)


def model_artifact(
    stage: str, path: Path, parent: Artifact | None, record: ModelRecord, targets: tuple[str, ...] = ()
) -> Artifact:
    """Describe a saved model: its hash, its external data files' hashes, its parent, the stage's
    record, and the targets whose chain it belongs to (empty: every target)."""
    return Artifact(
        stage=stage,
        path=path.name,
        sha256=sha256_file(path),
        parent_sha256=parent.sha256 if parent else None,
        external_data={name: sha256_file(path.parent / name) for name in external_data_files(path)},
        targets=list(targets),
        record=record,
    )


def release_weights(model: ir.Model, names: Iterable[str] | None = None) -> None:
    """Close the memory maps of a model's external weights (all, or the initializers `names`).

    The pages of a memory-mapped weight stay in this process's resident memory for as long as
    the map is open, whoever still holds the tensor (onnxscript's optimizer keeps some); a closed
    tensor maps its file again if it is read later. A map a NumPy view still points into stays
    open.
    """
    initializers = model.graph.initializers
    for name in initializers if names is None else names:
        value = initializers.get(name)
        tensor = value.const_value if value is not None else None
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:  # a view of the map is alive: it must stay open
                logger.debug("%s: its memory map is still in use", name)


def discard_weights(model: ir.Model) -> None:
    """Drop a model's weights once it is saved and done with: its memory maps closed and every
    initializer's tensor let go, so that nothing that still holds the graph keeps them resident
    (onnxscript's rewrite rules keep the last graph they matched, and the optimizer's folded
    weights are views into the source's maps)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        value.const_value = None
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:  # a view of the map is alive elsewhere: it closes with the view
                logger.debug("%s: its memory map is still in use", value.name)


def model_bytes(path: Path) -> int:
    """Bytes of a saved model: its graph file and every external data file it names."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external_data_files(path))
