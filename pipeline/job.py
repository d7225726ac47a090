"""The typed conversion job: one model, its inputs, data, stage options, targets and parity policy."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from pipeline.errors import JobError

# "package.module:attribute", the form Python entry points use.
ImportSpec = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.\-]*$", max_length=128)]
DimName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*$", max_length=64)]
# TOML gives paths as strings: accept those even though every other value is strict.
FilePath = Annotated[Path, Field(strict=False)]
DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the job file's folder (or leave it relative to the cwd)."""
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None or path.is_absolute():
        return path
    return (Path(base_dir) / path).resolve()


class _Spec(BaseModel):
    """Base of every job section: unknown keys are errors, no type coercion ("yes" is no bool),
    values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _existing_file(value: Path | None, info: ValidationInfo, expected: str) -> Path | None:
    """Resolve a file path against the job file's folder and check the file is there."""
    if value is None:
        return None
    path = _resolve(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path} (expected {expected})")
    return path


class ModelSource(_Spec):
    """Where the trained model comes from: exactly one of `factory`, `exported_program`, `onnx`.

    Attributes:
        factory: "package.module:function" returning a ``torch.nn.Module``.
        weights: A state dict applied to the factory's model (strict): a .safetensors file, or a
            PyTorch checkpoint loaded with ``torch.load(weights_only=True)`` (never unsafely).
        exported_program: A ``torch.export`` ExportedProgram file (.pt2), exported as it is.
        onnx: An existing ONNX file: export is skipped and the chain starts from it.
        kwargs: Keyword arguments passed to the factory.
        output_names: Names given to the model's outputs in the ONNX graph, in order (default:
            derived from the output structure, see `pipeline.outputs.output_names`).
        task: What the outputs are: "classification" turns on top-1 agreement and accuracy
            (also implied by labels in the data); "embedding" and "other" are judged by
            cosine / SNR / element-wise error only.
    """

    factory: ImportSpec | None = None
    weights: FilePath | None = None
    exported_program: FilePath | None = None
    onnx: FilePath | None = None
    kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    output_names: list[Identifier] | None = None
    task: Literal["classification", "embedding", "other"] = "other"

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info, "a .safetensors state dict or a PyTorch checkpoint")

    @field_validator("exported_program")
    @classmethod
    def _program_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info, "a torch.export .pt2 file")

    @field_validator("onnx")
    @classmethod
    def _onnx_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info, "an .onnx model file")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        given = [name for name in ("factory", "exported_program", "onnx") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'factory' ('package.module:function'), 'exported_program' (.pt2) "
                f"or 'onnx' (.onnx file); got {given or 'none'}"
            )
        if self.weights is not None and self.factory is None:
            raise ValueError(f"'weights' applies to the model a 'factory' builds, not to {given[0]!r}")
        if self.kwargs and self.factory is None:
            raise ValueError("'kwargs' are passed to a 'factory'; this source has none")
        return self


class InputSpec(_Spec):
    """One model input, in the order of the model's ``forward`` arguments.

    Attributes:
        name: Input name in the ONNX graph and key in the data feeds.
        shape: One entry per axis: an int for a fixed size, a name for a dynamic one
            (the same name on several inputs means the same size).
        dtype: Element type.
    """

    name: Identifier
    shape: list[Annotated[int, Field(ge=1)] | DimName]
    dtype: DType = "float32"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index to dimension name, for every named (dynamic) axis."""
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}


class DataSource(_Spec):
    """Sample data: an .npz of arrays, or a factory yielding feed dicts.

    An .npz holds one array per input name (first axis = samples), batched by `batch_size`.
    A factory is "package.module:function" returning an iterable of ``{input name: array}``
    batches. In both, the key named by `labels` (if any) holds integer class labels.

    Attributes:
        npz: Path of an .npz file.
        factory: "package.module:function" yielding feed dicts.
        labels: Key of the class labels, used for task accuracy.
        batch_size: Samples per batch when reading an .npz.
        max_batches: Stop after this many batches (all when unset).
    """

    npz: FilePath | None = None
    factory: ImportSpec | None = None
    labels: Identifier | None = None
    batch_size: int = Field(default=32, ge=1)
    max_batches: int | None = Field(default=None, ge=1)

    @field_validator("npz")
    @classmethod
    def _npz_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info, "an .npz of input arrays")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSource:
        if (self.npz is None) == (self.factory is None):
            raise ValueError("give exactly one of 'npz' (a file) or 'factory' ('package.module:function')")
        return self


class ExportOptions(_Spec):
    """Options of the export stage.

    Attributes:
        exporter: "dynamo" (torch.export based), "torchscript", or "auto": dynamo first,
            TorchScript as a recorded fallback.
        opset: ONNX opset of the exported graph.
        ir_version: ONNX IR version written into the file (the exporter's when unset), for
            runtimes that read only older files.
        external_data_threshold_mb: Weights above this size are saved beside the model as
            ``<model>.onnx.data`` (always above the 2 GiB protobuf limit).
        check_shapes: Extra shapes export parity is checked at, each a table of dynamic dim
            sizes (e.g. ``{batch = 1, sequence = 8}``); inputs for them are cut or tiled from
            the first evaluation batch.
    """

    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    opset: int = Field(default=18, ge=13, le=23)
    ir_version: int | None = Field(default=None, ge=7, le=12)
    external_data_threshold_mb: float = Field(default=1024.0, gt=0, lt=2048)
    check_shapes: list[dict[DimName, Annotated[int, Field(ge=1)]]] = Field(default_factory=list)

    @property
    def external_data_threshold_bytes(self) -> int:
        """The threshold in bytes."""
        return int(self.external_data_threshold_mb * 2**20)


class SimplifyOptions(_Spec):
    """Options of the simplify stage (constant folding, dead-code removal)."""

    enabled: bool = True


class QuantizeOptions(_Spec):
    """Options of the static int8 quantization stage (QDQ format).

    Attributes:
        enabled: Run the stage.
        per_channel: One scale per output channel for weights (unless a target forbids it).
        activation_type: Activation element type (unset: uint8, or int8 when a target needs it).
        weight_type: Weight element type.
        activation_symmetric: Symmetric activation ranges (zero point 0); also forced by targets
            that need it.
        calibration_method: How activation ranges come from the calibration statistics:
            "minmax", "percentile", "entropy" (KL) or "mse" (least expected squared error).
        percentile: The percentile of the "percentile" method.
        op_types: Quantize only these op types (unset: chosen by model family; transformers get
            MatMul / Gemm).
        exclude_nodes: Node names kept in float.
        reduce_range: 7-bit weights (unset: on x86 CPUs without VNNI).
        power_of_two_scales: Every scale a power of two (unset: when a target needs it).
        mixed_precision: Keep the fewest nodes float needed to meet the int8 parity policy.
        max_float_share: At most this share of the quantizable nodes may stay float; past it
            the policy is reported as missed rather than met by a model that is barely int8.
        calibration_cache: Reuse statistics for the same model and data
            ($ONNXFORGE_CACHE_DIR, else ~/.cache/onnxforge).
        fuse_gelu: In the int8 model, fuse each float GELU (and the bias Add before it) into
            ONNX Runtime's Gelu / BiasGelu kernel, when every target runs ONNX Runtime contrib ops.
    """

    enabled: bool = True
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] | None = None
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_symmetric: bool = False
    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = "mse"
    percentile: float = Field(default=99.999, gt=50, lt=100)
    op_types: list[Identifier] | None = None
    exclude_nodes: list[str] = Field(default_factory=list)
    reduce_range: bool | None = None
    power_of_two_scales: bool | None = None
    mixed_precision: bool = True
    max_float_share: float = Field(default=0.5, ge=0, le=1)
    calibration_cache: bool = True
    fuse_gelu: bool = True


Ratio = Annotated[float, Field(ge=0, lt=1)]


class StructuredPruning(_Spec):
    """Structured channel pruning: whole output channels removed, so the graph really shrinks.

    Attributes:
        ratio: Share of channels removed: from every prunable layer (scope "layer"), or from all
            of them together (scope "global"); 0: none but those in `layers`.
        scope: ``layer``: each layer loses `ratio` of its channels; ``global``: channels are
            ranked across layers (scores normalised per layer), so redundant layers lose more.
        layers: Per-layer ratios by layer or node name; glob patterns (``features.*``) allowed.
            The first matching pattern wins over `ratio`.
        skip: Layers (names or glob patterns) left whole.
        criterion: How channels are ranked: ``l1`` / ``l2`` weight norm, or ``activation``
            (mean |activation| on the calibration data times the next layer's weights on it).
        round_to: Channel counts kept are a multiple of this (hardware vector width).
        recovery: Re-fit the layers after the removed channels by least squares on the
            calibration data so their outputs match the unpruned model's.
        mask_input: The model input holding a [batch, sequence] token mask (1: real token);
            padding positions are left out of the activation scores and the re-fit. Ignored
            when the model has no such input; "" turns it off.
    """

    ratio: Ratio = 0.0
    scope: Literal["layer", "global"] = "layer"
    layers: dict[str, Ratio] = Field(default_factory=dict)
    skip: list[str] = Field(default_factory=list)
    criterion: Literal["l1", "l2", "activation"] = "activation"
    round_to: int = Field(default=1, ge=1, le=1024)
    recovery: bool = True
    mask_input: str = "attention_mask"


class SparsityOptions(_Spec):
    """Weight sparsity by magnitude: zeros stored densely (smaller compressed, not faster on CPU).

    Attributes:
        pattern: ``unstructured`` (the smallest weights anywhere) or ``n:m`` (in every run of
            `m` weights along the input channels, the `n` largest are kept; 2:4 by default).
        ratio: Share of weights zeroed (unstructured).
        n: Weights kept per run (n:m).
        m: Run length (n:m).
        scope: ``layer`` (each layer loses `ratio`) or ``global`` (one threshold for all layers).
        skip: Layers (names or glob patterns) left dense.
    """

    pattern: Literal["unstructured", "n:m"] = "unstructured"
    ratio: Ratio = 0.5
    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2, le=64)
    scope: Literal["layer", "global"] = "layer"
    skip: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _n_below_m(self) -> SparsityOptions:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got n={self.n}, m={self.m})")
        return self


class PruneOptions(_Spec):
    """Options of the prune stage (after simplify, before quantize); it runs when a part is set.

    Attributes:
        enabled: Run the stage.
        structured: Channel pruning (unset: none).
        sparsity: Weight sparsity, applied after channel pruning (unset: none).
    """

    enabled: bool = True
    structured: StructuredPruning | None = None
    sparsity: SparsityOptions | None = None

    @property
    def active(self) -> bool:
        """Whether the stage has anything to do."""
        return self.enabled and (self.structured is not None or self.sparsity is not None)


class DistillOptions(_Spec):
    """Knowledge distillation, before export: a smaller student learns to imitate the job's model
    (the teacher), and the student is what the rest of the pipeline converts.

    Attributes:
        enabled: Run the stage.
        student: "package.module:function" returning the untrained student ``torch.nn.Module``; it
            takes the teacher's inputs and returns outputs of the teacher's shapes.
        student_kwargs: Keyword arguments passed to the student factory.
        data: Training batches: the model inputs, and class labels under ``labels`` for classifiers.
            An .npz is reshuffled every epoch (seeded); a factory may take an ``epoch`` keyword
            (1-based; checks and hashes read epoch 1) to reshuffle its own batches.
        validation: Held-out batches for the per-epoch metric, the best-epoch choice and early
            stopping (unset: the job's evaluation data, which the report then also measures on).
        loss: ``kd`` (temperature-scaled KL to the teacher's softened outputs, mixed with
            cross-entropy on labels), ``mse`` or ``cosine`` distance to the teacher's outputs, or
            ``auto``: kd for classifiers, cosine for embeddings, mse otherwise.
        temperature: Softening temperature T of kd; its KL term is scaled by T squared.
        alpha: Weight of the label cross-entropy in kd: ``alpha * CE + (1 - alpha) * T^2 * KL``
            (1: labels alone, no teacher; ignored when the data has no labels).
        epochs: Most passes over the training data.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (with Nesterov momentum).
        learning_rate: Peak learning rate.
        schedule: ``cosine`` decay to zero over `epochs`, or ``constant``.
        weight_decay: Weight decay of the optimizer.
        momentum: Momentum of ``sgd``.
        seed: Seeds the student's initialisation, the data order and dropout: the same seed and
            data give the same student.
        patience: Stop after this many epochs without a better held-out metric (0: never).
        checkpoint_dir: Where a safetensors checkpoint is written after every epoch, and resumed
            from after an interruption (unset: ``<output_dir>.checkpoints`` beside the output).
        resume: Continue from the last checkpoint of the same teacher, student, data and settings.
    """

    enabled: bool = True
    student: ImportSpec
    student_kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    data: DataSource
    validation: DataSource | None = None
    loss: Literal["auto", "kd", "mse", "cosine"] = "auto"
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.5, ge=0, le=1)
    epochs: int = Field(default=30, ge=1, le=100_000)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(default=2e-3, gt=0, lt=10)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(default=1e-4, ge=0, lt=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, lt=2**63)
    patience: int = Field(default=8, ge=0)
    checkpoint_dir: FilePath | None = None
    resume: bool = True

    @field_validator("checkpoint_dir")
    @classmethod
    def _resolve_checkpoint_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    def training_settings(self) -> dict[str, Any]:
        """The settings a trained student depends on (where checkpoints live and resuming do not)."""
        return self.model_dump(mode="json", exclude={"enabled", "checkpoint_dir", "resume", "data", "validation"})


class TargetSpec(_Spec):
    """A backend to validate the converted models on.

    Attributes:
        backend: A registered backend name (see ``onnxforge backends``).
        options: Backend options, validated by that backend's own options model.
        max_fallback: Fail the job when a larger share of the final model's compute nodes runs
            somewhere other than the backend's preferred device (unset: report only).
    """

    backend: Identifier
    options: dict[str, str | int | float | bool | list[str]] = Field(default_factory=dict)
    max_fallback: float | None = Field(default=None, ge=0.0, le=1.0)


class Fp32Policy(_Spec):
    """Element-wise gate for float stages (export, simplify): ``|c - r| <= atol + rtol * |r|``."""

    atol: float = Field(default=1e-4, ge=0)
    rtol: float = Field(default=1e-3, ge=0)


class TaskPolicy(_Spec):
    """Task-level gate for a model that is not expected to match element-wise; unset checks are
    not applied.

    Attributes:
        min_cosine: Lowest cosine similarity per output (flattened per sample, averaged).
        min_snr_db: Lowest signal-to-noise ratio in dB.
        min_top1_agreement: Lowest share of samples whose argmax matches the reference.
        max_accuracy_drop: Largest top-1 accuracy drop in points vs the model before the stage
            (needs labels).
    """

    min_cosine: float | None = Field(default=0.99, ge=-1, le=1)
    min_snr_db: float | None = None
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0)


class Int8Policy(TaskPolicy):
    """The int8 model's gate (cosine >= 0.99 unless set)."""


class PrunePolicy(TaskPolicy):
    """The pruned model's gate: judged on the task, since pruning changes outputs by design.

    By default a classifier may lose at most 1 point of top-1 accuracy, and every output keeps a
    mean cosine of at least 0.9 to the unpruned model's (embeddings: set a tighter bound).
    """

    min_cosine: float | None = Field(default=0.9, ge=-1, le=1)
    max_accuracy_drop: float | None = Field(default=1.0, ge=0)


class DistillPolicy(TaskPolicy):
    """The distilled student's gate against the teacher (PyTorch both): judged on the task.

    By default a classifier student may lose at most 1 point of top-1 accuracy; its outputs are
    not held to a cosine, since a student's logits need not be the teacher's (set one for
    embedding students).
    """

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    max_accuracy_drop: float | None = Field(default=1.0, ge=0)


class OutputPolicy(_Spec):
    """Rules for one output that replace the job-wide ones (unset: the job-wide rule).

    Attributes:
        fp32: Export and simplify.
        distill: The distilled student against the teacher.
        prune: The pruned model.
        int8: The quantized model.
    """

    fp32: Fp32Policy | None = None
    distill: DistillPolicy | None = None
    prune: PrunePolicy | None = None
    int8: Int8Policy | None = None


class ParityPolicy(_Spec):
    """Pass/fail rules per precision, and when to localise the error.

    Attributes:
        fp32: Export and simplify.
        distill: The distilled student against the teacher.
        prune: The pruned model.
        int8: The quantized model.
        outputs: Per-output rules by output name, e.g. ``[parity.outputs.logits.int8]``.
        localize: Compare intermediate tensors to find where the error enters: ``on_failure``
            (for each failed comparison between two ONNX models), ``always``, or ``never``.
        localize_batches: Evaluation batches the localisation runs on.
    """

    fp32: Fp32Policy = Field(default_factory=Fp32Policy)
    distill: DistillPolicy = Field(default_factory=DistillPolicy)
    prune: PrunePolicy = Field(default_factory=PrunePolicy)
    int8: Int8Policy = Field(default_factory=Int8Policy)
    outputs: dict[Identifier, OutputPolicy] = Field(default_factory=dict)
    localize: Literal["on_failure", "always", "never"] = "on_failure"
    localize_batches: int = Field(default=1, ge=1)


class ConversionJob(_Spec):
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
        return _resolve(value, info)

    @field_validator("python_path")
    @classmethod
    def _python_path_exists(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        resolved = [_resolve(path, info) for path in value]
        for path in resolved:
            if not path.is_dir():
                raise ValueError(f"folder not found: {path}")
        return resolved

    @field_validator("inputs")
    @classmethod
    def _unique_input_names(cls, value: list[InputSpec]) -> list[InputSpec]:
        names = [spec.name for spec in value]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
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


def load_job(path: str | Path, **overrides: Any) -> ConversionJob:
    """Load and validate a job file (TOML).

    Args:
        path: The job file.
        **overrides: Top-level keys replacing the file's values (e.g. ``output_dir``, paths
            relative to the current directory); a table (dict) updates the file's table key by key.

    Returns:
        The validated job, with every relative path resolved against the file's folder.

    Raises:
        JobError: The file is missing, not TOML, or does not validate; the message names the
            file, the key and what was expected.
    """
    job_file = Path(path).resolve()
    try:
        raw = tomllib.loads(job_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(job_file, "<file>", "job file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(job_file, "<file>", f"cannot read the job file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise JobError(job_file, "<file>", f"not valid TOML: {e}") from e
    _merge(raw, {key: value for key, value in overrides.items() if value is not None})
    return validate_job(raw, origin=job_file, base_dir=job_file.parent)


def _merge(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply overrides in place; a table given for a table updates it key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value


def validate_job(raw: dict[str, Any], origin: str | Path, base_dir: Path | None = None) -> ConversionJob:
    """Validate a job given as plain data (a parsed TOML table).

    Args:
        raw: The job's keys and values.
        origin: What to name in error messages (the job file).
        base_dir: Folder that relative paths are resolved against (None: the current directory).

    Returns:
        The validated job.

    Raises:
        JobError: The first problem found, naming the key and what was expected.
    """
    try:
        job = ConversionJob.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        errors = e.errors(include_url=False)
        key, problem = describe_validation_error(errors[0], raw)
        # A value failing a union (int or dim name) yields one error per branch: count keys, not errors.
        others = {describe_validation_error(error, raw)[0] for error in errors[1:]} - {key}
        more = f" (and problems at {', '.join(sorted(others))})" if others else ""
        raise JobError(origin, key, problem + more) from e
    if isinstance(origin, Path):
        job = job.model_copy(update={"source_file": origin})
    return job


def describe_validation_error(error: ErrorDetails, raw: Any) -> tuple[str, str]:
    """Turn one pydantic error into (dotted key, what was expected) in the job file's terms.

    Args:
        error: One error from a `ValidationError`.
        raw: The data that was validated, to tell real keys from pydantic's internal labels.
    """
    kind = error["type"]
    loc = error["loc"]
    key = _dotted_key(loc, raw) or "<job>"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return key, f"unknown key; expected one of: {', '.join(sorted(allowed))}"
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return key, message
    return key, f"{message} (got {error['input']!r})"


def _dotted_key(loc: tuple[int | str, ...], raw: Any) -> str:
    """Follow `loc` through the raw data: a name inside a table is a key (given or defaulted), while
    pydantic's union labels ("str", "int", ...) appear where the data is a value, not a table."""
    parts: list[str] = []
    current = raw
    for item in loc:
        if isinstance(current, dict) and isinstance(item, str):
            parts.append(item)
            current = current.get(item)
        elif isinstance(current, list) and isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            current = current[item] if 0 <= item < len(current) else None
        else:
            break
    return ".".join(parts)


def _allowed_keys(parent_loc: tuple[int | str, ...]) -> list[str]:
    """The keys a section accepts, found by walking the models along `parent_loc`."""
    model: type[BaseModel] = ConversionJob
    for item in parent_loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        annotation = field.annotation if field else None
        nested = _model_in(annotation)
        if nested is None:
            return []
        model = nested
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
