"""The conversion job: one model, its inputs and data, the stage options, targets and parity policy."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.errors import JobError
from pipeline.job.base import FilePath, Identifier, Section, is_kind, resolve_path
from pipeline.job.data import DataSource
from pipeline.job.options import (
    DistillOptions,
    ExportOptions,
    PruneOptions,
    QuantizeOptions,
    SimplifyOptions,
    TargetSpec,
)
from pipeline.job.policies import ParityPolicy
from pipeline.job.sources import InputSpec, ModelSource

# A file name's limit on the usual filesystems, and what the output folder's own name may use of it:
# its staging sibling is ".<name>.staging-<host>-<pid>-<8 chars>" (pipeline.publish).
NAME_MAX_BYTES = 255
OUTPUT_NAME_MAX_BYTES = 128


class ConversionJob(Section):
    """One conversion: a model, its inputs and data, the stage options, targets and policy.

    Relative paths in a job file are relative to that file; in a job built in Python, to the
    current directory.

    Attributes:
        name: Job name, used in messages and reports.
        model: The model source.
        inputs: The model inputs, in ``forward`` order.
        calibration: Data the quantizer calibrates activation ranges on.
        evaluation: Data parity is measured on (the calibration data when unset).
        targets: Backends the converted models are validated on.
        parity: Pass/fail policy.
        distill: Distil a smaller student before export (unset: the model is converted as it is).
        export: Export options.
        simplify: Simplify options.
        prune: Prune options (channel pruning, sparsity).
        quantize: Quantize options.
        output_dir: Folder the artifacts and reports are written to.
        python_path: Folders searched first when importing the model and data factories.
        source_file: The job file this job was loaded from, if any.
    """

    name: Identifier
    model: ModelSource
    inputs: list[InputSpec] = Field(min_length=1)
    calibration: DataSource | None = None
    evaluation: DataSource | None = None
    targets: list[TargetSpec] = Field(default_factory=lambda: [TargetSpec(backend="cpu")], min_length=1)
    parity: ParityPolicy = Field(default_factory=ParityPolicy)
    distill: DistillOptions | None = None
    export: ExportOptions = Field(default_factory=ExportOptions)
    simplify: SimplifyOptions = Field(default_factory=SimplifyOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)
    quantize: QuantizeOptions = Field(default_factory=QuantizeOptions, validate_default=True)
    output_dir: FilePath
    python_path: list[FilePath] = Field(default_factory=list)
    source_file: FilePath | None = Field(default=None, exclude=True)

    @field_validator("output_dir")
    @classmethod
    def _resolve_output_dir(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        too_long = [part for part in path.parts if len(part.encode()) > NAME_MAX_BYTES]
        if too_long:
            raise ValueError(f"a folder name is longer than the filesystem allows ({NAME_MAX_BYTES} bytes)")
        if len(path.name.encode()) > OUTPUT_NAME_MAX_BYTES:
            raise ValueError(
                f"the folder name is {len(path.name.encode())} bytes; onnxforge writes hidden folders named after "
                f"it beside it (staging, lock), so keep it to {OUTPUT_NAME_MAX_BYTES} bytes"
            )
        return path

    @field_validator("python_path")
    @classmethod
    def _python_path_exists(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        resolved = [resolve_path(path, info) for path in value]
        for path in resolved:
            if not is_kind(path, "folder"):
                raise ValueError(f"folder not found: {path}")
        return resolved

    @field_validator("inputs")
    @classmethod
    def _unique_input_names(cls, value: list[InputSpec]) -> list[InputSpec]:
        _require_unique([spec.name for spec in value], "input names must be unique")
        return value

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, value: list[TargetSpec]) -> list[TargetSpec]:
        # Targets name their models and report rows by backend (``model.int8.fpga.onnx``).
        _require_unique([spec.backend for spec in value], "each backend may be a target once")
        return value

    @field_validator("export")
    @classmethod
    def _shape_dims_are_inputs_dims(cls, value: ExportOptions, info: ValidationInfo) -> ExportOptions:
        known = {dim for spec in info.data.get("inputs", []) for dim in spec.dynamic_axes.values()}
        for index, shape in enumerate(value.check_shapes):
            unknown = sorted(set(shape) - known)
            if unknown and "inputs" in info.data:
                raise ValueError(
                    f"check_shapes[{index}] names {unknown}, which no input's shape uses; dynamic dims: {sorted(known)}"
                )
        return value

    @field_validator("quantize")
    @classmethod
    def _calibration_for_quantize(cls, value: QuantizeOptions, info: ValidationInfo) -> QuantizeOptions:
        # `calibration` is declared before `quantize`, so it is already in info.data when valid.
        if value.enabled and info.data.get("calibration") is None and "calibration" in info.data:
            raise ValueError("enabled, but the job has no [calibration] data source; add one or set enabled = false")
        return value

    @field_validator("prune")
    @classmethod
    def _calibration_for_prune(cls, value: PruneOptions, info: ValidationInfo) -> PruneOptions:
        structured = value.structured
        needs_data = structured is not None and (structured.recovery or structured.criterion == "activation")
        if value.enabled and needs_data and info.data.get("calibration") is None and "calibration" in info.data:
            raise ValueError(
                "structured pruning with recovery or the activation criterion needs [calibration] data; "
                'add one, or set structured.recovery = false and structured.criterion = "l1"'
            )
        return value

    @field_validator("distill")
    @classmethod
    def _teacher_is_pytorch(cls, value: DistillOptions | None, info: ValidationInfo) -> DistillOptions | None:
        model = info.data.get("model")
        if value is not None and value.enabled and model is not None and model.onnx is not None:
            raise ValueError(
                "distillation trains a student against a PyTorch teacher, but model.onnx is an ONNX file; "
                "give the teacher as model.factory or model.exported_program, or remove [distill]"
            )
        return value

    @model_validator(mode="after")
    def _checkpoints_outside_output(self) -> ConversionJob:
        folder = self.distill_checkpoint_dir
        if folder is not None and folder.resolve().is_relative_to(self.output_dir.resolve()):
            raise ValueError(
                f"distill.checkpoint_dir {folder} is inside output_dir {self.output_dir}, which every run "
                "replaces whole; choose a folder outside it"
            )
        return self

    @property
    def distill_checkpoint_dir(self) -> Path | None:
        """Where distillation checkpoints live (None: the job does not distil)."""
        if self.distill is None or not self.distill.enabled:
            return None
        return self.distill.checkpoint_dir or self.output_dir.with_name(f"{self.output_dir.name}.checkpoints")

    @property
    def origin(self) -> str:
        """What to name in error messages: the job file, or the job name for Python-built jobs."""
        return str(self.source_file) if self.source_file else f"job {self.name!r}"

    @property
    def is_classifier(self) -> bool:
        """The model's outputs are class scores: the job says so, or its parity data has labels."""
        return self.model.task == "classification" or self.parity_data.labels is not None

    @property
    def parity_data(self) -> DataSource:
        """The data parity is measured on: evaluation data, else the calibration data."""
        source = self.evaluation or self.calibration
        if source is None:
            raise JobError(self.origin, "evaluation", "no [evaluation] or [calibration] data to measure parity on")
        return source


def _require_unique(names: list[str], problem: str) -> None:
    """Raise `problem` with the names when one repeats (a field validator's error)."""
    if len(set(names)) != len(names):
        raise ValueError(f"{problem}, got {names}")
