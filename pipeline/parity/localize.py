"""Layer-wise localisation: where along the graph the candidate's error enters.

The intermediate tensors the reference and the candidate share by name (an fp32 graph and its
QDQ rewrite keep the original tensor names; pruning and simplification keep them too) are
compared on real data: signal-to-quantization-noise ratio (SQNR), cosine and max abs error per
tensor. In a QDQ candidate a tensor exists twice: as its node computes it, and as its consumers
read it after QuantizeLinear / DequantizeLinear (``<name>_DequantizeLinear_Output``); both are
compared, so the loss of quantizing a tensor is told apart from the loss of computing a node.

Tensors are exposed a chunk at a time, chunks sized by an element budget measured on one sample
first, so memory stays bounded whatever the model's size; each chunk runs only the part of the
graph it needs (see `Probe`). Graphs run as written, without ONNX Runtime's fusions: a QDQ model
computes in float with fake quantization, so the figures are the quantization error itself.

Each step is charged with the error it adds by itself, as a local SQNR: for a quantized tensor,
the candidate's own value against its Q/DQ copy (exact, whatever went wrong upstream); for a node,
the noise power its output has beyond its worst input's (noise powers add). Ranked by local SQNR,
lowest first, the steps name the layers responsible, with the nodes whose exclusion from
quantization removes the error (a node: itself; a quantized tensor: its producer and its
consumers, since the quantizer puts Q/DQ on a tensor when any of them is quantized). The first
tensor in graph order whose SQNR falls below the threshold is where the outputs start to diverge.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from pydantic import BaseModel, ConfigDict

from pipeline.calibration.histogram import HUGE
from pipeline.pruning.probe import Probe, external_copy

logger = logging.getLogger(__name__)

# Elements of exposed tensors one probe run may return per model (float32: 4 bytes each).
ELEMENT_BUDGET = 16 * 2**20
# SQNR of an exact match; keeps the arithmetic finite.
EXACT_DB = 120.0
# Below this SQNR a tensor counts as diverged (40 dB: 1% RMS error).
DIVERGED_DB = 40.0
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
# How ONNX Runtime's QDQ quantizer names the dequantized copy of a tensor that consumers read.
DEQUANTIZED_SUFFIX = "_DequantizeLinear_Output"


class TensorParity(BaseModel):
    """One intermediate tensor, candidate against reference.

    Attributes:
        tensor: The tensor name (in the reference).
        kind: ``computed`` (the node's output) or ``quantized`` (what consumers read after Q/DQ).
        node: The reference node producing it.
        op_type: That node's op type.
        order: Its position in the reference graph's topological order.
        sqnr_db: 10 log10(signal power / error power), capped at 120 (exact).
        cosine: Cosine similarity of the flattened tensors over all samples.
        max_abs: Largest absolute difference.
        local_sqnr_db: SQNR of the error this step adds by itself (low: error enters here).
        culprits: Nodes whose exclusion from quantization would remove this step's loss.
    """

    model_config = ConfigDict(frozen=True)

    tensor: str
    kind: Literal["computed", "quantized"]
    node: str
    op_type: str
    order: int
    sqnr_db: float
    cosine: float
    max_abs: float
    local_sqnr_db: float
    culprits: list[str]


class Localisation(BaseModel):
    """Where the error enters, for one pair of models.

    Attributes:
        reference: The reference model's file name.
        candidate: The candidate model's file name.
        samples: Samples compared.
        compared: Tensors compared (shared by name, same shape, float).
        skipped: Shared tensors not compared (another shape, e.g. pruned channels), by count.
        threshold_db: The SQNR below which a tensor counts as diverged.
        first_diverging: The first tensor in graph order below the threshold (None: none is).
        ranked: The tensors by SQNR lost at their node, worst first (the top `keep`).
        tensors: Every compared tensor in graph order (for plots).
    """

    model_config = ConfigDict(frozen=True)

    reference: str
    candidate: str
    samples: int
    compared: int
    skipped: int
    threshold_db: float
    first_diverging: TensorParity | None
    ranked: list[TensorParity]
    tensors: list[TensorParity]

    def responsible_nodes(self, steps: int) -> list[str]:
        """The culprits of the `steps` worst steps below the threshold, worst first."""
        nodes: dict[str, None] = {}
        for step in [t for t in self.ranked if t.local_sqnr_db < self.threshold_db][:steps]:
            nodes.update(dict.fromkeys(step.culprits))
        return list(nodes)


@dataclass
class _Sums:
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    candidate: float = 0.0
    max_abs: float = 0.0
    shape_mismatch: bool = False

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            self.shape_mismatch = True
            return
        r = reference.astype(np.float64, copy=False).ravel()
        c = candidate.astype(np.float64, copy=False).ravel()
        # Attention masks fill positions with -inf or float32's lowest value: those positions
        # would swamp the signal power and hide the error on the real scores, so they are left out.
        real = np.isfinite(r) & (np.abs(r) < HUGE)
        r, c = r[real], c[real]
        diff = c - r
        if not np.isfinite(diff).all():
            self.noise = math.inf
            diff = diff[np.isfinite(diff)]
        self.signal += float(r @ r)
        self.noise += float(diff @ diff)
        self.dot += float(r @ c)
        self.candidate += float(c @ c)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return EXACT_DB
        if self.signal == 0.0 or math.isinf(self.noise):
            return -EXACT_DB
        return min(EXACT_DB, 10.0 * math.log10(self.signal / self.noise))

    def cosine(self) -> float:
        norms = math.sqrt(self.signal * self.candidate)
        return self.dot / norms if norms > 0 else (1.0 if self.noise == 0.0 else 0.0)


@dataclass
class _Shared:
    """Tensors both graphs produce, in the reference's graph order, and their Q/DQ copies."""

    names: list[str] = field(default_factory=list)
    producers: dict[str, ir.Node] = field(default_factory=dict)
    dequantized: dict[str, str] = field(default_factory=dict)
    # Produced by another op in the candidate (the quantizer drops a Relu before a QuantizeLinear
    # and renames the Conv's output): only the dequantized copy is comparable.
    rewritten: set[str] = field(default_factory=set)
    candidate_producers: dict[str, str] = field(default_factory=dict)

    def candidate_names(self, chunk: list[str]) -> list[str]:
        own = [name for name in chunk if name not in self.rewritten]
        return [*own, *(self.dequantized[name] for name in chunk if name in self.dequantized)]


def localize(
    reference: ir.Model,
    candidate: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    reference_name: str = "reference",
    candidate_name: str = "candidate",
    threshold_db: float = DIVERGED_DB,
    keep: int = 20,
    element_budget: int = ELEMENT_BUDGET,
) -> Localisation:
    """Compare every shared intermediate tensor on the batches and rank where error enters.

    Args:
        reference: The reference model (e.g. the fp32 or pruned graph).
        candidate: The candidate (e.g. its QDQ int8 rewrite).
        batches: Feed dicts; materialised once (a few batches are enough for a ranking).
        reference_name: How the report names the reference.
        candidate_name: How the report names the candidate.
        threshold_db: SQNR below which a tensor counts as diverged.
        keep: Ranked entries kept.
        element_budget: Elements of exposed tensors per probe run and model.

    Returns:
        The localisation.
    """
    for model in (reference, candidate):
        ShapeInferencePass()(model)
    feeds = [dict(batch) for batch in batches]
    shared = _shared_tensors(reference, candidate)
    sums, local = _compare_on_disk(reference, candidate, shared, feeds, element_budget)
    tensors = _tensor_parity(reference, shared, sums, local)
    first = next((t for t in tensors if t.sqnr_db < threshold_db), None)
    ranked = sorted(tensors, key=lambda t: (t.local_sqnr_db, t.order))[:keep]
    samples = sum(int(next(iter(batch.values())).shape[0]) for batch in feeds)
    logger.info(
        "localised %s vs %s: %d tensors, first below %.0f dB: %s",
        candidate_name,
        reference_name,
        len(tensors),
        threshold_db,
        first.tensor if first else "none",
    )
    return Localisation(
        reference=reference_name,
        candidate=candidate_name,
        samples=samples,
        compared=len(tensors),
        skipped=sum(s.shape_mismatch for s in sums.values()),
        threshold_db=threshold_db,
        first_diverging=first,
        ranked=ranked,
        tensors=tensors,
    )


def _compare_on_disk(
    reference: ir.Model,
    candidate: ir.Model,
    shared: _Shared,
    feeds: list[dict[str, np.ndarray]],
    element_budget: int,
) -> tuple[dict[str, _Sums], dict[str, _Sums]]:
    """`_compare` on copies of both models whose weights are in a scratch folder.

    Weights on disk: each probe writes only its graph, and ONNX Runtime reads what it needs.
    """
    with tempfile.TemporaryDirectory(prefix="onnxforge-localize-") as scratch:
        folder = Path(scratch)
        return _compare(
            external_copy(reference, folder, "reference"),
            external_copy(candidate, folder, "candidate"),
            shared,
            feeds,
            element_budget,
            folder,
        )


def _compare(
    reference: ir.Model,
    candidate: ir.Model,
    shared: _Shared,
    feeds: list[dict[str, np.ndarray]],
    element_budget: int,
    folder: Path,
) -> tuple[dict[str, _Sums], dict[str, _Sums]]:
    """Stream the batches through both models a chunk of tensors at a time; the sums per tensor."""
    sums = {name: _Sums() for name in shared.names}
    sums.update({copy: _Sums() for copy in shared.dequantized.values()})
    # The Q/DQ copy against the candidate's own value: the error of quantizing that tensor alone.
    local = {name: _Sums() for name in shared.dequantized}
    for chunk in _chunks(reference, shared.names, feeds[0], element_budget, folder):
        # Graphs as written: fused kernels would rewire or drop the tensors being compared.
        reference_probe = Probe(reference, chunk, optimize=False, folder=folder)
        candidate_probe = Probe(candidate, shared.candidate_names(chunk), optimize=False, folder=folder)
        for batch in feeds:
            expected, actual = reference_probe.run(batch), candidate_probe.run(batch)
            for name in chunk:
                if name not in shared.rewritten:
                    sums[name].update(expected[name], actual[name])
                if name in shared.dequantized:
                    copy = shared.dequantized[name]
                    sums[copy].update(expected[name], actual[copy])
                    if name not in shared.rewritten:
                        local[name].update(actual[name], actual[copy])
            del expected, actual
        del reference_probe, candidate_probe
    return sums, local


def _shared_tensors(reference: ir.Model, candidate: ir.Model) -> _Shared:
    produced = {value.name: node.op_type for node in candidate.graph for value in node.outputs}
    shared = _Shared(candidate_producers={v.name or "": n.name or "" for n in candidate.graph for v in n.outputs})
    for node in reference.graph:
        for value in node.outputs:
            name = value.name or ""
            if name not in produced or value.dtype not in _FLOAT:
                continue
            has_copy = name + DEQUANTIZED_SUFFIX in produced
            if produced[name] != node.op_type:
                if not has_copy:
                    continue
                shared.rewritten.add(name)
            shared.names.append(name)
            shared.producers[name] = node
            if has_copy:
                shared.dequantized[name] = name + DEQUANTIZED_SUFFIX
    return shared


def _chunks(
    model: ir.Model, names: list[str], feeds: Mapping[str, np.ndarray], budget: int, folder: Path
) -> list[list[str]]:
    """Split the names so each chunk's tensors stay under `budget` elements for the batch.

    Sizes are measured on the batch's first sample, a few dozen tensors at a time.
    """
    one = {name: array[:1] for name, array in feeds.items()}
    batch = int(next(iter(feeds.values())).shape[0]) or 1
    sizes: dict[str, int] = {}
    for start in range(0, len(names), 64):
        measured = Probe(model, names[start : start + 64], optimize=False, folder=folder).run(one)
        sizes.update({name: int(array.size) for name, array in measured.items()})
    chunks: list[list[str]] = [[]]
    total = 0
    for name in names:
        size = sizes[name] * batch
        if chunks[-1] and total + size > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(name)
        total += size
    return [chunk for chunk in chunks if chunk]


def _node_culprits(node: ir.Node, shared: _Shared, consumers: dict[str, list[str]]) -> list[str]:
    """A node computing from quantized inputs: itself, and what keeps each input quantized.

    Its loss comes from its inputs' (and weights') quantization as much as from itself; the
    quantizer keeps a tensor quantized while its producer or any consumer is quantized.
    """
    culprits = {node.name or "": None}
    for value in node.inputs:
        name = value.name if value is not None else None
        if name is not None and name in shared.dequantized:
            culprits[shared.candidate_producers[name]] = None
            culprits.update(dict.fromkeys(consumers.get(name, [])))
    return list(culprits)


class _Upstream:
    """The worst SQNR reaching a node: of its compared inputs, or of the nearest compared tensors above."""

    def __init__(self, seen: dict[str, float]) -> None:
        self._seen = seen
        self._memo: dict[str, float] = {}

    def worst(self, node: ir.Node) -> float:
        return min((self._value(v) for v in node.inputs if v is not None), default=EXACT_DB)

    def _value(self, value: ir.Value) -> float:
        name = value.name or ""
        if name in self._seen:
            return self._seen[name]
        producer = value.producer()
        if producer is None:  # a graph input or a weight: the same in both models
            return EXACT_DB
        if name not in self._memo:
            self._memo[name] = self.worst(producer)
        return self._memo[name]


def _local_db(output_db: float, input_db: float) -> float:
    """SQNR of the noise a step adds, if noise powers add: out noise minus the worst input's."""
    added = 10 ** (-output_db / 10) - 10 ** (-input_db / 10)
    return EXACT_DB if added <= 0 else min(EXACT_DB, -10 * math.log10(added))


def _tensor_parity(
    reference: ir.Model, shared: _Shared, sums: dict[str, _Sums], local: dict[str, _Sums]
) -> list[TensorParity]:
    """Per compared tensor, the SQNR lost by its node and, when quantized, by its Q/DQ pair."""
    compared = [name for name in shared.names if not sums[shared.dequantized.get(name, name)].shape_mismatch]
    computed = {name: sums[name].sqnr_db() for name in compared if name not in shared.rewritten}
    # What consumers read: the dequantized copy when there is one.
    seen = {
        name: sums[shared.dequantized[name]].sqnr_db() if name in shared.dequantized else computed[name]
        for name in compared
    }
    consumers = {
        name: [c.name or "" for c in value.consumers()]
        for node in reference.graph
        for value in node.outputs
        if (name := value.name or "") in shared.producers
    }
    upstream = _Upstream(seen)
    result = []
    for order, name in enumerate(shared.names):
        if name not in seen:
            continue
        node = shared.producers[name]
        worst_input = upstream.worst(node)
        common: dict[str, Any] = {"tensor": name, "node": node.name or "", "op_type": node.op_type, "order": order}
        if name in computed:
            result.append(
                TensorParity(
                    **common,
                    kind="computed",
                    sqnr_db=round(computed[name], 3),
                    cosine=sums[name].cosine(),
                    max_abs=sums[name].max_abs,
                    local_sqnr_db=round(_local_db(computed[name], worst_input), 3),
                    culprits=_node_culprits(node, shared, consumers),
                )
            )
        if name in shared.dequantized:
            copy = sums[shared.dequantized[name]]
            # Rewritten: no own value to isolate the Q/DQ pair, so charge it with what it adds to its inputs.
            alone = local[name].sqnr_db() if name in computed else _local_db(seen[name], worst_input)
            result.append(
                TensorParity(
                    **common,
                    kind="quantized",
                    sqnr_db=round(seen[name], 3),
                    cosine=copy.cosine(),
                    max_abs=copy.max_abs,
                    local_sqnr_db=round(alone, 3),
                    culprits=[shared.candidate_producers[name], *consumers[name]],
                )
            )
    return result
