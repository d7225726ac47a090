"""onnxforge's public Python API: convert trained PyTorch models to validated int8 ONNX.

Names are imported on first use, so ``import pipeline.parity.localize`` (or the CLI's report
command) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module defining it.
_EXPORTS = {
    "convert": "pipeline.api",
    "convert_batch": "pipeline.api",
    "convert_many": "pipeline.api",
    "BatchResult": "pipeline.batch.base",
    "BatchSettings": "pipeline.batch.base",
    "Executor": "pipeline.batch.base",
    "JobOutcome": "pipeline.batch.base",
    "LocalExecutor": "pipeline.batch.local",
    "BatchManifest": "pipeline.batch.manifest",
    "load_manifest": "pipeline.batch.manifest",
    "BackendError": "pipeline.errors",
    "ExitCode": "pipeline.errors",
    "JobError": "pipeline.errors",
    "OnnxforgeError": "pipeline.errors",
    "ParityError": "pipeline.errors",
    "StageError": "pipeline.errors",
    "StorageError": "pipeline.errors",
    "ConversionJob": "pipeline.job",
    "DataSource": "pipeline.job",
    "DistillOptions": "pipeline.job",
    "DistillPolicy": "pipeline.job",
    "ExportOptions": "pipeline.job",
    "Fp32Policy": "pipeline.job",
    "InputSpec": "pipeline.job",
    "Int8Policy": "pipeline.job",
    "ModelSource": "pipeline.job",
    "OutputPolicy": "pipeline.job",
    "ParityPolicy": "pipeline.job",
    "PruneOptions": "pipeline.job",
    "PrunePolicy": "pipeline.job",
    "QuantizeOptions": "pipeline.job",
    "SimplifyOptions": "pipeline.job",
    "SparsityOptions": "pipeline.job",
    "StructuredPruning": "pipeline.job",
    "TargetSpec": "pipeline.job",
    "load_job": "pipeline.job",
    "validate_job": "pipeline.job",
    "DistillationSummary": "pipeline.distillation.summary",
    "ParityReport": "pipeline.parity.report",
    "DistillRecord": "pipeline.records",
    "ExportRecord": "pipeline.records",
    "PruneRecord": "pipeline.records",
    "QuantizeRecord": "pipeline.records",
    "SimplifyRecord": "pipeline.records",
    "StageName": "pipeline.records",
    "ValidateRecord": "pipeline.records",
    "ConversionResult": "pipeline.result",
    "StageEvent": "pipeline.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from pipeline.api import convert, convert_batch, convert_many  # noqa: F401
    from pipeline.batch.base import BatchResult, BatchSettings, Executor, JobOutcome  # noqa: F401
    from pipeline.batch.local import LocalExecutor  # noqa: F401
    from pipeline.batch.manifest import BatchManifest, load_manifest  # noqa: F401
    from pipeline.distillation.summary import DistillationSummary  # noqa: F401
    from pipeline.errors import (  # noqa: F401
        BackendError,
        ExitCode,
        JobError,
        OnnxforgeError,
        ParityError,
        StageError,
        StorageError,
    )
    from pipeline.job import (  # noqa: F401
        ConversionJob,
        DataSource,
        DistillOptions,
        DistillPolicy,
        ExportOptions,
        Fp32Policy,
        InputSpec,
        Int8Policy,
        ModelSource,
        OutputPolicy,
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
    from pipeline.parity.report import ParityReport  # noqa: F401
    from pipeline.records import (  # noqa: F401
        DistillRecord,
        ExportRecord,
        PruneRecord,
        QuantizeRecord,
        SimplifyRecord,
        StageName,
        ValidateRecord,
    )
    from pipeline.result import ConversionResult  # noqa: F401
    from pipeline.runner import StageEvent  # noqa: F401
