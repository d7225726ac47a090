"""Accuracy-aware mixed precision: keep the fewest nodes float that bring int8 within the policy.

Candidates are the quantized compute nodes (Conv, MatMul, Gemm) with an activation input.
Each is measured alone: the model
with only that node quantized is compared with the float model on a calibration batch, and the
damage (1 - cosine of the worst output) ranks it. An estimate from the histograms alone (the
SQNR of a node's inputs) ranks badly on transformers, because it ignores how far an error
travels; it is kept as the tie-breaker and reported. The search then grows the set of float
nodes along the ranking, doubling then bisecting, and judges each candidate model on calibration
data with the job's own int8 policy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from pipeline.calibration.histogram import TensorHistogram

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A quantized node and how much its inputs lose to 8 bits.

    Attributes:
        node: Node name.
        op_type: Its op type.
        sqnr_db: The lowest estimated SQNR over its quantized activation inputs.
        tensor: The input with that SQNR.
        damage: Measured output damage with only this node quantized (None until measured).
    """

    node: str
    op_type: str
    sqnr_db: float
    tensor: str
    damage: float | None = None


@dataclass(frozen=True)
class Probe:
    """One evaluated candidate model: how many ranked nodes were float, and the verdict."""

    kept_float: int
    passed: bool
    summary: str


@dataclass
class SearchResult:
    """The outcome of the search.

    Attributes:
        kept_float: Node name to the reason it stays float.
        damage: Node name to its measured damage (1 - cosine with only it in int8), for the nodes kept float.
        probes: Every evaluation, in order.
        met: Whether the policy was met (False: even with every candidate float it was not).
    """

    kept_float: dict[str, str] = field(default_factory=dict)
    damage: dict[str, float] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    met: bool = False


def expected_sqnr_db(histogram: TensorHistogram, low: float, high: float, levels: int = 256) -> float:
    """SQNR in dB of quantizing the histogram's values to `levels` steps over [low, high]."""
    if histogram.half_range == 0 or histogram.counts.sum() == 0:
        return math.inf
    edges = histogram.edges
    centers = (edges[:-1] + edges[1:]) / 2
    counts = histogram.counts.astype(np.float64)
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / (levels - 1) if high > low else 0.0
    inside = (centers >= low) & (centers <= high)
    noise = np.where(inside, step**2 / 12.0, (centers - np.clip(centers, low, high)) ** 2) @ counts
    signal = (centers**2) @ counts
    if noise == 0:
        return math.inf
    return float(10.0 * math.log10(max(signal, 1e-30) / noise))


# Only where the compute is: keeping a Relu or a Reshape float buys no accuracy worth its Q/DQ.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def rank_candidates(
    model: onnx.ModelProto,
    histograms: Mapping[str, TensorHistogram],
    ranges: Mapping[str, tuple[float, float]],
    op_types: tuple[str, ...] | None,
    excluded: set[str],
) -> list[Candidate]:
    """Quantized compute nodes (`COMPUTE_OPS`), worst estimated input SQNR first."""
    candidates = []
    for node in model.graph.node:
        if node.name in excluded or node.op_type not in COMPUTE_OPS:
            continue
        if op_types is not None and node.op_type not in op_types:
            continue
        scores = [
            (expected_sqnr_db(histograms[name], *ranges[name]), name)
            for name in node.input
            if name in histograms and name in ranges
        ]
        if scores:
            sqnr, tensor = min(scores)
            candidates.append(Candidate(node.name, node.op_type, sqnr, tensor))
    return sorted(candidates, key=lambda candidate: (candidate.sqnr_db, candidate.node))


def rank_by_damage(candidates: list[Candidate], damage: Callable[[str], float]) -> list[Candidate]:
    """Measure each candidate alone and order them most damaging first (SQNR breaks ties)."""
    measured = [replace(candidate, damage=damage(candidate.node)) for candidate in candidates]
    return sorted(measured, key=lambda candidate: (-(candidate.damage or 0.0), candidate.sqnr_db, candidate.node))


def search(
    rank: Callable[[], list[Candidate]],
    evaluate: Callable[[list[str]], tuple[bool, str]],
    max_share: float = 1.0,
) -> SearchResult:
    """The fewest leading candidates to keep float for `evaluate` to pass.

    Args:
        rank: Returns the candidates, most harmful first; called only if full int8 fails.
        evaluate: Given node names to keep float, quantize and judge: (passed, summary).
        max_share: At most this share of the candidates may be kept float.

    Returns:
        The smallest passing prefix found (doubling, then bisection), with every probe. When
        even the largest allowed prefix fails, `met` is False and that prefix is kept float
        (the closest the search got).
    """
    result = SearchResult()
    ranked: list[Candidate] = []

    def probe(count: int) -> bool:
        passed, summary = evaluate([candidate.node for candidate in ranked[:count]])
        result.probes.append(Probe(count, passed, summary))
        logger.info("mixed precision: %d node(s) float -> %s (%s)", count, "pass" if passed else "fail", summary)
        return passed

    if probe(0):
        result.met = True
        return result
    ranked = rank()
    ranked = ranked[: int(max_share * len(ranked))]
    if not ranked:
        return result
    low, high = 0, 1
    while high < len(ranked) and not probe(high):
        low, high = high, min(2 * high, len(ranked))
    if high >= len(ranked) and not (result.probes[-1].kept_float == high and result.probes[-1].passed):
        if not probe(len(ranked)):
            result.kept_float = _reasons(ranked, "the closest to the int8 policy the allowed share of float nodes got")
            result.damage = _damage(ranked)
            return result
        high = len(ranked)
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle):
            high = middle
        else:
            low = middle
    result.met = True
    result.kept_float = _reasons(ranked[:high], "needed to meet the int8 policy")
    result.damage = _damage(ranked[:high])
    return result


def _damage(candidates: list[Candidate]) -> dict[str, float]:
    return {candidate.node: candidate.damage for candidate in candidates if candidate.damage is not None}


def _reasons(candidates: list[Candidate], why: str) -> dict[str, str]:
    return {
        candidate.node: f"mixed precision rank {index + 1}: alone in int8 it costs {candidate.damage or 0.0:.2e} "
        f"cosine (input {candidate.tensor!r}, {candidate.sqnr_db:.1f} dB SQNR); {why}"
        for index, candidate in enumerate(candidates)
    }
