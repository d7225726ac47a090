"""Unit tests of `QuantizeStage` and `resolve_activation_type` on a small hand-built Conv + MatMul model.

Calibration data comes from an .npz read through a real `FeedSource`; the int8 model is run in
ONNX Runtime and compared with the fp32 model it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.artifacts import Artifact, sha256_file
from pipeline.job import ConversionJob
from pipeline.quantization.targets import resolve_activation_type
from pipeline.records import QuantizeRecord
from pipeline.stages.base import TRUNK, StageContext, Target
from pipeline.stages.quantize import INT8_MODEL, QuantizeStage
from tests.conftest import resolved_target, stage_context

CONV_OUT = 4
CLASSES = 5


def write_conv_model(path: Path) -> Path:
    """logits = Flatten(Relu(Conv(x))) @ W2 + b2; x: [batch, 3, 8, 8], logits: [batch, 5]."""
    rng = np.random.default_rng(0)
    # Very different magnitudes per output channel, so per-channel scales must differ.
    conv_w = (rng.normal(size=(CONV_OUT, 3, 3, 3)) * np.array([0.05, 0.3, 1.0, 2.0])[:, None, None, None]).astype(
        np.float32
    )
    conv_b = rng.normal(scale=0.1, size=CONV_OUT).astype(np.float32)
    fc_w = (rng.normal(size=(CONV_OUT * 8 * 8, CLASSES)) * 0.1).astype(np.float32)
    fc_b = rng.normal(scale=0.1, size=CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("Flatten", ["relu"], ["flat"], axis=1, name="flatten"),
            helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc"),
            helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"),
        ],
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def make_target(name: str) -> Target:
    """A resolved target (the backend is only described, never opened)."""
    return resolved_target(name)


def make_job(tmp_path: Path, quantize: dict[str, Any] | None = None, targets: list[str] | None = None) -> ConversionJob:
    """A job over input x with .npz calibration data (written once per tmp_path); the search tries
    only the static recipe unless `quantize` says otherwise (tests/unit/quantization/test_search.py
    covers the others)."""
    npz = tmp_path / "calibration.npz"
    if not npz.exists():
        np.savez(npz, x=np.random.default_rng(1).normal(size=(48, 3, 8, 8)).astype(np.float32))
    return ConversionJob.model_validate(
        {
            "name": "tiny_quantize",
            "model": {"factory": "torch.nn:Identity"},
            "inputs": [{"name": "x", "shape": ["batch", 3, 8, 8]}],
            "calibration": {"npz": npz, "batch_size": 16},
            "quantize": {"recipes": ["static"], **(quantize or {})},
            "targets": [{"backend": name} for name in targets or ["cpu"]],
            "output_dir": tmp_path / "out",
        }
    )


def make_context(tmp_path: Path, job: ConversionJob, targets: list[Target]) -> StageContext:
    """A context whose newest model is the fp32 Conv model, as after the simplify stage."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    return stage_context(job, write_conv_model(workdir / "model.simplified.onnx"), after="simplify", targets=targets)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def weight_dequantizers(model: onnx.ModelProto, weight: str) -> onnx.NodeProto:
    """The DequantizeLinear node feeding the (quantized) weight `weight` to its consumer."""
    found = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(weight)]
    assert len(found) == 1, [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return found[0]


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x})[0]


@pytest.fixture
def quantized(tmp_path: Path) -> tuple[StageContext, Artifact]:
    """The stage run once with the job defaults on a cpu target."""
    ctx = make_context(tmp_path, make_job(tmp_path), [make_target("cpu")])
    return ctx, QuantizeStage().run(ctx)


def test_produces_a_qdq_model(quantized: tuple[StageContext, Artifact]) -> None:
    ctx, artifact = quantized

    assert artifact.stage == "quantize"
    assert artifact.path == INT8_MODEL
    path = ctx.workdir / INT8_MODEL
    assert artifact.sha256 == sha256_file(path)
    assert artifact.parent_sha256 == ctx.artifacts["simplify"].sha256
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2
    assert ops.count("DequantizeLinear") >= 4  # activations plus both weights
    assert {"Conv", "MatMul"} <= set(ops)  # QDQ keeps the float ops between Q/DQ pairs
    metadata = artifact.metadata
    assert metadata["format"] == "QDQ"
    assert metadata["quantize_linear"] == ops.count("QuantizeLinear")
    assert metadata["dequantize_linear"] == ops.count("DequantizeLinear")
    assert metadata["nodes"] == len(ops)
    assert metadata["calibration"]["batches"] == 3  # 48 samples in batches of 16: too few to hold one out
    assert metadata["activation_type"] == "uint8"
    assert metadata["activation_symmetric"] is False
    assert metadata["weight_type"] == "int8"
    assert metadata["per_channel"] is True
    assert sorted(p.name for p in ctx.workdir.iterdir()) == [INT8_MODEL, "model.simplified.onnx"]


def test_weights_are_int8_with_one_scale_per_output_channel(quantized: tuple[StageContext, Artifact]) -> None:
    ctx, _ = quantized
    model = onnx.load(str(ctx.workdir / INT8_MODEL))
    values = initializers(model)

    conv = weight_dequantizers(model, "conv_w")
    assert values[conv.input[0]].dtype == np.int8
    assert values[conv.input[0]].shape == (CONV_OUT, 3, 3, 3)
    conv_scale = values[conv.input[1]]
    assert conv_scale.shape == (CONV_OUT,)
    assert len(np.unique(conv_scale)) == CONV_OUT
    assert not np.any(values[conv.input[2]])  # symmetric weights: zero points 0

    fc = weight_dequantizers(model, "fc_w")
    assert values[fc.input[0]].dtype == np.int8
    assert values[fc.input[1]].shape == (CLASSES,)


def test_activations_are_uint8_for_cpu(quantized: tuple[StageContext, Artifact]) -> None:
    ctx, _ = quantized
    model = onnx.load(str(ctx.workdir / INT8_MODEL))
    values = initializers(model)

    zero_points = [values[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points
    assert all(zp.dtype == np.uint8 for zp in zero_points)


def test_int8_model_matches_fp32(quantized: tuple[StageContext, Artifact]) -> None:
    ctx, _ = quantized
    x = np.random.default_rng(7).normal(size=(16, 3, 8, 8)).astype(np.float32)

    reference = run(ctx.path_of("simplify"), x)
    candidate = run(ctx.workdir / INT8_MODEL, x)

    assert candidate.shape == reference.shape == (16, CLASSES)
    assert np.all(np.isfinite(candidate))
    assert not np.array_equal(candidate, reference)  # it really is quantized
    cosine = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    )
    assert cosine.min() > 0.99


def test_cuda_target_gets_symmetric_int8_activations(tmp_path: Path) -> None:
    # Quantizing for cuda only reads the backend's capabilities; it never opens it.
    ctx = make_context(tmp_path, make_job(tmp_path, targets=["cuda"]), [make_target("cuda")])

    artifact = QuantizeStage().run(ctx)

    assert artifact.metadata["activation_type"] == "int8"
    assert artifact.metadata["activation_symmetric"] is True
    model = onnx.load(str(ctx.workdir / INT8_MODEL))
    values = initializers(model)
    zero_points = [values[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points
    assert all(zp.dtype == np.int8 and not np.any(zp) for zp in zero_points)


def test_resolve_activation_type_uint8_for_cpu(tmp_path: Path) -> None:
    assert resolve_activation_type(make_job(tmp_path), [make_target("cpu")]) == "uint8"


def test_resolve_activation_type_int8_when_a_target_requires_it(tmp_path: Path) -> None:
    job = make_job(tmp_path, targets=["cpu", "cuda"])

    assert resolve_activation_type(job, [make_target("cpu"), make_target("cuda")]) == "int8"
    assert resolve_activation_type(job, [make_target("cuda")]) == "int8"


def test_resolve_activation_type_honours_a_supported_request(tmp_path: Path) -> None:
    job = make_job(tmp_path, quantize={"activation_type": "int8"})

    assert resolve_activation_type(job, [make_target("cpu"), make_target("cuda")]) == "int8"


def test_resolve_activation_type_rejects_uint8_for_an_int8_only_target(tmp_path: Path) -> None:
    job = make_job(tmp_path, quantize={"activation_type": "uint8"}, targets=["cpu", "cuda"])

    with pytest.raises(pipeline.JobError) as caught:
        resolve_activation_type(job, [make_target("cpu"), make_target("cuda")])

    assert caught.value.key == "quantize.activation_type"
    assert "'cuda'" in caught.value.problem
    assert "uint8" in caught.value.problem


def test_stage_raises_job_error_before_writing_anything(tmp_path: Path) -> None:
    job = make_job(tmp_path, quantize={"activation_type": "uint8"}, targets=["cuda"])
    ctx = make_context(tmp_path, job, [make_target("cuda")])

    with pytest.raises(pipeline.JobError):
        QuantizeStage().run(ctx)

    assert not (ctx.workdir / INT8_MODEL).exists()


def test_enabled_follows_the_job(tmp_path: Path) -> None:
    assert QuantizeStage().enabled(make_job(tmp_path))
    assert not QuantizeStage().enabled(make_job(tmp_path, quantize={"enabled": False}))


def test_targets_with_different_constraints_get_their_own_int8_models(tmp_path: Path) -> None:
    job = make_job(tmp_path, targets=["cpu", "fpga"])
    targets = [make_target("cpu"), make_target("fpga")]
    ctx = make_context(tmp_path, job, targets)
    stage = QuantizeStage()

    branches = stage.branches(ctx)
    assert [(b.name, b.targets) for b in branches] == [("cpu", ("cpu",)), ("fpga", ("fpga",))]
    artifacts = {}
    for branch in branches:
        ctx.branch = branch
        artifacts[branch.name] = stage.run(ctx)
        ctx.artifacts[branch.artifact_key(stage.name)] = artifacts[branch.name]

    cpu, fpga = artifacts["cpu"], artifacts["fpga"]
    assert (cpu.path, cpu.targets) == ("model.int8.cpu.onnx", ["cpu"])
    assert (fpga.path, fpga.targets) == ("model.int8.fpga.onnx", ["fpga"])
    # The FPGA's constraints shape its model only: the cpu model keeps per-channel, unconstrained scales.
    assert cpu.metadata["per_channel"] and not cpu.metadata["power_of_two_scales"]
    assert not fpga.metadata["per_channel"] and fpga.metadata["power_of_two_scales"]
    cpu_model = onnx.load(str(ctx.workdir / cpu.path))
    scales = initializers(cpu_model)[weight_dequantizers(cpu_model, "conv_w").input[1]]
    assert not np.all(np.log2(scales) == np.round(np.log2(scales)))
    assert [a.path for a in ctx.model_chain("fpga")] == ["model.simplified.onnx", "model.int8.fpga.onnx"]
    assert [a.path for a in ctx.model_chain("cpu")] == ["model.simplified.onnx", "model.int8.cpu.onnx"]
    assert [a.path for a in ctx.model_chain()] == ["model.simplified.onnx"]
    keys = set()
    for branch in branches:  # the stage cache keys each branch separately
        ctx.branch = branch
        keys.add(stage.key(ctx))
    assert len(keys) == 2


def test_targets_that_agree_share_one_int8_model(tmp_path: Path) -> None:
    # A second target on the same backend under another name (as a plugin registering the CPU
    # provider again would be): same constraints, so one model for both.
    job = make_job(tmp_path)
    twin = make_target("cpu")
    twin = Target(spec=twin.spec.model_copy(update={"backend": "cpu_twin"}), backend=twin.backend, options=twin.options)
    ctx = make_context(tmp_path, job, [make_target("cpu"), twin])

    assert QuantizeStage().branches(ctx) == [TRUNK]
    assert QuantizeStage().run(ctx).path == INT8_MODEL


def test_the_search_records_every_candidate_and_ships_one(tmp_path: Path) -> None:
    # A small budget: each passing candidate is timed for a second or so, not five.
    recipes = ["static", "dynamic", "static_int8_activations"]
    job = make_job(tmp_path, quantize={"recipes": recipes, "search_budget_s": 4.0})
    ctx = make_context(tmp_path, job, [make_target("cpu")])

    record = QuantizeStage().run(ctx).record
    assert isinstance(record, QuantizeRecord) and record.decision is not None
    decision = record.decision

    names = [c.name for c in decision.candidates]
    assert names == ["int8 static", "int8 dynamic MatMul", "int8 static, int8 activations"]
    assert [c.shipped for c in decision.candidates].count(True) == 1
    assert decision.shipped in names
    assert "also calibrated on" in decision.judged_on  # 3 batches: too few to hold one out
    dynamic = decision.candidates[1]
    assert dynamic.dynamic_nodes == 1 and dynamic.float_nodes == 1  # the MatMul dynamic, the Conv float
    timed = [c for c in decision.candidates if c.passed]
    if len(timed) > 1:  # each passing candidate timed against float on the cpu, with its interval
        for candidate in timed:
            (latency,) = candidate.latency
            assert latency.measurement is not None and latency.measurement.low <= latency.measurement.ratio
