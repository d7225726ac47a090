"""Where sample data comes from: an .npz of arrays or a factory yielding feed dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.job.base import FilePath, Identifier, ImportSpec, Section, existing_file
from pipeline.job.defaults import DEFAULT_BATCH_SIZE


class DataSource(Section):
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
        nonfinite: What to do with samples holding NaN or infinity in a float input: "error"
            refuses the data (naming the batch, the input and the count), "drop" leaves those
            samples out, counted and reported. Quantization cannot calibrate on them and parity
            cannot compare them. An additive attention mask (an input of only 0 and -inf) is not
            refused: its -inf are what masks.
    """

    npz: FilePath | None = None
    factory: ImportSpec | None = None
    labels: Identifier | None = None
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    max_batches: int | None = Field(default=None, ge=1)
    nonfinite: Literal["error", "drop"] = "error"

    @field_validator("npz")
    @classmethod
    def _npz_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info, "an .npz of input arrays")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSource:
        if (self.npz is None) == (self.factory is None):
            raise ValueError("give exactly one of 'npz' (a file) or 'factory' ('package.module:function')")
        return self
