"""The typed conversion job: one model, its inputs, data, stage options, targets and parity policy.

The modules each hold one part: `base` (the section base, value types, path resolution),
`defaults`, `sources` (the model and its inputs), `data`, `options` (stage options, targets),
`policies` (parity), `conversion` (the job itself) and `loading` (job files, error messages).
Import from here; the layout inside may change. Two modules are imported by name, not re-exported
(``python -m pipeline.job.schema`` runs one as a script): `schema` (the job file's JSON Schema,
`job_schema`) and `reference` (``docs/job-reference.md``, `render_job_reference`).
"""

from __future__ import annotations

from pipeline.job.base import DimName, DType, FilePath, Identifier, ImportSpec
from pipeline.job.conversion import ConversionJob
from pipeline.job.data import DataSource
from pipeline.job.defaults import DEFAULT_ATOL, DEFAULT_BATCH_SIZE, DEFAULT_MIN_COSINE, DEFAULT_RTOL
from pipeline.job.loading import describe_validation_error, load_job, validate_job
from pipeline.job.options import (
    DistillOptions,
    ExportOptions,
    PruneOptions,
    QuantizeOptions,
    Ratio,
    SimplifyOptions,
    SparsityOptions,
    StructuredPruning,
    TargetSpec,
    WeightOnlyOptions,
)
from pipeline.job.policies import (
    POLICY_SECTIONS,
    DistillPolicy,
    Fp32Policy,
    Int8Policy,
    OutputPolicy,
    ParityPolicy,
    Precision,
    PrunePolicy,
    SectionName,
    TaskPolicy,
)
from pipeline.job.sources import InputSpec, ModelSource

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_RTOL",
    "POLICY_SECTIONS",
    "ConversionJob",
    "DType",
    "DataSource",
    "DimName",
    "DistillOptions",
    "DistillPolicy",
    "ExportOptions",
    "FilePath",
    "Fp32Policy",
    "Identifier",
    "ImportSpec",
    "InputSpec",
    "Int8Policy",
    "ModelSource",
    "OutputPolicy",
    "ParityPolicy",
    "Precision",
    "PruneOptions",
    "PrunePolicy",
    "QuantizeOptions",
    "WeightOnlyOptions",
    "Ratio",
    "SectionName",
    "SimplifyOptions",
    "SparsityOptions",
    "StructuredPruning",
    "TargetSpec",
    "TaskPolicy",
    "describe_validation_error",
    "load_job",
    "validate_job",
]
