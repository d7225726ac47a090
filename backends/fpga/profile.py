"""The FPGA-style device profile: supported ops with attribute limits, arithmetic, parallelism and memory."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.errors import BackendError

PROFILES = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "dpu-int8"

Rounding = Literal["half_up", "half_even", "floor"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arithmetic(_Section):
    """How the accelerator computes: int8 x int8 products, wide accumulators, shift requantization.

    Attributes:
        accumulator_bits: Accumulator width; sums beyond it saturate (and are counted).
        rounding: How a right shift rounds: ``half_up``, ``half_even`` or ``floor``.
        reciprocal_bits: Fraction bits of the fixed-point reciprocal average pooling multiplies by.
        activation_bits: Activation widths the datapath takes: ``[8]``, or ``[8, 16]`` for int16
            activations where int8 would lose too much (int16 x int8 products, "A16W8").
        per_channel_weights: One power-of-two scale per output channel of a weight (the
            requantization shift differs per channel); else one per tensor.
    """

    accumulator_bits: int = Field(default=32, ge=16, le=48)
    rounding: Rounding = "half_up"
    reciprocal_bits: int = Field(default=16, ge=4, le=24)
    activation_bits: list[Literal[8, 16]] = Field(default=[8], min_length=1)
    per_channel_weights: bool = False


class Compute(_Section):
    """Parallelism and clock, for the cycle estimate.

    Attributes:
        clock_mhz: Clock of the compute array.
        pixel_parallelism: Output pixels (or rows of a fully connected layer) per cycle.
        input_channel_parallelism: Input channels per cycle.
        output_channel_parallelism: Output channels per cycle.
    """

    clock_mhz: float = Field(default=300.0, gt=0)
    pixel_parallelism: int = Field(default=8, ge=1)
    input_channel_parallelism: int = Field(default=16, ge=1)
    output_channel_parallelism: int = Field(default=16, ge=1)

    @property
    def macs_per_cycle(self) -> int:
        """Peak multiply-accumulates per cycle."""
        return self.pixel_parallelism * self.input_channel_parallelism * self.output_channel_parallelism


class Memory(_Section):
    """On-chip buffers.

    Attributes:
        activation_buffer_kib: Activation buffer; the liveness-based memory plan must fit in it.
        weight_buffer_kib: Weight buffer; weights that do not fit are streamed from external memory.
    """

    activation_buffer_kib: int = Field(default=512, ge=1)
    weight_buffer_kib: int = Field(default=1024, ge=1)


class OpLimits(_Section):
    """Attribute limits of one supported operator (unset: no limit).

    Attributes:
        kernel_max: Largest kernel side.
        stride_max: Largest stride.
        dilation_max: Largest dilation.
        pad_max: Largest padding on any side.
        groups: Which grouped convolutions run: ``one`` (plain), ``one_or_depthwise`` or ``any``.
        operands: MatMul only: ``weight`` (the second operand is a constant 2-D weight: a fully
            connected layer) or ``any`` (two int8 activations too, as attention's Q x K and P x V).
        outputs: ``int8`` (every result is requantized), or ``int8_or_int32`` (MAC ops: a result
            float nodes read leaves as its int32 accumulators, dequantized for the CPU).
    """

    kernel_max: int | None = Field(default=None, ge=1)
    stride_max: int | None = Field(default=None, ge=1)
    dilation_max: int | None = Field(default=None, ge=1)
    pad_max: int | None = Field(default=None, ge=0)
    groups: Literal["one", "one_or_depthwise", "any"] = "any"
    operands: Literal["weight", "any"] = "weight"
    outputs: Literal["int8", "int8_or_int32"] = "int8"


class Units(_Section):
    """The fixed-point units for nonlinear layers (used when the profile lists their operators).

    Attributes:
        lut_fraction_bits: Fraction bits of the element-wise look-up tables (GELU: one entry per
            int8 input code, rounded once more to the output's scale).
        exp_fraction_bits: Fraction bits of Softmax's exp table, indexed by x - max(x).
        reciprocal_bits: Fraction bits of the reciprocal Softmax multiplies by (1 / sum of exps).
        rsqrt_table_bits: LayerNorm's inverse square root: a table indexed by this many leading
            bits of the variance's mantissa (relative error below 2**-(bits + 1)).
        norm_fraction_bits: Fraction bits of the normalised value (x - mean) / std before the
            LayerNorm scale and bias.
    """

    lut_fraction_bits: int = Field(default=16, ge=8, le=24)
    exp_fraction_bits: int = Field(default=15, ge=8, le=24)
    reciprocal_bits: int = Field(default=40, ge=16, le=48)
    rsqrt_table_bits: int = Field(default=10, ge=4, le=16)
    norm_fraction_bits: int = Field(default=12, ge=6, le=20)


class FpgaProfile(_Section):
    """A DPU-class int8 accelerator as onnxforge models it.

    Activations are int8 (or int16 where the profile allows) and weights int8, with zero point 0
    and power-of-two scales (one per tensor; per output channel for weights where the profile
    allows); requantization is a shift. These are fixed by the emulator; the rest is the profile's.

    Attributes:
        name: Profile name, shown in reports.
        description: One line about the device.
        arithmetic: Accumulation and rounding.
        compute: Parallelism and clock.
        memory: On-chip buffer sizes.
        units: The fixed-point LayerNorm, Softmax and GELU units.
        ops: Supported operators (ONNX op type) with their attribute limits.
    """

    name: str
    description: str = ""
    arithmetic: Arithmetic = Arithmetic()
    compute: Compute = Compute()
    memory: Memory = Memory()
    units: Units = Units()
    ops: dict[str, OpLimits] = Field(min_length=1)


def load_profile(name_or_path: str) -> FpgaProfile:
    """Load a built-in profile by name, or a profile TOML file by path.

    Raises:
        BackendError: No such profile, or the file is not a valid profile.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILES / f"{name_or_path}.toml"
        if not path.is_file():
            builtins = sorted(p.stem for p in PROFILES.glob("*.toml"))
            raise BackendError(
                "fpga",
                f"no built-in profile {name_or_path!r}; built-ins: {', '.join(builtins)}",
                "or give a .toml path",
            )
    try:
        with path.open("rb") as handle:
            return FpgaProfile.model_validate(tomllib.load(handle))
    except OSError as e:
        raise BackendError("fpga", f"cannot read profile {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise BackendError("fpga", f"profile {path} is not valid TOML: {e}") from e
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise BackendError("fpga", f"profile {path}: {where}: {error['msg']}", "see backends/fpga/profiles/") from e
