"""What an accelerator backend estimates for a model: cycles, latency and its on-chip memory plan."""

from __future__ import annotations

from pydantic import BaseModel


class NodeCost(BaseModel):
    """Estimated work of one accelerator node (None when its shapes are unknown)."""

    node: str
    op_type: str
    macs: int | None
    cycles: int | None


class Buffer(BaseModel):
    """One activation tensor in the on-chip pool: where it lives and while which nodes run."""

    tensor: str
    bytes: int
    offset: int
    first_step: int
    last_step: int


class SegmentCost(BaseModel):
    """Cost and memory plan of one accelerator partition.

    Attributes:
        index: The segment's position in the execution order.
        nodes: Its nodes, in order.
        macs: Multiply-accumulates.
        cycles: Estimated cycles.
        latency_us: cycles / clock.
        peak_activation_bytes: The pool's high-water mark with liveness-based reuse.
        unshared_activation_bytes: What the tensors would take with no reuse.
        fits: The peak fits in the profile's activation buffer.
        buffers: The plan: every tensor's offset and live range (in node steps).
        weight_bytes: int8 weights and int32 biases of its nodes.
    """

    index: int
    nodes: list[str]
    macs: int
    cycles: int
    latency_us: float
    peak_activation_bytes: int
    unshared_activation_bytes: int
    fits: bool
    buffers: list[Buffer]
    weight_bytes: int


class AcceleratorPlan(BaseModel):
    """The whole model's accelerator estimate, at the shapes the symbolic dimensions were given.

    Attributes:
        profile: Profile name.
        description: Profile description.
        dims: Values given to symbolic dimensions for the estimate (others: 1).
        segments: Per accelerator partition.
        node_costs: Per accelerator node.
        cycles: Sum over partitions.
        latency_us: Sum over partitions (CPU fallback and transfers not included).
        macs: Sum over partitions.
        utilization: macs / (cycles x peak MACs per cycle).
        peak_activation_bytes: Largest partition peak.
        activation_buffer_bytes: The profile's activation buffer.
        fits: Every partition fits the activation buffer.
        weight_bytes: All accelerator weights.
        weight_buffer_bytes: The profile's weight buffer.
        weights_fit: All weights stay on chip (else they stream from external memory).
        unknown_shapes: Nodes whose cost could not be estimated (shape inference could not tell).
        model_macs: Multiply-accumulates of every Conv / Gemm / MatMul of the model, the CPU's included
            (None when a shape was unknown).
        mac_share: macs / model_macs: the share of the model's arithmetic on the accelerator.
    """

    profile: str
    description: str
    dims: dict[str, int]
    segments: list[SegmentCost]
    node_costs: list[NodeCost]
    cycles: int
    latency_us: float
    macs: int
    utilization: float
    peak_activation_bytes: int
    activation_buffer_bytes: int
    fits: bool
    weight_bytes: int
    weight_buffer_bytes: int
    weights_fit: bool
    unknown_shapes: list[str]
    model_macs: int | None = None
    mac_share: float | None = None
