"""Unit tests of `PruneStage` on a small hand-built Conv -> Conv -> Gemm model.

The model is built with onnx.helper and run in ONNX Runtime before and after pruning; the
calibration data (for recovery) is an .npz read through a real `FeedSource`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pydantic
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.artifacts import sha256_file
from pipeline.job import ConversionJob
from pipeline.pruning.sparsity import follows_n_of_m
from pipeline.pruning.summary import PruningSummary
from pipeline.records import PruneRecord
from pipeline.stages.base import PreparedInputs, StageContext
from pipeline.stages.prune import PRUNED_MODEL, PruneStage
from tests.conftest import stage_context

C1, C2, CLASSES = 8, 8, 5  # conv1 and conv2 output channels, logits


def write_conv_model(path: Path) -> Path:
    """logits = Gemm(Flatten(GAP(Relu(Conv2(Relu(Conv1(x))))))); x: [batch, 3, 8, 8], logits: [batch, 5].

    Each conv's output channels have clearly different L1 norms, so the channels that l1 pruning
    keeps are known.
    """
    rng = np.random.default_rng(0)
    scale1 = np.arange(1, C1 + 1, dtype=np.float32)[:, None, None, None] / C1
    conv1_w = (rng.normal(size=(C1, 3, 3, 3)) * scale1).astype(np.float32)
    scale2 = np.arange(1, C2 + 1, dtype=np.float32)[:, None, None, None] / C2
    conv2_w = (rng.normal(size=(C2, C1, 3, 3)) * scale2).astype(np.float32)
    fc_w = rng.normal(size=(CLASSES, C2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="pool"),
            helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        ],
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array(conv1_w, "conv1_w"),
            numpy_helper.from_array(rng.normal(scale=0.1, size=C1).astype(np.float32), "conv1_b"),
            numpy_helper.from_array(conv2_w, "conv2_w"),
            numpy_helper.from_array(rng.normal(scale=0.1, size=C2).astype(np.float32), "conv2_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(rng.normal(scale=0.1, size=CLASSES).astype(np.float32), "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def write_matmul_model(path: Path) -> Path:
    """y = Relu(x @ W1) @ W2; x: [batch, 8], W1: [8, 12] (MatMul), W2 as a Gemm weight [4, 12] (transB)."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="down"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(8, 12)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(size=(4, 12)).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def make_job(tmp_path: Path, prune: dict[str, Any], features: list[Any], calibration: bool = False) -> ConversionJob:
    """A job over input x; calibration data only when asked (l1 without recovery needs none)."""
    raw: dict[str, Any] = {
        "name": "tiny_prune",
        "model": {"factory": "torch.nn:Identity"},
        "inputs": [{"name": "x", "shape": ["batch", *features]}],
        "evaluation": {"npz": _npz(tmp_path, "eval.npz", features, seed=1), "batch_size": 8},
        "prune": prune,
        "quantize": {"enabled": False},
        "output_dir": tmp_path / "out",
    }
    if calibration:
        raw["calibration"] = {"npz": _npz(tmp_path, "calibration.npz", features, seed=2), "batch_size": 16}
    return ConversionJob.model_validate(raw)


def _npz(folder: Path, name: str, features: list[Any], seed: int) -> Path:
    path = folder / name
    np.savez(path, x=np.random.default_rng(seed).normal(size=(32, *features)).astype(np.float32))
    return path


L1_HALF = {"structured": {"ratio": 0.5, "criterion": "l1", "recovery": False}}


def conv_context(tmp_path: Path, prune: dict[str, Any], calibration: bool = False) -> StageContext:
    """A context whose newest model is the Conv model, as after the simplify stage."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    job = make_job(tmp_path, prune, [3, 8, 8], calibration)
    return stage_context(job, write_conv_model(workdir / "model.simplified.onnx"), after="simplify")


def run(path: Path, x: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [value.name for value in session.get_inputs()]
    outputs = [value.name for value in session.get_outputs()]
    return inputs, outputs, session.run(None, {"x": x})[0]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(path)).graph.initializer}


def conv_weights(path: Path) -> list[np.ndarray]:
    """The Conv weights in graph order."""
    model = onnx.load(str(path))
    values = weights(path)
    return [values[node.input[1]] for node in model.graph.node if node.op_type == "Conv"]


def test_enabled_only_when_the_job_asks_for_structured_pruning_or_sparsity(tmp_path: Path) -> None:
    stage = PruneStage()

    assert not stage.enabled(make_job(tmp_path, {}, [8]))
    assert stage.enabled(make_job(tmp_path, L1_HALF, [8]))
    assert stage.enabled(make_job(tmp_path, {"sparsity": {"pattern": "n:m"}}, [8]))
    assert not stage.enabled(make_job(tmp_path, {**L1_HALF, "enabled": False}, [8]))


class _Untouchable:
    """Stands in for the data and the model: any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"check() used .{name}")

    def __iter__(self) -> Any:
        raise AssertionError("check() read the data")


def test_check_needs_nothing(tmp_path: Path) -> None:
    # Even a job with recovery and the activation criterion: the job model already asked for
    # calibration data, and check() reads neither the data nor the model.
    job = make_job(tmp_path, {"structured": {"ratio": 0.5}}, [3, 8, 8], calibration=True)
    untouchable: Any = _Untouchable()
    inputs = PreparedInputs(source=untouchable, calibration=untouchable, evaluation=untouchable, targets=[])

    PruneStage().check(job, inputs)

    assert not (tmp_path / "out").exists()


def test_structured_half_removes_half_the_channels_and_keeps_the_interface(tmp_path: Path) -> None:
    ctx = conv_context(tmp_path, L1_HALF)
    parent = ctx.path_of("simplify")

    artifact = PruneStage().run(ctx)

    assert artifact.stage == "prune"
    assert artifact.path == PRUNED_MODEL
    pruned = ctx.workdir / PRUNED_MODEL
    assert artifact.sha256 == sha256_file(pruned)
    assert artifact.parent_sha256 == ctx.artifacts["simplify"].sha256 == sha256_file(parent)
    onnx.checker.check_model(onnx.load(str(pruned)), full_check=True)
    assert sorted(p.name for p in ctx.workdir.iterdir()) == sorted(["model.simplified.onnx", PRUNED_MODEL])

    before, after = conv_weights(parent), conv_weights(pruned)
    assert [w.shape for w in before] == [(C1, 3, 3, 3), (C2, C1, 3, 3)]
    assert [w.shape for w in after] == [(C1 // 2, 3, 3, 3), (C2 // 2, C1 // 2, 3, 3)]
    # l1: the channels with the largest weight norms stay, in their order.
    norms = np.abs(before[0]).sum(axis=(1, 2, 3))
    kept = np.sort(np.argsort(-norms)[: C1 // 2])
    np.testing.assert_array_equal(after[0], before[0][kept])
    assert weights(pruned)["fc_w"].shape == (CLASSES, C2 // 2)  # the Gemm after them lost its inputs

    x = np.random.default_rng(5).normal(size=(6, 3, 8, 8)).astype(np.float32)
    in_before, out_before, y_before = run(parent, x)
    in_after, out_after, y_after = run(pruned, x)
    assert (in_after, out_after) == (in_before, out_before) == (["x"], ["logits"])
    assert y_after.shape == y_before.shape == (6, CLASSES)
    assert np.all(np.isfinite(y_after))
    assert not np.allclose(y_after, y_before)  # channels really went


def test_structured_record_reports_the_parameters_and_layers(tmp_path: Path) -> None:
    ctx = conv_context(tmp_path, L1_HALF)
    parent = ctx.path_of("simplify")

    artifact = PruneStage().run(ctx)

    record = artifact.record_as(PruneRecord)
    summary = record.summary
    assert isinstance(summary, PruningSummary)
    count = lambda path: sum(w.size for w in weights(path).values())  # noqa: E731
    assert summary.parameters == (count(parent), count(ctx.workdir / PRUNED_MODEL))
    assert summary.parameters[0] > summary.parameters[1]
    assert summary.macs[0] > summary.macs[1]
    assert summary.input_shape == {"x": [1, 3, 8, 8]}
    by_node = {layer.node: layer for layer in summary.layers}
    assert by_node["conv1"].outputs == (C1, C1 // 2)
    assert by_node["conv2"].inputs == (C1, C1 // 2)
    assert by_node["conv2"].outputs == (C2, C2 // 2)
    assert by_node["fc"].inputs == (C2, C2 // 2) and by_node["fc"].outputs == (CLASSES, CLASSES)
    assert summary.recovery == [] and summary.sparsity is None
    assert summary.blocked == {"fc_w": "reaches the graph output logits"}  # the logits keep their classes
    assert "Removed channels" in summary.note
    # Serialised in the manifest under "metadata", read back typed.
    assert artifact.metadata["summary"]["parameters"] == list(summary.parameters)


def test_recovery_refits_the_layers_after_the_removed_channels(tmp_path: Path) -> None:
    ctx = conv_context(tmp_path, {"structured": {"ratio": 0.5, "criterion": "l1", "recovery": True}}, calibration=True)
    parent = ctx.path_of("simplify")
    no_recovery_dir = tmp_path / "plain"
    no_recovery_dir.mkdir()
    plain_ctx = conv_context(no_recovery_dir, L1_HALF)

    summary = PruneStage().run(ctx).record_as(PruneRecord).summary
    PruneStage().run(plain_ctx)

    # The layers reading the removed channels are re-fitted on the calibration data (32 samples).
    assert [layer.layer for layer in summary.recovery] == ["conv2_w", "fc_w"]
    for layer in summary.recovery:
        assert layer.skipped is None and layer.rows >= 32
        assert layer.error_with < layer.error_without
    # The re-fit model is closer to the unpruned one than the merely sliced model.
    x = np.random.default_rng(5).normal(size=(16, 3, 8, 8)).astype(np.float32)
    reference = run(parent, x)[2]
    refit = run(ctx.workdir / PRUNED_MODEL, x)[2]
    sliced = run(plain_ctx.workdir / PRUNED_MODEL, x)[2]
    assert np.linalg.norm(refit - reference) < np.linalg.norm(sliced - reference)


def test_recovery_without_calibration_data_is_rejected_by_the_job() -> None:
    with pytest.raises(pydantic.ValidationError, match="needs \\[calibration\\] data"):
        ConversionJob.model_validate(
            {
                "name": "tiny_prune",
                "model": {"factory": "torch.nn:Identity"},
                "inputs": [{"name": "x", "shape": ["batch", 8]}],
                "prune": {"structured": {"ratio": 0.5, "criterion": "l1", "recovery": True}},
                "quantize": {"enabled": False},
                "output_dir": "out",
            }
        )


def test_two_of_four_sparsity_zeroes_two_of_every_four_input_weights(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    job = make_job(tmp_path, {"sparsity": {"pattern": "n:m", "n": 2, "m": 4}}, [8])
    ctx = stage_context(job, write_matmul_model(workdir / "model.simplified.onnx"), after="simplify")
    before = weights(ctx.path_of("simplify"))

    artifact = PruneStage().run(ctx)

    after = weights(ctx.workdir / PRUNED_MODEL)
    assert {name: w.shape for name, w in after.items()} == {name: w.shape for name, w in before.items()}
    # MatMul [in, out]: input channels on axis 0; Gemm with transB [out, in]: on axis 1.
    for name, axis in (("w1", 0), ("w2", 1)):
        runs = np.moveaxis(after[name], axis, -1).reshape(-1, 4)
        assert ((runs == 0).sum(axis=1) == 2).all(), name
        assert follows_n_of_m(after[name], axis, 2, 4)
        # The two largest magnitudes of each run are kept unchanged.
        original = np.moveaxis(before[name], axis, -1).reshape(-1, 4)
        largest = np.sort(np.argsort(-np.abs(original), axis=1)[:, :2], axis=1)
        kept = np.sort(np.argsort(runs == 0, axis=1, kind="stable")[:, :2], axis=1)
        np.testing.assert_array_equal(kept, largest)
        np.testing.assert_array_equal(np.take_along_axis(runs, kept, 1), np.take_along_axis(original, kept, 1))
        # Along the output axis the pattern need not hold: it is the input channels that count.
    summary = artifact.record_as(PruneRecord).summary
    assert summary.sparsity is not None
    assert summary.sparsity.pattern == "2:4"
    assert summary.sparsity.layers == 2
    assert summary.sparsity.sparsity == pytest.approx(0.5)
    assert summary.sparsity.weight_bytes == sum(w.nbytes for w in before.values())  # zeros stored densely
    assert summary.sparsity.compressed_after < summary.sparsity.compressed_before
    assert summary.parameters[0] == summary.parameters[1]  # the graph does not shrink
    assert {layer.node: layer.sparsity for layer in summary.layers} == {"up": 0.5, "down": 0.5}
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    session = ort.InferenceSession(str(ctx.workdir / PRUNED_MODEL), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(["y"], {"x": x})[0], np.maximum(x @ after["w1"], 0) @ after["w2"].T, rtol=1e-5, atol=1e-5
    )


def test_key_follows_the_parent_model_and_the_options(tmp_path: Path) -> None:
    ctx = conv_context(tmp_path, L1_HALF)
    stage = PruneStage()
    key = stage.key(ctx)

    assert key is not None and key == stage.key(ctx)
    quarter = {"structured": {"ratio": 0.25, "criterion": "l1", "recovery": False}}
    assert stage.key(stage_context(make_job(tmp_path, quarter, [3, 8, 8]), ctx.path_of("simplify"), "simplify")) != key
    other_parent = write_matmul_model(tmp_path / "other.onnx")
    assert stage.key(stage_context(ctx.job, other_parent, "simplify")) != key
