"""Unit tests of `ValidateStage` and `chain_links` on a tiny fp32 -> simplified -> int8 chain.

The fp32 model is a hand-built two-layer Gemm network whose weights are those of a small
``torch.nn.Module`` (the PyTorch root of the chain); the simplified model is made by
`SimplifyStage` and the int8 QDQ model by `QuantizeStage`, both run for real. The evaluation
data is an .npz read through a real `FeedSource`; every model runs in ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.artifacts import Artifact, sha256_file
from pipeline.distillation.summary import DistillationSummary, EpochRecord, ModelSize
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob
from pipeline.model_source import SourceModel
from pipeline.onnx_io import model_artifact
from pipeline.parity.chain import Link
from pipeline.records import (
    DistillRecord,
    ExportRecord,
    QuantizeRecord,
    SimplifyRecord,
    StageName,
    ValidateRecord,
)
from pipeline.stages.base import StageContext
from pipeline.stages.quantize import INT8_MODEL, QuantizeStage
from pipeline.stages.simplify import SIMPLIFIED_MODEL, SimplifyStage
from pipeline.stages.validate import PYTORCH, TEACHER, ValidateStage, chain_links
from tests.conftest import resolved_target

FP32_MODEL = "model.fp32.onnx"
FEATURES, HIDDEN, CLASSES = 6, 16, 4
CHAIN = [FP32_MODEL, SIMPLIFIED_MODEL, INT8_MODEL]
REPORTS = ["report.html", "report.json", "report.md"]


class TinyNet(torch.nn.Module):
    """logits = fc2(relu(fc1(x))): the PyTorch twin of the ONNX model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(FEATURES, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def write_onnx_twin(net: TinyNet, path: Path) -> Path:
    """The same network as ONNX: Gemm(transB) -> Relu -> Gemm, with a dead Identity to simplify away."""

    def weight(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["dead"], name="dead_identity"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1, name="fc2"),
        ],
        "tiny_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            weight(net.fc1.weight, "w1"),
            weight(net.fc1.bias, "b1"),
            weight(net.fc2.weight, "w2"),
            weight(net.fc2.bias, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def export_record(path: Path) -> ExportRecord:
    proto = onnx.load(str(path))
    return ExportRecord(
        exporter="test",
        opset=18,
        ir_version=proto.ir_version,
        external_data=False,
        nodes=len(proto.graph.node),
        inputs=[value.name for value in proto.graph.input],
        outputs=[value.name for value in proto.graph.output],
        seconds={},
    )


def make_job(data: Path, out: Path, **sections: Any) -> ConversionJob:
    """A classifier job over input x; calibration and (labelled) evaluation from the same .npz."""
    return ConversionJob.model_validate(
        {
            "name": "tiny_validate",
            "model": {"factory": "torch.nn:Identity", "task": "classification"},
            "inputs": [{"name": "x", "shape": ["batch", FEATURES]}],
            "calibration": {"npz": data, "labels": "label", "batch_size": 16},
            "evaluation": {"npz": data, "labels": "label", "batch_size": 16},
            "output_dir": out,
            "quantize": {"recipes": ["static"]},  # the search's other recipes are tested in test_quantize.py
            **sections,
        }
    )


def make_context(job: ConversionJob, workdir: Path, source: SourceModel) -> StageContext:
    feeds = {
        section: FeedSource(data, job.inputs, origin=job.origin, key=section, python_path=[])
        for section, data in (("calibration", job.calibration), ("evaluation", job.evaluation))
        if data is not None
    }
    return StageContext(
        job=job,
        workdir=workdir,
        source=source,
        calibration=feeds["calibration"],
        evaluation=feeds["evaluation"],
        targets=[resolved_target("cpu")],
    )


class Chain:
    """The three models and their artifacts, built once; `context` copies them into a fresh folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.net = TinyNet().eval()
        rng = np.random.default_rng(1)
        x = rng.normal(size=(48, FEATURES)).astype(np.float32)
        with torch.no_grad():
            labels = self.net(torch.from_numpy(x)).argmax(dim=1).numpy().astype(np.int64)
        self.data = folder / "data.npz"
        np.savez(self.data, x=x, label=labels)
        workdir = folder / "work"
        workdir.mkdir()
        fp32 = write_onnx_twin(self.net, workdir / FP32_MODEL)
        ctx = make_context(make_job(self.data, folder / "out"), workdir, SourceModel(module=self.net))
        ctx.artifacts[StageName.EXPORT] = model_artifact(StageName.EXPORT, fp32, None, export_record(fp32))
        ctx.artifacts[StageName.SIMPLIFY] = SimplifyStage().run(ctx)
        ctx.artifacts[StageName.QUANTIZE] = QuantizeStage().run(ctx)
        self.artifacts = dict(ctx.artifacts)

    def context(self, tmp_path: Path, source: SourceModel | None = None, **sections: Any) -> StageContext:
        workdir = tmp_path / "work"
        workdir.mkdir()
        for name in CHAIN:
            shutil.copy(self.folder / "work" / name, workdir / name)
        job = make_job(self.data, tmp_path / "out", **sections)
        ctx = make_context(job, workdir, source if source is not None else SourceModel(module=self.net))
        ctx.artifacts.update(self.artifacts)
        return ctx


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return Chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def validated(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> tuple[StageContext, Artifact, dict[str, Any]]:
    """ValidateStage run once on the PyTorch-rooted chain with the job's default policy."""
    ctx = chain.context(tmp_path_factory.mktemp("validated"))
    artifact = ValidateStage().run(ctx)
    return ctx, artifact, json.loads((ctx.workdir / "report.json").read_text())


def links_of(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(c["stage"], c["reference"], c["candidate"], c["precision"]) for c in report["comparisons"]]


def test_the_chain_is_built_from_typed_records(chain: Chain) -> None:
    # The fixture's own chain, so the tests below judge what they claim to judge.
    assert [a.stage for a in chain.artifacts.values()] == ["export", "simplify", "quantize"]
    assert [a.path for a in chain.artifacts.values()] == CHAIN
    assert isinstance(chain.artifacts["simplify"].record, SimplifyRecord)
    assert isinstance(chain.artifacts["quantize"].record, QuantizeRecord)
    assert chain.artifacts["quantize"].parent_sha256 == chain.artifacts["simplify"].sha256
    ops = [node.op_type for node in onnx.load(str(chain.folder / "work" / INT8_MODEL)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_writes_the_three_reports_and_a_validate_record(validated: tuple[StageContext, Artifact, Any]) -> None:
    ctx, artifact, report = validated

    assert artifact.stage == "validate"
    assert artifact.path == "report.json"
    assert artifact.sha256 == sha256_file(ctx.workdir / "report.json")
    assert isinstance(artifact.record, ValidateRecord)
    assert artifact.record.verdict == report["verdict"] == "pass"
    assert artifact.metadata == {"verdict": "pass"}
    assert sorted(p.name for p in ctx.workdir.iterdir()) == sorted([*CHAIN, *REPORTS])
    assert report["failures"] == []
    assert report["samples"] == 48
    markdown = (ctx.workdir / "report.md").read_text()
    html = (ctx.workdir / "report.html").read_text()
    assert "tiny_validate" in markdown and "tiny_validate" in html
    assert INT8_MODEL in markdown and INT8_MODEL in html


def test_comparisons_follow_the_chain_from_pytorch(validated: tuple[StageContext, Artifact, Any]) -> None:
    _, _, report = validated

    assert links_of(report) == [
        ("export", PYTORCH, FP32_MODEL, "fp32"),
        ("simplify", FP32_MODEL, SIMPLIFIED_MODEL, "fp32"),
        ("quantize", SIMPLIFIED_MODEL, INT8_MODEL, "int8"),
    ]
    assert {c["target"] for c in report["comparisons"]} == {"cpu"}
    export, simplify, quantize = report["comparisons"]
    # The ONNX twin is PyTorch's network; simplify only dropped a dead node; int8 is close, not equal.
    assert export["outputs"][0]["metrics"]["max_abs"] < 1e-5
    assert simplify["outputs"][0]["metrics"]["max_abs"] == 0
    assert 0 < quantize["outputs"][0]["metrics"]["max_abs"]
    assert quantize["outputs"][0]["metrics"]["cosine_mean"] > 0.99
    # Labelled data and a [batch, classes] output: accuracy is measured on the int8 link.
    assert quantize["accuracy"]["output"] == "logits"
    assert quantize["accuracy"]["reference"] == 1.0  # the labels are the network's own argmax
    # The int8 model is timed against the model it was quantized from.
    assert [p["target"] for p in report["performance"]] == ["cpu"]


def test_an_onnx_file_source_starts_the_chain_at_the_first_model(chain: Chain, tmp_path: Path) -> None:
    ctx = chain.context(tmp_path, source=SourceModel(module=None, onnx_file=chain.folder / "work" / FP32_MODEL))

    links = chain_links(ctx)
    artifact = ValidateStage().run(ctx)

    assert [(link.stage, link.reference, link.candidate, link.precision) for link in links] == [
        ("simplify", FP32_MODEL, SIMPLIFIED_MODEL, "fp32"),
        ("quantize", SIMPLIFIED_MODEL, INT8_MODEL, "int8"),
    ]
    report = json.loads((ctx.workdir / "report.json").read_text())
    assert links_of(report) == [(link.stage, link.reference, link.candidate, link.precision) for link in links]
    assert all(PYTORCH not in (c["reference"], c["candidate"]) for c in report["comparisons"])
    assert any("came as an ONNX file" in note for note in report["notes"])
    assert artifact.record_as(ValidateRecord).verdict == "pass"


def test_an_unreachable_int8_policy_fails_naming_stage_target_and_output(chain: Chain, tmp_path: Path) -> None:
    ctx = chain.context(tmp_path, parity={"int8": {"min_cosine": 0.9999999}, "localize": "never"})

    artifact = ValidateStage().run(ctx)

    assert artifact.record_as(ValidateRecord).verdict == "fail"
    report = json.loads((ctx.workdir / "report.json").read_text())
    assert report["verdict"] == "fail"
    assert len(report["failures"]) == 1
    (line,) = report["failures"]
    assert line.startswith("stage quantize on cpu, output 'logits':")
    assert "cosine" in line
    verdicts = {
        c["stage"]: all(check["passed"] for o in c["outputs"] for check in o["checks"]) for c in report["comparisons"]
    }
    assert verdicts == {"export": True, "simplify": True, "quantize": False}
    markdown = (ctx.workdir / "report.md").read_text()
    assert "FAIL" in markdown


def test_a_failed_link_between_onnx_models_is_localised(chain: Chain, tmp_path: Path) -> None:
    ctx = chain.context(tmp_path, parity={"int8": {"min_cosine": 0.9999999}, "localize": "on_failure"})

    ValidateStage().run(ctx)

    report = json.loads((ctx.workdir / "report.json").read_text())
    assert [(loc["reference"], loc["candidate"]) for loc in report["localisations"]] == [(SIMPLIFIED_MODEL, INT8_MODEL)]


def test_an_output_override_for_a_missing_output_is_a_job_error(chain: Chain, tmp_path: Path) -> None:
    ctx = chain.context(tmp_path, parity={"outputs": {"embedding": {"int8": {"min_cosine": 0.5}}}})

    with pytest.raises(pipeline.JobError) as caught:
        ValidateStage().run(ctx)

    assert caught.value.key == "parity.outputs.embedding"
    assert "'embedding'" in caught.value.problem and "logits" in caught.value.problem
    assert not any((ctx.workdir / name).exists() for name in REPORTS)


def test_an_output_override_replaces_the_job_wide_rule_for_that_output(chain: Chain, tmp_path: Path) -> None:
    strict = {"int8": {"min_cosine": 0.9999999}}
    ctx = chain.context(tmp_path, parity={**strict, "outputs": {"logits": {"int8": {"min_cosine": 0.5}}}})

    artifact = ValidateStage().run(ctx)

    assert artifact.record_as(ValidateRecord).verdict == "pass"


def _distill_record() -> DistillRecord:
    size = ModelSize(parameters=10, state_bytes=40, latency_ms=0.1, score=1.0)
    return DistillRecord(
        summary=DistillationSummary(
            student="students:small",
            loss="mse",
            temperature=4.0,
            alpha=None,
            metric="cosine",
            validation="evaluation",
            teacher=size,
            student_model=size,
            batch_shape={"x": [16, FEATURES]},
            epochs_planned=1,
            best_epoch=1,
            stopped_early=False,
            resumed_from=None,
            history=[EpochRecord(epoch=1, learning_rate=0.1, train_loss=0.5, score=0.9, seconds=0.1)],
            checkpoints="checkpoints",
        )
    )


def test_a_distilled_chain_starts_teacher_then_pytorch(chain: Chain, tmp_path: Path) -> None:
    ctx = chain.context(tmp_path)
    ctx.artifacts = {
        StageName.DISTILL: Artifact(
            stage=StageName.DISTILL, path="student.safetensors", sha256="0" * 64, record=_distill_record()
        ),
        **ctx.artifacts,
    }
    ctx.targets = [resolved_target("cpu"), resolved_target("cuda")]  # only described, never opened

    links = chain_links(ctx)

    per_target = [
        ("distill", TEACHER, PYTORCH, "distilled"),
        ("export", PYTORCH, FP32_MODEL, "fp32"),
        ("simplify", FP32_MODEL, SIMPLIFIED_MODEL, "fp32"),
        ("quantize", SIMPLIFIED_MODEL, INT8_MODEL, "int8"),
    ]
    assert [(link.target, link.stage, link.reference, link.candidate, link.precision) for link in links] == [
        (target, *link) for target in ("cpu", "cuda") for link in per_target
    ]
    assert links[0] == Link.on_target("distill", "cpu", TEACHER, PYTORCH, "distilled")
    assert links[0].reference_run == ("cpu", TEACHER) and links[0].candidate_run == ("cpu", PYTORCH)


def test_validate_is_always_enabled_and_never_cached(validated: tuple[StageContext, Artifact, Any]) -> None:
    ctx, _, _ = validated

    assert ValidateStage().enabled(ctx.job)
    assert ValidateStage().key(ctx) is None
