"""What each stage records of its run: one typed record per stage, stored in its artifact.

Stages hand these to each other and to the manifest instead of dicts with string keys: the
runner reads the exporter from `ExportRecord`, validate reads `PruneRecord.summary`, and the
manifest serialises each record under its artifact's ``metadata`` key.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.distillation.summary import DistillationSummary
from pipeline.job import Precision
from pipeline.llm.export_records import SizeParity
from pipeline.parity.hls import HlsSummary
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.decision import SearchDecision


class StageName(StrEnum):
    """The pipeline's stages, in run order (a StrEnum: ``StageName.EXPORT == "export"``)."""

    DISTILL = "distill"
    EXPORT = "export"
    SIMPLIFY = "simplify"
    PRUNE = "prune"
    QUANTIZE = "quantize"
    HLS = "hls"
    VALIDATE = "validate"


class StageRecord(BaseModel):
    """Base of every stage's record: immutable; infinities serialise as strings.

    Attributes:
        precision: The policy that judges the stage's output against the model before it in the
            parity chain (None: the output is no link of the chain).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    precision: ClassVar[Precision | None] = None


class ModelRecord(StageRecord):
    """A record whose artifact is an ONNX model (what the transforming stages take)."""


class GraphCounts(StageRecord):
    """Size of a model's main graph."""

    nodes: int
    initializers: int
    parameters: int


class ExportRecord(ModelRecord):
    """How the fp32 model was made.

    Attributes:
        exporter: The exporter that produced it ("dynamo", "torchscript", or that the ONNX file
            was given).
        fallback_reason: Why dynamo failed when TorchScript was used ("" otherwise).
        opset: Default-domain opset of the graph.
        ir_version: ONNX IR version of the file.
        external_data: Weights are stored beside the model.
        nodes: Nodes of the main graph.
        inputs: Graph input names.
        outputs: Graph output names.
        seconds: Time per phase (export, save_and_check, pytorch_check).
        decoder_parity: A causal LM's KV-cache export checked against PyTorch at several
            (batch, sequence, past) sizes, the first step and single-token steps included.
        decoder_kernels: How a causal LM's attention and RMS norms were exported (single
            opset-23 ops, or the model's own code and why).
        decoder_max_positions: A causal LM's ``max_position_embeddings`` (the length of the
            rotary tables the simplify stage makes; None: not known).
    """

    precision: ClassVar[Precision | None] = "fp32"

    exporter: str
    fallback_reason: str = ""
    opset: int
    ir_version: int
    external_data: bool
    nodes: int
    inputs: list[str]
    outputs: list[str]
    seconds: dict[str, float]
    decoder_parity: list[SizeParity] = Field(default_factory=list)
    decoder_kernels: str = ""
    decoder_max_positions: int | None = None


class SimplifyRecord(ModelRecord):
    """What simplification removed: counts before and after, and the removed ops by type.

    Attributes:
        optimizer_error: Why the constant-folding optimizer could not run on the model ("": it
            ran); then only dead nodes and unused initializers were removed.
        constant_nodes_kept: Nodes left whose inputs are all constants, by op type: folding them
            would grow the model past the size rule, or nothing could evaluate them.
        fusions: Decoder layers' patterns folded into single ops, by fusion
            (`pipeline.llm.decoder_fusions`: ``rotary_attention``, ``skip_rms_norm``).
    """

    precision: ClassVar[Precision | None] = "fp32"

    before: GraphCounts
    after: GraphCounts
    removed_ops: dict[str, int]
    optimizer_error: str = ""
    constant_nodes_kept: dict[str, int] = Field(default_factory=dict)
    fusions: dict[str, int] = Field(default_factory=dict)


class PruneRecord(ModelRecord):
    """What pruning removed, per layer."""

    precision: ClassVar[Precision | None] = "pruned"

    summary: PruningSummary


class IrregularTensor(StageRecord):
    """A calibration tensor with values the ranges must not follow (counts per kind)."""

    nonfinite: int
    huge: int


class CalibrationRecord(StageRecord):
    """How the activation ranges were measured.

    Attributes:
        dropped_samples: Calibration samples left out for NaN or infinity in an input
            (``[calibration] nonfinite = "drop"``).
    """

    method: str
    batches: int
    samples: int
    tensors: int
    seconds: float
    cache_hit: bool
    irregular_tensors: dict[str, IrregularTensor] = Field(default_factory=dict)
    dropped_samples: int = 0


class WeightOnlyRecord(ModelRecord):
    """How a language model's weights were quantized (weight-only: activations stay float).

    Attributes:
        format: ``MatMulNBits`` (ONNX Runtime's contrib op) or ``QDQ blocked`` (DequantizeLinear
            with a block size, opset 21).
        weight_bits: 4 or 8.
        block_size: Input channels per scale.
        symmetric: No zero points.
        method: ``rtn``, ``gptq`` or ``hqq``.
        quantized: Each quantized MatMul / Gather and its bits.
        kept_float: Nodes left float, with why (the LM head unless asked, the job's exclusions, the
            mixed-precision search's float fallbacks).
        wider: Nodes the mixed-precision search moved to a wider precision, with why.
        lm_head: The LM head's node (None: not found).
        embeddings_quantized: The embedding tables quantized (Gather nodes).
        policy_met: Whether the logit policy held on held-out calibration batches (None: no search).
        judged: The held-out logit figures of the written model (None: no search).
        bytes_before: Weight bytes of the float model.
        bytes_after: Weight bytes of the quantized model.
        seconds: Time the quantization took.
    """

    precision: ClassVar[Precision | None] = "int8"  # the quantized model's link is judged by parity.int8

    format: Literal["MatMulNBits", "QDQ blocked"]
    weight_bits: int
    block_size: int
    symmetric: bool
    method: str
    quantized: dict[str, int]
    kept_float: dict[str, str] = Field(default_factory=dict)
    wider: dict[str, str] = Field(default_factory=dict)
    lm_head: str | None = None
    embeddings_quantized: list[str] = Field(default_factory=list)
    policy_met: bool | None = None
    judged: str | None = None
    bytes_before: int
    bytes_after: int
    seconds: float


class ProbeRecord(StageRecord):
    """One candidate model of the mixed-precision search: how many ranked nodes were float (and
    activations int16, on targets that run them), the verdict."""

    kept_float: int
    passed: bool
    summary: str
    int16: int = 0


class QuantizeRecord(ModelRecord):
    """How the int8 model was quantized.

    Attributes:
        format: Always "QDQ".
        recipe: The model family's recipe (e.g. "cnn", "transformer").
        quantize_outputs: Whether compute ops' outputs are quantized too.
        op_types: The op types quantized, or "all ONNX Runtime quantizes".
        calibration: The calibration run.
        activation_type: Activation element type.
        activation_symmetric: Activations have zero point 0.
        weight_type: Weight element type.
        per_channel: One weight scale per output channel.
        reduce_range: 7-bit weights.
        reduce_range_reason: Why reduce_range is what it is.
        power_of_two_scales: Every scale is a power of two.
        fused_ops: Contrib ops fused into the int8 model, by op type.
        kept_float: Node name to why it stays float.
        kept_float_damage: For the nodes mixed precision kept float, the damage each did alone in int8
            (1 - cosine of the worst output on a calibration batch).
        dynamic_nodes: Nodes quantized dynamically (activation ranges at run time).
        int16_activations: Activations quantized to 16 bits (targets that run int16 x int8
            products), with why each: int8 would have damaged them most.
        mixed_precision_probes: Every candidate the mixed-precision search judged.
        decision: Every candidate recipe the per-target search tried, and why this one shipped.
        shipped_precision: "int8", or "fp32" when the search shipped the float model itself (the
            artifact is then the model quantize started from).
        nodes: Nodes of the int8 model.
        quantize_linear: Its QuantizeLinear nodes.
        dequantize_linear: Its DequantizeLinear nodes.
    """

    precision: ClassVar[Precision | None] = "int8"

    format: Literal["QDQ"] = "QDQ"
    recipe: str
    quantize_outputs: bool
    op_types: list[str] | str
    calibration: CalibrationRecord
    activation_type: str
    activation_symmetric: bool
    weight_type: str
    per_channel: bool
    reduce_range: bool
    reduce_range_reason: str
    power_of_two_scales: bool
    fused_ops: dict[str, int]
    kept_float: dict[str, str]
    kept_float_damage: dict[str, float] = Field(default_factory=dict)
    dynamic_nodes: list[str] = Field(default_factory=list)
    int16_activations: dict[str, str] = Field(default_factory=dict)
    mixed_precision_probes: list[ProbeRecord]
    decision: SearchDecision | None = None
    shipped_precision: Literal["int8", "fp32"] = "int8"
    nodes: int
    quantize_linear: int
    dequantize_linear: int


class DistillRecord(StageRecord):
    """The distilled student (its artifact is a weights file, not an ONNX model)."""

    precision: ClassVar[Precision | None] = "distilled"

    summary: DistillationSummary


class HlsRecord(StageRecord):
    """The hls4ml project of the fpga target's accelerator partition (its artifact is the project's README.md)."""

    summary: HlsSummary


class ValidateRecord(StageRecord):
    """The parity verdict (the report itself is the artifact)."""

    verdict: str


AnyRecord = (
    ExportRecord
    | SimplifyRecord
    | PruneRecord
    | QuantizeRecord
    | WeightOnlyRecord
    | DistillRecord
    | HlsRecord
    | ValidateRecord
    | ModelRecord
)

# The record type of each stage's artifact, to read a manifest or a stage-cache entry back typed.
RECORD_TYPES: dict[str, tuple[type[StageRecord], ...]] = {
    StageName.DISTILL: (DistillRecord,),
    StageName.EXPORT: (ExportRecord,),
    StageName.SIMPLIFY: (SimplifyRecord,),
    StageName.PRUNE: (PruneRecord,),
    # Static int8 (format "QDQ") or weight-only (format "MatMulNBits" / "QDQ blocked").
    StageName.QUANTIZE: (QuantizeRecord, WeightOnlyRecord),
    StageName.HLS: (HlsRecord,),
    StageName.VALIDATE: (ValidateRecord,),
}


def read_record(stage: str, metadata: dict[str, object]) -> StageRecord | None:
    """A record read back from JSON as its stage's record type (the first of them that takes it;
    None: the stage has no record type)."""
    types = RECORD_TYPES.get(stage.split(".")[0])
    if not types:
        return None
    for record_type in types[:-1]:
        try:
            return record_type.model_validate(metadata)
        except ValidationError:
            continue
    return types[-1].model_validate(metadata)
