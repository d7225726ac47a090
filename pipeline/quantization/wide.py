"""Mixed int8 / int16 activations: for targets that run int16 x int8 products ("A16W8"), the fewest
activations moved to 16 bits that bring a model within the int8 policy, before any node is kept float.

A transformer's residual stream carries outlier channels (MiniLM: values to 220 where 99.9% stay
below 8) and its GELU outputs are one-sided: with one power-of-two scale per tensor, 8 bits give
those tensors 13-20 dB SQNR, and six layers of that leave MiniLM's embeddings at cosine 0.4. In 16
bits they lose nothing that matters, and the MatMuls reading them still run on the accelerator.
The candidates are ranked by their expected int8 SQNR from the calibration histograms (worst
first); the search (`mixed_precision.search`: doubling, then bisection) finds the shortest prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.calibration.histogram import TensorHistogram
from pipeline.quantization.mixed_precision import Candidate, expected_sqnr_db

INT16 = "int16"  # the op_type the candidates carry: they are tensors, not nodes


def int16_candidates(
    histograms: Mapping[str, TensorHistogram], ranges: Mapping[str, tuple[float, float]]
) -> list[Candidate]:
    """Every calibrated activation with regular values, lowest expected int8 SQNR first.

    Tensors that carried NaN, infinities or huge values are left out: their nodes stay float
    (`recipe.irregular_tensor_nodes`) and 16 bits would not make a mask quantizable either.
    """
    candidates = [
        Candidate(name, INT16, expected_sqnr_db(histogram, *ranges[name]), name)
        for name, histogram in histograms.items()
        if name in ranges and not (histogram.nonfinite or histogram.huge)
    ]
    return sorted(candidates, key=lambda candidate: (candidate.sqnr_db, candidate.node))


def describe_int16(tensors: list[str], ranked: list[Candidate]) -> dict[str, str]:
    """Why each tensor moved to int16: its rank and expected int8 SQNR."""
    by_name = {candidate.node: (index, candidate) for index, candidate in enumerate(ranked)}
    reasons = {}
    for name in tensors:
        index, candidate = by_name[name]
        reasons[name] = f"int16 rank {index + 1}: {candidate.sqnr_db:.1f} dB expected SQNR in int8"
    return reasons
