"""Where the job's model comes from, and the inputs it takes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.job.base import DimName, DType, FilePath, Identifier, ImportSpec, Section, existing_file


class ModelSource(Section):
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
            cosine / SNR / element-wise error only; "causal-lm" (a `transformers` decoder) is
            exported with its KV cache, quantized weight-only when ``[quantize.weight_only]`` is
            set, and judged by generation parity (``[parity.generation]``) besides its logits.
    """

    factory: ImportSpec | None = None
    weights: FilePath | None = None
    exported_program: FilePath | None = None
    onnx: FilePath | None = None
    kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    output_names: list[Identifier] | None = None
    task: Literal["classification", "embedding", "other", "causal-lm"] = "other"

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info, "a .safetensors state dict or a PyTorch checkpoint")

    @field_validator("exported_program")
    @classmethod
    def _program_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info, "a torch.export .pt2 file")

    @field_validator("onnx")
    @classmethod
    def _onnx_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info, "an .onnx model file")

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


class InputSpec(Section):
    """One model input, in the order of the model's ``forward`` arguments.

    Attributes:
        name: Input name in the ONNX graph and key in the data feeds.
        shape: One entry per axis: an int for a fixed size, a name for a dynamic one
            (the same name on several inputs means the same size).
        dtype: Element type.
    """

    name: Identifier
    shape: list[Annotated[int, Field(ge=1, lt=2**31)] | DimName]
    dtype: DType = "float32"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index to dimension name, for every named (dynamic) axis."""
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}
