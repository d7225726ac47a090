"""Issue 7's acceptance: on MiniLM quantized badly (ONNX Runtime's quantize_static with its defaults:
every op it knows, MinMax ranges), the localisation names the layers responsible, and keeping
them in float measurably restores the sentence-embedding cosine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

from pipeline.parity.localize import localize


def _cosine(model: Path, reference: np.ndarray, batches: list[dict[str, np.ndarray]]) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    embeddings = np.concatenate([session.run(None, feeds)[0] for feeds in batches])
    norms = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
    return float(((embeddings * reference).sum(axis=1) / norms).mean())


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@pytest.mark.slow
def test_localisation_names_the_layers_and_excluding_them_restores_parity(
    minilm_models: dict[str, Path], tmp_path: Path
) -> None:
    from samples.minilm.data import calibration_feeds, evaluation_feeds

    fp32 = minilm_models["simplify"]  # the session's simplified MiniLM (read only; what is written goes to tmp_path)
    calibration, evaluation = list(calibration_feeds())[:2], list(evaluation_feeds())
    reference = np.concatenate([ort.InferenceSession(str(fp32)).run(None, feeds)[0] for feeds in evaluation])

    def quantize(target: Path, exclude: list[str]) -> Path:
        quantize_static(
            fp32,
            target,
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
        )
        return target

    bad = quantize(tmp_path / "bad.onnx", [])
    bad_cosine = _cosine(bad, reference, evaluation)
    # One batch of four sentences: the same culprits as the whole first batch, a third of the time.
    localisation = localize(ir.load(fp32), ir.load(bad), [{k: v[:4] for k, v in evaluation[0].items()}])

    worst = localisation.ranked[:8]
    # The attention-mask Adds, quantized with MinMax over float32's lowest value, lose everything.
    assert sum(step.op_type == "Add" and step.kind == "quantized" and step.local_sqnr_db < 1 for step in worst) >= 4
    assert localisation.first_diverging is not None
    culprits = localisation.responsible_nodes(8)
    fixed_cosine = _cosine(quantize(tmp_path / "fixed.onnx", culprits), reference, evaluation)
    assert bad_cosine < 0.5
    assert fixed_cosine > bad_cosine + 0.3, (bad_cosine, fixed_cosine, culprits)
