"""Model intake: the one check every ONNX model a job brings in goes through before any stage uses it.

Run on every ONNX source in preflight (`pipeline.model_source.load_model`) and on every exported
model before it is moved into place (the export stage). In order:

1. protobuf parse (the graph, not the weights);
2. every tensor's element type, dims (each below 2^31) and inline bytes against its dims;
3. external data strictly inside the model's folder (`pipeline.external_data`: no ``..``, no
   absolute path, no symbolic link, offsets and lengths within the file, each file opened once);
4. the ONNX checker with full shape inference, by path (works past 2 GiB);
5. the graph's inputs against the job's ``[[inputs]]`` (names, element types, ranks, named dims
   dynamic);
6. the memory the constant-producing nodes would take, against a limit.

Any failure is a `JobError` (exit 2) naming the user's file (never a staging copy), the tensor or
node, what is wrong and what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import onnx
import onnx_ir as ir

from pipeline.errors import JobError
from pipeline.external_data import DataFile, inline_external_data, open_external_data
from pipeline.job import ConversionJob
from pipeline.model_checks import (
    ModelProblem,
    all_tensors,
    check_inputs,
    check_opsets,
    check_tensor,
    check_text,
    check_value_dims,
    constant_estimates,
    inference_view,
)

logger = logging.getLogger(__name__)

# What the constant-producing nodes of a model (ConstantOfShape, Expand, Tile, Range, ...) may
# take together, counting only outputs whose size the graph fixes by itself.
CONSTANT_MEMORY_LIMIT_BYTES: Final = 4 * 2**30
_ONNX_SOURCE_HINT = "re-export the model with that axis dynamic, or give the job the fixed size instead of a name"
_EXPORT_HINT = (
    "the model specialises on that size (e.g. a constant-shaped tensor combined with the input), so it "
    "cannot run at other sizes; remove the specialisation or give the job the fixed size"
)
_MESSAGE_CHARS = 600


@dataclass(frozen=True)
class ModelSubject:
    """The model file checked, and how errors name it.

    Attributes:
        path: The file read (the user's file, or a staged copy the export stage wrote).
        shown: How errors name the model: the user's file, or the source it was exported from.
        key: The job key errors about the model itself point at (``model.onnx``, ``model.factory``).
        hint: What to do when the model fixes a dim the job names.
    """

    path: Path
    shown: str
    key: str
    hint: str = _ONNX_SOURCE_HINT

    @classmethod
    def onnx_source(cls, path: Path, read_from: Path | None = None) -> ModelSubject:
        """The job's ONNX file (`read_from`: a copy of it that is read instead, named as `path`)."""
        return cls(path=read_from or path, shown=str(path), key="model.onnx")

    @classmethod
    def exported(cls, path: Path, source: str, key: str) -> ModelSubject:
        """A model the export stage wrote from `source` (the factory, .pt2 file or student)."""
        return cls(path=path, shown=f"the model exported from {source}", key=key, hint=_EXPORT_HINT)


@dataclass(frozen=True)
class IntakeResult:
    """What intake found in a model that passed.

    Attributes:
        inputs: The graph's inputs (initializers excluded), in order.
        outputs: The graph's outputs, in order.
        external_data: The external data files, as checked (hashed for an ONNX source).
        constant_bytes: Memory the constant-producing nodes with a static output size take.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    external_data: tuple[DataFile, ...]
    constant_bytes: int


def check_onnx_source(job: ConversionJob, path: Path) -> IntakeResult:
    """Check the job's ONNX file (preflight); its external data files are hashed as they are read.

    Raises:
        JobError: The model is not usable (see `check_model_file`).
    """
    return check_model_file(job, ModelSubject.onnx_source(path), hash_data=True)


def check_model_file(
    job: ConversionJob,
    subject: ModelSubject,
    memory_limit_bytes: int = CONSTANT_MEMORY_LIMIT_BYTES,
    hash_data: bool = False,
) -> IntakeResult:
    """Run every intake check on a model file.

    Args:
        job: The job (its inputs; its file is named in errors).
        subject: The file and how errors name it.
        memory_limit_bytes: What the constant-producing nodes may take together.
        hash_data: Hash the external data files (`DataFile.sha256`).

    Returns:
        What was found.

    Raises:
        JobError: (exit 2) The file does not parse, a tensor is damaged, external data leaves the
            model's folder or its bounds, the checker refuses the model, the inputs do not match
            the job's, or the constants would take more than the limit.
    """
    proto = _parse(job, subject)
    try:
        _check_tensors(proto)
        with open_external_data(proto, subject.path.parent, hash_data) as data:
            view = inference_view(proto, data.read)
            files = data.files
        _run_checker(job, subject)
        check_value_dims(proto)
        check_inputs(proto.graph, job.inputs, subject.hint)
        constant_bytes = _check_constants(view, memory_limit_bytes)
    except ModelProblem as e:
        raise _job_error(job, subject, e) from e
    initializers = {tensor.name for tensor in proto.graph.initializer}
    logger.debug("intake passed %s (%d external data files)", subject.shown, len(files))
    return IntakeResult(
        inputs=tuple(value.name for value in proto.graph.input if value.name not in initializers),
        outputs=tuple(value.name for value in proto.graph.output),
        external_data=files,
        constant_bytes=constant_bytes,
    )


def adopt_onnx_source(job: ConversionJob, path: Path) -> ir.Model:
    """The job's ONNX file in memory, its external data read from the checked files (never re-resolved
    by path later), ready to be saved under the pipeline's own names.

    Raises:
        JobError: The file does not parse or its external data is not usable.
    """
    subject = ModelSubject.onnx_source(path)
    proto = _parse(job, subject)
    try:
        _check_tensors(proto)
        with open_external_data(proto, path.parent) as data:
            inline_external_data(proto, data)
    except ModelProblem as e:
        raise _job_error(job, subject, e) from e
    try:
        return ir.from_proto(proto)
    except Exception as e:  # onnx-ir raises SerdeError, TypeError, ValueError on what it cannot represent
        raise JobError(
            job.origin,
            subject.key,
            f"{subject.shown} cannot be read into onnx-ir ({type(e).__name__}: {_scrub(str(e), subject)}); "
            "re-export the model",
        ) from e


def _check_tensors(proto: onnx.ModelProto) -> None:
    """Text fields, opset versions, then every tensor's type, dims and inline bytes (before any file
    is opened)."""
    check_text(proto)
    check_opsets(proto)
    for tensor in all_tensors(proto):
        check_tensor(tensor)


def _parse(job: ConversionJob, subject: ModelSubject) -> onnx.ModelProto:
    try:
        return onnx.load(str(subject.path), load_external_data=False)
    except Exception as e:  # protobuf and onnx raise several types
        raise JobError(
            job.origin,
            subject.key,
            f"{subject.shown} is not a readable ONNX model ({type(e).__name__}: {_scrub(str(e), subject)}); "
            "give a file written by onnx.save_model (past 2 GiB the weights must be external data)",
        ) from e


def _run_checker(job: ConversionJob, subject: ModelSubject) -> None:
    try:
        onnx.checker.check_model(str(subject.path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError, and others for damaged files
        raise JobError(
            job.origin,
            subject.key,
            f"{subject.shown} fails the ONNX checker ({type(e).__name__}: {_scrub(str(e), subject)}); "
            "fix or re-export the model (onnx.checker.check_model(path, full_check=True) shows the same)",
        ) from e


def _check_constants(view: onnx.ModelProto, limit: int) -> int:
    """The constant-producing nodes' memory, within the limit.

    Raises:
        ModelProblem: Over the limit (naming the biggest nodes), or shape inference fails.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(view, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # the checker passed, so this is rare; onnx raises several types
        raise ModelProblem("shape inference", f"failed ({type(e).__name__}: {e})") from e
    estimates = sorted(constant_estimates(inferred), key=lambda estimate: -estimate.nbytes)
    total = sum(estimate.nbytes for estimate in estimates)
    if total > limit:
        biggest = estimates[0]
        others = f" ({len(estimates) - 1} more such nodes: {_size(total)} in all)" if len(estimates) > 1 else ""
        raise ModelProblem(
            f"node {biggest.node!r} ({biggest.op_type})",
            f"makes a constant tensor of shape {list(biggest.shape)}, {_size(biggest.nbytes)}{others}, over "
            f"the limit of {_size(limit)}; no run can hold that, so the shape that feeds the node is wrong: "
            "fix it in the model",
        )
    return total


def _job_error(job: ConversionJob, subject: ModelSubject, problem: ModelProblem) -> JobError:
    text = _scrub(f"{problem.where} {problem.problem}", subject)
    return JobError(job.origin, problem.key or subject.key, f"{subject.shown}: {text}")


def _scrub(text: str, subject: ModelSubject) -> str:
    """One bounded line, with the folder actually read (maybe a staging copy) named as the model."""
    line = " ".join(text.split())
    if str(subject.path) != subject.shown:
        line = line.replace(str(subject.path), subject.shown).replace(str(subject.path.parent), "<the model's folder>")
    return line if len(line) <= _MESSAGE_CHARS else f"{line[:_MESSAGE_CHARS]}..."


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}" if unit != "bytes" else f"{nbytes} bytes"
        value /= 1024
    raise AssertionError("unreachable")
