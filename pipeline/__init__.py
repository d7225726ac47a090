"""onnxforge's public Python API: convert trained PyTorch models to validated int8 ONNX."""

from pipeline.api import convert, convert_many
from pipeline.batch.executor import Executor, JobOutcome, LocalExecutor
from pipeline.errors import (
    BackendError,
    ExitCode,
    JobError,
    OnnxforgeError,
    ParityError,
    StageError,
)
from pipeline.job import (
    ConversionJob,
    DataSource,
    ExportOptions,
    Fp32Policy,
    InputSpec,
    Int8Policy,
    ModelSource,
    ParityPolicy,
    PruneOptions,
    PrunePolicy,
    QuantizeOptions,
    SimplifyOptions,
    SparsityOptions,
    StructuredPruning,
    TargetSpec,
    load_job,
    validate_job,
)
from pipeline.parity.report import ParityReport
from pipeline.result import ConversionResult
from pipeline.runner import StageEvent

__all__ = [
    "BackendError",
    "ConversionJob",
    "ConversionResult",
    "DataSource",
    "ExitCode",
    "Executor",
    "ExportOptions",
    "Fp32Policy",
    "InputSpec",
    "JobOutcome",
    "Int8Policy",
    "JobError",
    "LocalExecutor",
    "ModelSource",
    "OnnxforgeError",
    "ParityError",
    "ParityPolicy",
    "ParityReport",
    "PruneOptions",
    "PrunePolicy",
    "QuantizeOptions",
    "SimplifyOptions",
    "SparsityOptions",
    "StructuredPruning",
    "StageError",
    "StageEvent",
    "TargetSpec",
    "convert",
    "convert_many",
    "load_job",
    "validate_job",
]
