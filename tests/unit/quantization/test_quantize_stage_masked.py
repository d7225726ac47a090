"""`QuantizeStage` on a masked-attention model whose calibration data carries -inf (an attention mask).

ONNX Runtime's own Entropy / Percentile calibrators crash on such data; the stage must not, must
report the tensor, and must keep the nodes touching it in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.job import ConversionJob
from pipeline.stages.base import StageContext
from pipeline.stages.quantize import INT8_MODEL, QuantizeStage
from tests.conftest import stage_context
from tests.unit.calibration.masked_attention import (
    FEATURES,
    MASK,
    MASK_ADD,
    MASKED,
    OUT_PROJ,
    QK,
    SOFTMAX,
    X,
    Y,
    masked_attention_data,
    save_masked_attention_model,
)


def masked_job(tmp_path: Path, method: str) -> ConversionJob:
    npz = tmp_path / "calibration.npz"
    np.savez(npz, **masked_attention_data(64))
    return ConversionJob.model_validate(
        {
            "name": "masked_attention",
            "model": {"factory": "torch.nn:Identity"},
            "inputs": [{"name": X, "shape": ["batch", FEATURES]}, {"name": MASK, "shape": ["batch", FEATURES]}],
            "calibration": {"npz": npz, "batch_size": 16},
            "quantize": {"calibration_method": method, "calibration_cache": False, "recipes": ["static"]},
            "targets": [{"backend": "cpu"}],
            "output_dir": tmp_path / "out",
        }
    )


def masked_context(tmp_path: Path, job: ConversionJob) -> StageContext:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return stage_context(job, save_masked_attention_model(workdir / "model.simplified.onnx"), after="simplify")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_stage_survives_infinite_masks_and_keeps_them_float(tmp_path: Path, method: str) -> None:
    ctx = masked_context(tmp_path, masked_job(tmp_path, method))

    artifact = QuantizeStage().run(ctx)

    metadata = artifact.metadata
    assert metadata["calibration"]["method"] == method
    assert metadata["calibration"]["cache_hit"] is False
    irregular = metadata["calibration"]["irregular_tensors"]
    assert set(irregular) == {MASK, MASKED}
    data = masked_attention_data(64)
    calibrated = data[MASK][:48]  # batches of 16: the fourth is held out for judging, not calibrated on
    assert irregular[MASK] == {"nonfinite": int(np.isinf(calibrated).sum()), "huge": 0}
    assert irregular[MASKED]["nonfinite"] == irregular[MASK]["nonfinite"]
    kept = metadata["kept_float"]
    assert {MASK_ADD, SOFTMAX} <= set(kept)
    assert MASKED in kept[SOFTMAX] and "non-finite" in kept[SOFTMAX]
    assert QK not in kept  # ordinary compute nodes are still quantized

    model = onnx.load(str(ctx.workdir / INT8_MODEL))
    onnx.checker.check_model(model)
    quantized_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert MASK not in quantized_inputs and MASKED not in quantized_inputs  # -inf never meets a QuantizeLinear
    assert metadata["quantize_linear"] >= 1

    # The int8 model still masks: masked positions get no attention, outputs stay finite and close.
    feeds = {name: array[:16] for name, array in data.items()}
    (reference,) = ort.InferenceSession(str(ctx.path_of("simplify"))).run([Y], feeds)
    (candidate,) = ort.InferenceSession(str(ctx.workdir / INT8_MODEL)).run([Y], feeds)
    assert np.all(np.isfinite(candidate))
    cosine = np.sum(reference * candidate) / (np.linalg.norm(reference) * np.linalg.norm(candidate))
    assert cosine > 0.98
    assert OUT_PROJ in {n.name for n in model.graph.node}
