"""Shape inference for the quantizer, without writing anything beside the model.

ONNX Runtime's `load_model_with_shape_infer` writes ``<model>-inferred.onnx`` next to the model,
and ONNX's `infer_shapes_path` does not notice when that write is cut short (a full disk): the
truncated file then fails to parse as "Wire format was corrupt". Here a model that fits in one
protobuf is inferred in memory; a bigger one (its weights in external data) by path into a
private temporary folder, and the written file is checked before it is read back.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.quantization.quant_utils import add_infer_metadata

from pipeline.artifacts import storage_errors
from pipeline.errors import StorageError
from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES, model_bytes

logger = logging.getLogger(__name__)

# Models whose files (graph and external data) stay under this are inferred in memory; the
# margin leaves room for the value_info inference adds before the proto is serialised again.
IN_MEMORY_LIMIT_BYTES = PROTOBUF_LIMIT_BYTES - 64 * 2**20


def load_with_shapes(path: Path) -> onnx.ModelProto:
    """The model at `path`, weights loaded, with inferred value_info and ONNX Runtime's
    "shapes inferred" mark (so its quantizer does not save and re-infer a copy of its own).

    Args:
        path: A saved ONNX model (with its external data beside it, if any).

    Raises:
        StorageError: The temporary copy of a big model could not be written completely.
        onnx.shape_inference.InferenceError: Shape inference found the model inconsistent (and
            other errors of ONNX's inference or parser).
    """
    if model_bytes(path) < IN_MEMORY_LIMIT_BYTES:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    else:
        model = _infer_by_path(path)
    add_infer_metadata(model)
    return model


def _infer_by_path(path: Path) -> onnx.ModelProto:
    """Infer by file (past the protobuf limit), into a private temporary folder; weights read from
    the model's own folder afterwards."""
    with storage_errors(Path(tempfile.gettempdir())), tempfile.TemporaryDirectory(prefix="onnxforge-shapes-") as folder:
        inferred = Path(folder) / path.name
        with storage_errors(inferred):
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        _check_written(path, inferred)
        try:
            model = onnx.load(str(inferred), load_external_data=False)
        except DecodeError as e:
            raise _incomplete(inferred, "it does not parse") from e
    logger.debug("inferred the shapes of %s by path (over %d bytes)", path.name, IN_MEMORY_LIMIT_BYTES)
    load_external_data_for_model(model, str(path.parent))
    return model


def _check_written(source: Path, inferred: Path) -> None:
    """Inference only adds to a graph: a written file smaller than its source was cut short."""
    written = inferred.stat().st_size if inferred.is_file() else 0
    expected = source.stat().st_size
    if written < expected:
        raise _incomplete(inferred, f"{written} bytes were written, at least {expected} expected")


def _incomplete(inferred: Path, why: str) -> StorageError:
    return StorageError(
        inferred,
        None,
        f"shape inference's copy of the model is incomplete ({why}): the disk holding it is probably full",
        f"free space in {inferred.parent.parent} (or set TMPDIR to a folder on a disk with room), then run again",
    )
