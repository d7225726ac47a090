"""Distillation end to end on the digits sample: a quarter-size student, trained, converted to int8,
run on the CPU and FPGA-style backends with its parity chain; resume and seed determinism."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import safetensors.torch

import pipeline
from pipeline.distillation.checkpoint import checkpoint_files
from samples.digits_cnn.student import build_student
from tests.conftest import DIGITS_DIR, sample_job, tree

Raw = dict[str, Any]


def distill_job(tmp_path: Path, *, epochs: int, targets: tuple[str, ...] = ("cpu",), **distill: Any) -> Raw:
    """The sample's distillation job writing into `tmp_path`, with fewer epochs."""
    raw = copy.deepcopy(sample_job(DIGITS_DIR, "job_distilled.toml"))
    raw["targets"] = [{"backend": name} for name in targets]
    raw["output_dir"] = str(tmp_path / "out")
    raw["distill"].update(epochs=epochs, checkpoint_dir=str(tmp_path / "checkpoints"), **distill)
    return raw


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> tuple[pipeline.ConversionResult, list[pipeline.StageEvent]]:
    tmp_path = tmp_path_factory.mktemp("distill")
    events: list[pipeline.StageEvent] = []
    job = pipeline.validate_job(distill_job(tmp_path, epochs=20, targets=("cpu", "fpga")), origin="test")
    return pipeline.convert(job, on_event=events.append), events


def test_the_student_is_a_quarter_of_the_teacher_and_keeps_its_accuracy(distilled: Any) -> None:
    result, _ = distilled
    summary = result.report.distillation
    assert summary is not None
    assert summary.student_model.parameters <= summary.teacher.parameters / 4
    assert summary.loss == "kd" and summary.alpha == 0.5 and summary.metric == "accuracy"
    link = next(c for c in result.report.comparisons if c.stage == "distill" and c.target == "cpu")
    assert (link.reference, link.candidate, link.precision) == ("teacher", "pytorch", "distilled")
    assert link.accuracy is not None and link.accuracy.check is not None and link.accuracy.check.passed
    assert link.accuracy.candidate >= link.accuracy.reference - 0.01  # within 1 point on the held-out images
    assert result.report.verdict == "pass"


def test_the_student_is_what_gets_exported_and_quantized(distilled: Any) -> None:
    result, _ = distilled
    out = result.output_dir
    weights = safetensors.torch.load_file(str(out / "student.safetensors"))
    build_student().load_state_dict(weights, strict=True)  # the factory's model, nothing else
    export = next(c for c in result.report.comparisons if c.stage == "export" and c.target == "cpu")
    assert export.reference == "pytorch" and export.passed
    fp32 = onnx.load(str(out / "model.fp32.onnx"))
    stored = sum(int(np.prod(init.dims)) for init in fp32.graph.initializer)
    assert stored < result.report.distillation.teacher.parameters / 4 + 200  # + BatchNorm statistics


def test_the_student_runs_int8_on_the_fpga_backend_with_parity(distilled: Any) -> None:
    result, _ = distilled
    fpga = next(p for p in result.report.placements if p.backend == "fpga")
    assert fpga.fallback_share == 0 and fpga.accelerator is not None
    (on_target,) = result.report.on_target
    assert on_target.target == "fpga" and on_target.passed
    assert {c.stage for c in result.report.comparisons if c.target == "fpga"} == {
        "distill",
        "export",
        "simplify",
        "quantize",
    }
    markdown = (result.output_dir / "report.md").read_text()
    assert "## Distillation" in markdown and "| student / teacher | 0.23x |" in markdown


def test_each_epoch_reports_progress(distilled: Any) -> None:
    result, events = distilled
    progress = [e for e in events if e.status == "progress"]
    assert [e.done for e in progress] == [r.epoch for r in result.report.distillation.history]
    assert all(e.stage == "distill" and e.total == 20 and "held-out accuracy" in e.detail for e in progress)


FLAKY_DATA = """
    import numpy as np
    from pathlib import Path

    MARKER = Path({marker!r})

    def batches(epoch):
        if epoch == 3 and MARKER.exists():
            raise RuntimeError("interrupted in epoch 3")
        with np.load({data!r}) as archive:
            images, labels = archive["image"], archive["label"]
        order = np.random.default_rng(epoch).permutation(len(labels))
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            yield {{"image": images[rows], "label": labels[rows]}}
"""


@pytest.mark.slow  # ~11 s; tests/unit/distillation/test_trainer.py resumes bit-exactly in the default run
def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "interrupt"
    marker.touch()
    package = tmp_path / "flaky_digits_data"
    package.mkdir()
    data = DIGITS_DIR / "data" / "train.npz"
    (package / "__init__.py").write_text(textwrap.dedent(FLAKY_DATA.format(marker=str(marker), data=str(data))))
    raw = distill_job(tmp_path, epochs=4, data={"factory": "flaky_digits_data:batches", "labels": "label"})
    raw["python_path"].append(str(tmp_path))
    job = pipeline.validate_job(raw, origin="test")
    checkpoints = tmp_path / "checkpoints"

    with pytest.raises(pipeline.StageError, match="interrupted in epoch 3"):
        pipeline.convert(job)
    assert not (tmp_path / "out").exists()  # nothing published
    (folder,) = checkpoints.iterdir()
    assert [path.name for path in checkpoint_files(folder)][-1] == "epoch-0002.safetensors"

    marker.unlink()
    resumed = pipeline.convert(job).report.distillation
    uninterrupted = pipeline.convert(job, output_dir=tmp_path / "again")  # same job, resume on: no training
    fresh_job = job.model_copy(
        update={"distill": job.distill.model_copy(update={"checkpoint_dir": tmp_path / "fresh"})}
    )
    fresh = pipeline.convert(fresh_job, output_dir=tmp_path / "fresh_out")

    assert resumed is not None and resumed.resumed_from == 2 and len(resumed.history) == 4
    assert uninterrupted.report.distillation.resumed_from == 4
    assert fresh.report.distillation.resumed_from is None
    student = (tmp_path / "out" / "student.safetensors").read_bytes()
    assert student == (tmp_path / "fresh_out" / "student.safetensors").read_bytes()
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in fresh.report.distillation.history]


@pytest.mark.slow  # ~10 s; the unit trainer tests check seed determinism in the default run
def test_same_seed_same_student_other_seed_other_student(tmp_path: Path) -> None:
    students = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        raw = distill_job(tmp_path / run, epochs=3, seed=seed)
        raw["parity"]["distill"] = {"max_accuracy_drop": 100.0}  # 3 epochs: about sameness, not accuracy
        pipeline.convert(pipeline.validate_job(raw, origin="test"))
        students.append((tmp_path / run / "out" / "student.safetensors").read_bytes())
    assert students[0] == students[1]
    assert students[0] != students[2]
    assert not any(name.startswith(".") for name in tree(tmp_path / "a" / "out"))
