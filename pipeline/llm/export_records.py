"""The typed records of a decoder's export parity (`pipeline.llm.export_parity`), apart so that
`pipeline.records` can hold them without importing torch, ONNX Runtime or the exporter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline.job.defaults import DEFAULT_ATOL

# fp32 against fp32: the same arithmetic in another order.
DEFAULT_MIN_COSINE = 0.9999


class TensorParity(BaseModel):
    """One output at one size: ONNX Runtime against PyTorch on the attended positions.

    Attributes:
        name: The output (``logits``, ``present.{i}.key`` / ``.value``).
        elements: Values compared.
        max_abs_error: Largest absolute difference (inf when ONNX Runtime gave NaN or inf).
        cosine: Cosine similarity of the compared values, flattened.
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    name: str
    elements: int
    max_abs_error: float
    cosine: float


class SizeParity(BaseModel):
    """Every output of one step at one (batch, sequence, past) size.

    Attributes:
        batch: Rows.
        sequence: New tokens per row.
        past: Cached tokens per row before the step.
        left_padding: Masked positions at the start of the last row (0 for one row).
        logits: The logits' parity.
        presents: Each present cache's parity, in output order.
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    batch: int
    sequence: int
    past: int
    left_padding: int
    logits: TensorParity
    presents: list[TensorParity]

    @property
    def max_abs_error(self) -> float:
        """The largest absolute difference over every output."""
        return max(entry.max_abs_error for entry in [self.logits, *self.presents])

    @property
    def min_cosine(self) -> float:
        """The lowest cosine over every output."""
        return min(entry.cosine for entry in [self.logits, *self.presents])

    def passed(self, atol: float = DEFAULT_ATOL, min_cosine: float = DEFAULT_MIN_COSINE) -> bool:
        """Every output within `atol` everywhere and at least `min_cosine` alike."""
        return self.max_abs_error <= atol and self.min_cosine >= min_cosine
