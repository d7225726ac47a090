"""Stage options (distill, export, simplify, prune, quantize) and the targets a job validates on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.job.base import DimName, FilePath, Identifier, ImportSpec, Section, resolve_path
from pipeline.job.data import DataSource
from pipeline.job.defaults import (
    DECODER_OPSET,
    DEFAULT_MIN_ACCELERATOR_SHARE,
    DEFAULT_SEARCH_BUDGET_S,
    GRAPH_OPSET,
)


class ExportOptions(Section):
    """Options of the export stage.

    Attributes:
        exporter: "dynamo" (torch.export based), "torchscript", or "auto": dynamo first,
            TorchScript as a recorded fallback.
        opset: ONNX opset of the exported graph (unset: 18, and 23 for a causal LM, whose attention
            and RMS norms then export as single ops).
        ir_version: ONNX IR version written into the file (the exporter's when unset), for
            runtimes that read only older files.
        external_data_threshold_mb: Weights above this size are saved beside the model as
            ``<model>.onnx.data`` (always above the 2 GiB protobuf limit).
        check_shapes: Extra shapes export parity is checked at, each a table of dynamic dim
            sizes (e.g. ``{batch = 1, sequence = 8}``); inputs for them are cut or tiled from
            the first evaluation batch.
    """

    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    opset: int | None = Field(default=None, ge=13, le=23)
    ir_version: int | None = Field(default=None, ge=7, le=12)
    external_data_threshold_mb: float = Field(default=1024.0, gt=0, lt=2048)
    check_shapes: list[dict[DimName, Annotated[int, Field(ge=1)]]] = Field(default_factory=list)

    @property
    def external_data_threshold_bytes(self) -> int:
        """The threshold in bytes."""
        return int(self.external_data_threshold_mb * 2**20)

    def opset_for(self, decoder: bool) -> int:
        """The opset to export at: the job's, else the default for a graph or a KV-cache decoder."""
        if self.opset is not None:
            return self.opset
        return DECODER_OPSET if decoder else GRAPH_OPSET


class SimplifyOptions(Section):
    """Options of the simplify stage (constant folding, dead-code removal)."""

    enabled: bool = True


class WeightOnlyOptions(Section):
    """Weight-only quantization of a language model's MatMul weights (activations stay float).

    Attributes:
        bits: 4 or 8.
        block_size: Input channels sharing one scale (16, 32, 64, 128 or 256).
        symmetric: No zero points (else one per block).
        method: ``rtn`` (round to nearest), ``gptq`` (fits each layer to the calibration text's
            activations) or ``hqq`` (half-quadratic, no data).
        embeddings: Also quantize the embedding table (GatherBlockQuantized).
        lm_head: Also quantize the LM head (the MatMul producing the logits).
        format: ``matmulnbits`` (ONNX Runtime's MatMulNBits) or ``qdq`` (blocked DequantizeLinear,
            for runtimes without the contrib op).
        accuracy_level: MatMulNBits' compute type: 0 float, 4 int8 activations (about 2x the
            decode speed of 0 on CPU, logit cosine 0.0002 lower; unset: 4 when every target is
            the cpu, else 0).
        fallback_bits: What mixed precision moves the most damaging MatMuls to when the int8
            policy (``parity.int8``, on the logits) is missed: 8, or 0 for float.
        max_kl: Mixed precision's second aim: the mean KL divergence (nats) of the next-token
            distributions from the float model's on held-out calibration batches. Greedy
            generation flips on small logit changes that cosine does not see (tinylm in int4:
            logit cosine 0.9999, KL 4e-4, 83% of greedy tokens agree; int8: KL 5e-6, 98%).
    """

    bits: Literal[4, 8] = 4
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = False
    method: Literal["rtn", "gptq", "hqq"] = "rtn"
    embeddings: bool = False
    lm_head: bool = False
    format: Literal["matmulnbits", "qdq"] = "matmulnbits"
    accuracy_level: int | None = Field(default=None, ge=0, le=4)
    fallback_bits: Literal[0, 8] = 8
    max_kl: float | None = Field(default=None, gt=0)


class QuantizeOptions(Section):
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
        search_budget_s: Seconds the per-target search may spend on the candidate recipes after
            the first (static int8, always built) for one group of targets: building, judging
            and timing them.
        recipes: The candidate recipes the search may try besides ``static`` (always first):
            ``float_to_dynamic`` (the MatMuls static int8 kept float, quantized dynamically),
            ``dynamic`` (every weight MatMul / Gemm dynamic), ``static_int8_activations``;
            unset: every recipe the target's kernels run.
        require_speedup: Fail the job when a target's shipped int8 model is not faster than
            its float model (by the speed guard's interval); unset: the report says so.
        weight_only: Quantize the weights only (a language model: ``model.task = "causal-lm"``),
            block-wise to 4 or 8 bits, instead of static int8.
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
    search_budget_s: float = Field(default=DEFAULT_SEARCH_BUDGET_S, gt=0)
    recipes: list[Literal["static", "float_to_dynamic", "dynamic", "static_int8_activations"]] | None = None
    require_speedup: bool = False
    weight_only: WeightOnlyOptions | None = None


Ratio = Annotated[float, Field(ge=0, lt=1)]


class StructuredPruning(Section):
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


class SparsityOptions(Section):
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


class PruneOptions(Section):
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


class DistillOptions(Section):
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
        return None if value is None else resolve_path(value, info)

    def training_settings(self) -> dict[str, Any]:
        """The settings a trained student depends on (where checkpoints live and resuming do not)."""
        return self.model_dump(mode="json", exclude={"enabled", "checkpoint_dir", "resume", "data", "validation"})


ShippedPrecision = Literal["int8", "fp32"]
# What a target ships unless its job says otherwise: the quantized model.
DEFAULT_PRECISIONS: tuple[ShippedPrecision, ...] = ("int8",)


class TargetSpec(Section):
    """A backend to validate the converted models on.

    Attributes:
        backend: A registered backend name (see ``onnxforge backends``).
        options: Backend options, validated by that backend's own options model.
        max_fallback: Fail the job when a larger share of the final model's compute nodes runs
            somewhere other than the backend's preferred device (unset: report only).
        precisions: The precisions the quantize search may ship for this target: ``int8``, and
            ``fp32`` to let the float model ship when no int8 candidate is faster on the target.
        min_accelerator_share: Below this share of the shipped model's work on the target's
            accelerator (MACs when the backend estimates them, else compute nodes), the verdict
            and the report say so beside the result.
        require_accelerator_share: Fail the job, not only warn, below `min_accelerator_share`.
    """

    backend: Identifier
    options: dict[str, str | int | float | bool | list[str]] = Field(default_factory=dict)
    max_fallback: float | None = Field(default=None, ge=0.0, le=1.0)
    precisions: list[ShippedPrecision] = Field(default_factory=lambda: list(DEFAULT_PRECISIONS), min_length=1)
    min_accelerator_share: float = Field(default=DEFAULT_MIN_ACCELERATOR_SHARE, ge=0.0, le=1.0)
    require_accelerator_share: bool = False

    @field_validator("precisions")
    @classmethod
    def _unique_precisions(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each precision may be listed once, got {value}")
        return value
