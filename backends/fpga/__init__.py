"""The FPGA-style backend: a DPU-class int8 accelerator described by a TOML profile.

Accelerator partitions run on a real FPGA execution provider when ONNX Runtime has one
(VitisAIExecutionProvider), otherwise on the bit-accurate integer emulator with ONNX Runtime's CPU
provider running the rest.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort
from pydantic import BaseModel, Field, field_validator

from backends.base import QDQ_OPS, Availability, Capabilities, NodePlacement, PlacementReport, QuantizationConstraints
from backends.cpu import CpuBackend
from backends.errors import BackendError
from backends.fpga.cost import accelerator_plan
from backends.fpga.partition import CPU, PartitionPlan, partition
from backends.fpga.profile import DEFAULT_PROFILE, FpgaProfile, load_profile
from backends.fpga.session import FpgaSession
from backends.ort import OrtBackend, OrtSession, SessionOptionsSpec
from backends.threads import job_threads

logger = logging.getLogger(__name__)

VITIS_AI = "VitisAIExecutionProvider"


class FpgaOptions(SessionOptionsSpec):
    """FPGA-style target options.

    Attributes:
        profile: A built-in profile name or a path to a profile TOML file (absolute, or relative to
            the current directory).
        execution: ``auto`` uses VitisAIExecutionProvider when ONNX Runtime has it, else the
            emulator; ``emulator`` always emulates.
        vitis_config_file: The Vitis AI provider's ``config_file`` (its compiler settings).
        cost_dims: Values for symbolic dimensions in the cost and memory estimate, as
            ``"name=value"`` (unlisted ones: 1), e.g. ``["batch=1", "sequence=128"]``.
        hls: Export the accelerator partition as an hls4ml project (``hls/`` in the output folder)
            and compare its C simulation with the emulator (needs ``onnxforge[fpga-hls]`` and g++).
    """

    profile: str = DEFAULT_PROFILE
    execution: Literal["auto", "emulator"] = "auto"
    vitis_config_file: str | None = None
    cost_dims: list[str] = Field(default_factory=list)
    hls: bool = False

    @field_validator("profile")
    @classmethod
    def _profile_loads(cls, value: str) -> str:
        # Checked when the job is read, so a bad profile stops the job before anything is written.
        try:
            load_profile(value)
        except BackendError as e:
            raise ValueError(e.reason) from e
        return value

    @field_validator("cost_dims")
    @classmethod
    def _name_equals_value(cls, values: list[str]) -> list[str]:
        for value in values:
            name, _, size = value.partition("=")
            if not name or not size.isdigit() or int(size) < 1:
                raise ValueError(f"{value!r} is not name=positive integer")
        return values

    @property
    def dims(self) -> dict[str, int]:
        """`cost_dims` as a mapping."""
        return {name: int(size) for name, _, size in (value.partition("=") for value in self.cost_dims)}


class _VitisAiRuntime(OrtBackend):
    """The real FPGA path: ONNX Runtime with the Vitis AI provider, the CPU provider for the rest."""

    name = "fpga"
    execution_providers = (VITIS_AI, CPU)
    capabilities = Capabilities(dtypes=("float32", "int8"), quantization=QuantizationConstraints())
    options_model = FpgaOptions

    def provider_options(self, options: SessionOptionsSpec) -> list[dict[str, Any]]:
        """Pass the Vitis AI config file when the job names one."""
        config = options.vitis_config_file if isinstance(options, FpgaOptions) else None
        return [{"config_file": config} if config else {}, {}]


class _CpuRuntime(CpuBackend):
    """A model with nothing for the accelerator: ONNX Runtime's CPU provider, errors named ``fpga``."""

    name = "fpga"


class FpgaBackend:
    """An int8 accelerator with power-of-two scales, emulated bit for bit when no FPGA provider is present."""

    name = "fpga"
    capabilities = Capabilities(
        dtypes=("float32", "int8", "int32"),
        quantization=QuantizationConstraints(
            activation_types=("int8",),
            symmetric_activations=True,
            per_channel_weights=False,
            power_of_two_scales=True,
        ),
        measured_latency=False,
    )
    options_model = FpgaOptions

    def capabilities_for(self, options: BaseModel | None) -> Capabilities:
        """The capabilities under the target's profile: its operators, weight scales and activation widths."""
        profile = load_profile(self._spec(options).profile)
        quantization = replace(
            self.capabilities.quantization,
            accelerator_op_types=tuple(sorted(profile.ops)),
            per_channel_weights=profile.arithmetic.per_channel_weights,
            int16_activations=16 in profile.arithmetic.activation_bits,
        )
        return replace(self.capabilities, quantization=quantization)

    @property
    def execution_providers(self) -> tuple[str, ...]:
        """Vitis AI then CPU when ONNX Runtime has Vitis AI; else the CPU provider beside the emulator."""
        return (VITIS_AI, CPU) if _has_vitis_ai() else (CPU,)

    def availability(self) -> Availability:
        """Always available: without an FPGA provider the accelerator is emulated."""
        if _has_vitis_ai():
            return Availability(ok=True, detail=f"accelerator partitions run on {VITIS_AI}")
        return Availability(
            ok=True,
            detail=f"emulated: accelerator partitions run on the bit-accurate integer emulator ({VITIS_AI} is not "
            f"in this onnxruntime build)",
        )

    def open(self, model: Path, options: BaseModel | None = None) -> FpgaSession | OrtSession:
        """Open `model`: on Vitis AI when present and allowed, else partitioned onto the emulator.

        Raises:
            BackendError: The model or the profile cannot be loaded.
        """
        spec = self._spec(options)
        if spec.execution == "auto" and _has_vitis_ai():
            return _VitisAiRuntime().open(model, spec)
        profile = load_profile(spec.profile)
        loaded = _load(model)
        plan = partition(loaded, profile)
        if all(segment.device == "cpu" for segment in plan.segments):
            # Nothing for the accelerator (a float model): the whole graph is one CPU session.
            return _CpuRuntime().open(model, spec)
        return FpgaSession(loaded, plan, profile, spec.intra_op_threads or job_threads())

    def placement(self, model: Path, options: BaseModel | None = None) -> PlacementReport:
        """The partition (every node's device, and why a node falls back), with the cost and memory plan.

        Raises:
            BackendError: The model or the profile cannot be loaded.
        """
        spec = self._spec(options)
        profile = load_profile(spec.profile)
        loaded = _load(model)
        plan = partition(loaded, profile)
        try:
            estimate = accelerator_plan(loaded, plan, profile, spec.dims)
        except Exception as e:  # noqa: BLE001 - the estimate is a diagnostic; the partition stands without it
            logger.warning("no cost estimate for %s: %s", model.name, e)
            estimate = None
        emulated = not (spec.execution == "auto" and _has_vitis_ai())
        notes = [
            f"Partition by onnxforge's rules for profile {profile.name} ({profile.description}).",
            "The accelerator is emulated bit for bit; latency figures are the profile's cost model, not timings."
            if emulated
            else f"Execution uses {VITIS_AI}; its compiler may place nodes differently than this partition.",
        ]
        nodes = _placements(loaded, plan, profile)
        return PlacementReport.from_nodes(
            self.name,
            model.name,
            accelerator_device(profile),
            nodes,
            unfused_qdq=sum(node.op_type in QDQ_OPS and node.device == CPU for node in nodes),
            notes=notes,
            accelerator=estimate,
        )

    def _spec(self, options: BaseModel | None) -> FpgaOptions:
        return options if isinstance(options, FpgaOptions) else FpgaOptions()


def accelerator_device(profile: FpgaProfile) -> str:
    """The device name accelerator nodes are placed on, e.g. ``fpga:dpu-int8``."""
    return f"fpga:{profile.name}"


def _placements(model: onnx.ModelProto, plan: PartitionPlan, profile: FpgaProfile) -> list[NodePlacement]:
    placements = []
    for node in model.graph.node:
        device, reason = plan.decisions[node.name]
        if node.op_type in QDQ_OPS and device == "cpu":
            reason = "converts between float and int8 at a partition boundary"
        elif device == "absorbed":
            reason = ""
        placements.append(
            NodePlacement(
                node=node.name,
                op_type=node.op_type,
                device=CPU if device == "cpu" else accelerator_device(profile),
                reason=reason,
            )
        )
    return placements


def _has_vitis_ai() -> bool:
    return VITIS_AI in ort.get_available_providers()


def _load(model: Path) -> onnx.ModelProto:
    try:
        loaded = onnx.load(str(model))
    except Exception as e:  # protobuf and IO errors both mean "cannot load"
        raise BackendError("fpga", f"cannot load {model.name}: {type(e).__name__}: {e}") from e
    return loaded
