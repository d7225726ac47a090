"""Quantization per target: each target's constraints as QDQ settings, and the groups of targets
that share one int8 model (those whose settings agree)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.base import QuantizationConstraints
from pipeline.errors import JobError
from pipeline.job import ConversionJob
from pipeline.quantization.cpu import needs_reduce_range
from pipeline.quantization.qdq import QdqSettings

if TYPE_CHECKING:
    from pipeline.stages.base import Branch, Target


def quantization_settings(job: ConversionJob, targets: list[Target]) -> tuple[QdqSettings, str]:
    """The job's options merged with the constraints of `targets`; and why reduce_range is what it is."""
    options = job.quantize
    constraints = [target.capabilities.quantization for target in targets]
    if options.reduce_range is not None:
        reduce_range, reason = options.reduce_range, "set in the job"
    elif any(target.backend.name == "cpu" for target in targets):
        reduce_range, reason = needs_reduce_range()
    else:
        reduce_range, reason = False, "no CPU target"
    settings = QdqSettings(
        per_channel=options.per_channel and all(c.per_channel_weights for c in constraints),
        activation_type=resolve_activation_type(job, targets),
        weight_type=options.weight_type,
        activation_symmetric=options.activation_symmetric or any(c.symmetric_activations for c in constraints),
        reduce_range=reduce_range,
        power_of_two=(
            options.power_of_two_scales
            if options.power_of_two_scales is not None
            else any(c.power_of_two_scales for c in constraints)
        ),
        fuse_gelu=options.fuse_gelu and all(target.capabilities.contrib_ops for target in targets),
    )
    return settings, reason


def resolve_activation_type(job: ConversionJob, targets: list[Target]) -> str:
    """The job's activation type, checked against (or, when unset, chosen for) every target.

    Raises:
        JobError: A target cannot run the activation type the job asks for.
    """
    accepted = [(t.name, t.capabilities.quantization.activation_types) for t in targets]
    requested = job.quantize.activation_type
    if requested is None:
        return "uint8" if all("uint8" in types for _, types in accepted) else "int8"
    for name, types in accepted:
        if requested not in types:
            raise JobError(
                job.origin,
                "quantize.activation_type",
                f"target {name!r} runs int8 activations as {list(types)}, not {requested}",
            )
    return requested


def target_groups(job: ConversionJob, targets: list[Target]) -> list[Branch]:
    """The targets grouped by the int8 model their constraints ask for, in job order.

    One group (the trunk: one ``model.int8.onnx`` for every target) when all agree; otherwise one
    branch per distinct setting, named after its targets (``fpga``, ``cpu+cuda``), so no target's
    constraints (an FPGA's power-of-two scales, say) shape another target's model.
    """
    from pipeline.stages.base import TRUNK, Branch

    groups: dict[tuple[QdqSettings, QuantizationConstraints, bool, tuple[str, ...]], list[str]] = {}
    for target in targets:
        settings, _ = quantization_settings(job, [target])
        capabilities = target.capabilities
        # The constraints decide which candidates the search may build; timing decides how it picks.
        key = (
            settings,
            capabilities.quantization,
            capabilities.measured_latency,
            tuple(sorted(target.spec.precisions)),
        )
        groups.setdefault(key, []).append(target.name)
    if len(groups) == 1:
        return [TRUNK]
    return [Branch("+".join(names), tuple(names)) for names in groups.values()]


def branch_targets(targets: list[Target], branch: Branch) -> list[Target]:
    """The targets a branch serves (every target for the trunk)."""
    return [target for target in targets if not branch.targets or target.name in branch.targets]


def shared_precisions(targets: list[Target]) -> tuple[str, ...]:
    """The precisions every one of `targets` may ship (``targets.precisions``), in a fixed order."""
    allowed = set.intersection(*(set(target.spec.precisions) for target in targets))
    return tuple(precision for precision in ("int8", "fp32") if precision in allowed)
