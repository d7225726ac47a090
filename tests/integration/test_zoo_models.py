"""The model zoo (benchmarks/zoo): every factory builds and runs, every job validates, every model exports.

The default run checks each generated job table against the job schema and builds each
hand-written model (untrained: training only happens when a job or the zoo runner asks for
weights) and runs it on one calibration batch. The ``slow`` part (``--run-slow``): the same for
the transformers models (importing transformers takes ~10 s), and every model's export through
``torch.onnx.export(dynamo=True)`` with the job's dynamic dims, checked in ONNX Runtime against
PyTorch at another batch size (5-20 s a model).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import pipeline
from benchmarks.zoo.jobs import job_table
from benchmarks.zoo.models import ZOO, ZooModel, build
from pipeline.stages.export import torch_dynamic_shapes

NAMES = list(ZOO)
# Importing transformers alone takes ~10 s on 2 busy cores: its models run forward only with --run-slow.
FORWARD = [pytest.param(n, marks=pytest.mark.slow) if ZOO[n].train is None else n for n in NAMES]


def _batch(entry: ZooModel, size: int = 4) -> dict[str, np.ndarray]:
    """The first ``size`` calibration samples of the model's inputs."""
    train = entry.split().train
    return {name: np.ascontiguousarray(train[name][:size]) for name in entry.input_names}


def _outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.detach().numpy() for t in (result if isinstance(result, tuple) else (result,))]


def _validated(entry: ZooModel, targets: list[str], folder: Path) -> pipeline.ConversionJob:
    """The job table of ``entry`` validated, with small data files beside it (the schema checks them)."""
    batch = _batch(entry)
    np.savez(folder / "calibration.npz", **batch)
    np.savez(folder / "evaluation.npz", **batch, label=np.zeros(4, dtype=np.int64))
    return pipeline.validate_job(job_table(entry, targets, None), origin="zoo", base_dir=folder)


def test_the_zoo_has_eight_families() -> None:
    assert len(ZOO) >= 8


@pytest.mark.parametrize("name", FORWARD)
def test_factory_builds_and_runs_a_calibration_batch(name: str) -> None:
    entry = ZOO[name]
    batch = _batch(entry)
    with torch.no_grad():
        outputs = _outputs(build(name)(*(torch.from_numpy(batch[n]) for n in entry.input_names)))
    assert len(outputs) == len(entry.output_names)
    assert all(out.shape[0] == 4 and np.isfinite(out).all() for out in outputs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets", [["cpu"], ["cpu", "fpga"]])
def test_job_table_validates(name: str, targets: list[str], tmp_path: Path) -> None:
    entry = ZOO[name]
    job = _validated(entry, targets, tmp_path)
    assert [spec.name for spec in job.inputs] == entry.input_names
    assert [t.backend for t in job.targets] == targets
    assert (job.evaluation is not None and job.evaluation.labels == "label") == entry.labels


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_exports_with_dynamo_and_matches_in_onnxruntime(name: str, tmp_path: Path) -> None:
    entry = ZOO[name]
    model = build(name)
    batch = _batch(entry)
    job = _validated(entry, ["cpu"], tmp_path)
    example = tuple(torch.from_numpy(batch[n]) for n in entry.input_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=entry.input_names,
            output_names=list(entry.output_names),
            dynamic_shapes=torch_dynamic_shapes(job.inputs),
            opset_version=18,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    small = {n: v[:2] for n, v in batch.items()}  # another batch size than exported with
    got = session.run(None, small)
    with torch.no_grad():
        expected = _outputs(model(*(torch.from_numpy(small[n]) for n in entry.input_names)))
    for out, ref in zip(got, expected, strict=True):
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
