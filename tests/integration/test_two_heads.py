"""A classifier with a second, embedding head: only the classifier output is judged as one.

The mixed-precision search once applied top-1 agreement and the accuracy-drop bound to every
output; an embedding's argmax flips under int8 noise without meaning anything, so the search kept
both heads float and shipped an int8 model slower than float, while validation passed. Both now
judge through the one parity engine.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import pipeline
from pipeline.records import QuantizeRecord

FACTORY = textwrap.dedent(
    """
    import torch


    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU())
            self.classify = torch.nn.Linear(64, 10)
            self.embed = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.trunk(x)
            return self.classify(features), self.embed(features)


    def build() -> torch.nn.Module:
        return TwoHeads().eval()
    """
)


def _data(folder: Path) -> tuple[Path, Path]:
    """Calibration data without labels; evaluation data labelled by the float model itself, keeping
    only samples whose top two logits are well apart (so int8 cannot flip the class)."""
    import sys

    sys.path.insert(0, str(folder))
    try:
        from two_heads import build  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 32)).astype(np.float32)
    with torch.no_grad():
        logits = build()(torch.from_numpy(x))[0].numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = x[(top2[:, 1] - top2[:, 0]) > 0.5 * logits.std()]
    calibration, evaluation = clear[:256], clear[256:768]
    with torch.no_grad():
        labels = build()(torch.from_numpy(evaluation))[0].numpy().argmax(axis=1)
    np.savez(folder / "calibration.npz", x=calibration)
    np.savez(folder / "evaluation.npz", x=evaluation, y=labels)
    return folder / "calibration.npz", folder / "evaluation.npz"


def test_full_int8_passes_and_nothing_is_kept_float_for_an_embedding_head(tmp_path: Path) -> None:
    (tmp_path / "two_heads.py").write_text(FACTORY)
    calibration, evaluation = _data(tmp_path)
    job = pipeline.validate_job(
        {
            "name": "two-heads",
            "model": {"factory": "two_heads:build", "output_names": ["logits", "embedding"]},
            "inputs": [{"name": "x", "shape": ["batch", 32]}],
            "calibration": {"npz": str(calibration), "batch_size": 64},
            "evaluation": {"npz": str(evaluation), "labels": "y", "batch_size": 64},
            "parity": {"int8": {"max_accuracy_drop": 1.0}, "localize": "never"},
            "output_dir": str(tmp_path / "out"),
            "python_path": [str(tmp_path)],
        },
        origin="two-heads test",
    )

    result = pipeline.convert(job)

    record = result.artifacts["quantize"].record_as(QuantizeRecord)
    assert [probe.kept_float for probe in record.mixed_precision_probes] == [0]
    assert record.mixed_precision_probes[0].passed
    assert not record.kept_float
    int8 = next(c for c in result.report.comparisons if c.stage == "quantize")
    embedding = next(output for output in int8.outputs if output.name == "embedding")
    assert embedding.metrics.top1_agreement is None
    assert {check.metric for check in embedding.checks} == {"nan_inf_count", "cosine_mean"}
    assert int8.accuracy is not None and int8.accuracy.output == "logits"
    # The trap is real: the embedding's argmax does flip under int8 on more than the 1% the
    # accuracy-drop bound allows, so judging it as a classifier would have failed the policy.
    feeds = {"x": np.load(evaluation)["x"]}
    fp32, quantized = (
        ort.InferenceSession(str(result.path(stage)), providers=["CPUExecutionProvider"]).run(["embedding"], feeds)[0]
        for stage in ("simplify", "quantize")
    )
    assert (fp32.argmax(axis=1) == quantized.argmax(axis=1)).mean() < 0.99
