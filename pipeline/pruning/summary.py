"""What the prune stage did, as a record for the manifest and the parity report."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")


class LayerChange(_Record):
    """One Conv / Gemm / MatMul before and after pruning (MACs for one sample).

    Attributes:
        layer: Readable layer name.
        node: Node name.
        inputs: Input channels before and after.
        outputs: Output channels before and after.
        parameters: Weight and bias elements before and after.
        macs: Multiply-accumulates per sample before and after.
        sparsity: Share of zero weights after sparsity (None: not sparsified).
    """

    layer: str
    node: str
    inputs: tuple[int, int]
    outputs: tuple[int, int]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    sparsity: float | None = None


class RecoveryRecord(_Record):
    """Relative output error of one re-fitted layer vs the unpruned model, on calibration data.

    Attributes:
        layer: Readable layer name.
        error_without: ||Y' - Y|| / ||Y|| with the weights only sliced.
        error_with: The same after the least-squares re-fit.
        rows: Output positions the fit used.
        skipped: Why the layer was not re-fitted.
    """

    layer: str
    error_without: float
    error_with: float
    rows: int
    skipped: str | None = None


class SparsityRecord(_Record):
    """What weight sparsity achieved.

    Attributes:
        pattern: ``unstructured`` or ``n:m`` (e.g. ``2:4``).
        sparsity: Zero share of the sparsified layers' weights.
        layers: Layers sparsified.
        weight_bytes: Weight bytes as stored (unchanged: zeros are stored densely).
        compressed_before: Weight bytes after zlib, before sparsity.
        compressed_after: The same after sparsity.
        skipped: Layers left dense, with why.
    """

    pattern: str
    sparsity: float
    layers: int
    weight_bytes: int
    compressed_before: int
    compressed_after: int
    skipped: dict[str, str]


class PruningSummary(_Record):
    """The prune stage's record.

    Attributes:
        input_shape: The per-sample input shapes MACs were counted at.
        parameters: Model parameters before and after.
        macs: Multiply-accumulates per sample in Conv / Gemm / MatMul, before and after.
        layers: Layers whose shape or weights changed.
        blocked: Channel groups that cannot lose channels, by layer name, with why.
        skipped: Channel groups the job excluded.
        recovery: Per re-fitted layer (empty without recovery).
        sparsity: Weight sparsity (None: not applied).
        note: What the pruning buys on the targets, in words.
    """

    input_shape: dict[str, list[int]]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    layers: list[LayerChange]
    blocked: dict[str, str] = {}
    skipped: list[str] = []
    recovery: list[RecoveryRecord] = []
    sparsity: SparsityRecord | None = None
    note: str = ""
