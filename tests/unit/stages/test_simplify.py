"""Unit tests of `SimplifyStage`: constant folding and dead-node removal on a hand-built ONNX model.

The model has a foldable constant (``Add`` of two initializers feeding a ``MatMul``) and a dead
``Relu`` whose output nothing uses. The stage runs on a `StageContext` built directly, as the
runner would after the export stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.artifacts import Artifact, sha256_file
from pipeline.job import ConversionJob
from pipeline.records import ModelRecord, SimplifyRecord
from pipeline.stages.base import StageContext
from pipeline.stages.simplify import SIMPLIFIED_MODEL, SimplifyStage
from tests.conftest import stage_context

A = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.full((4, 3), -0.25, dtype=np.float32)


def write_foldable_model(path: Path) -> Path:
    """y = x @ (A + B) with a dead Relu(x); x: [batch, 4], y: [batch, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["A", "B"], ["AB"], name="fold_me"),
            helper.make_node("MatMul", ["x", "AB"], ["y"], name="matmul"),
            helper.make_node("Relu", ["x"], ["unused"], name="dead_relu"),
        ],
        "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(A, "A"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def make_context(tmp_path: Path, model_file: str = "model.onnx") -> StageContext:
    """A context whose "export" artifact is the foldable model, with npz evaluation data."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    job = ConversionJob.model_validate(
        {
            "name": "tiny_simplify",
            "model": {"factory": "torch.nn:Identity"},
            "inputs": [{"name": "x", "shape": ["batch", 4]}],
            "evaluation": {"npz": npz, "batch_size": 4},
            "quantize": {"enabled": False},  # so the job needs no calibration data
            "output_dir": tmp_path / "out",
        }
    )
    return stage_context(job, write_foldable_model(workdir / model_file), after="export")


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def test_simplify_folds_constants_and_drops_dead_nodes(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    original = ctx.path_of("export")

    artifact = SimplifyStage().run(ctx)

    assert artifact.stage == "simplify"
    assert artifact.path == SIMPLIFIED_MODEL
    simplified = ctx.workdir / SIMPLIFIED_MODEL
    assert artifact.sha256 == sha256_file(simplified)
    assert artifact.parent_sha256 == ctx.artifacts["export"].sha256

    model = onnx.load(str(simplified))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["MatMul"]
    assert "Relu" not in ops and "Add" not in ops
    assert all("unused" not in node.output for node in model.graph.node)
    assert [output.name for output in model.graph.output] == ["y"]
    # A and B are replaced by their folded sum; neither survives as an unused initializer.
    assert len(model.graph.initializer) == 1
    np.testing.assert_allclose(numpy_helper.to_array(model.graph.initializer[0]), A + B)

    x = next(iter(ctx.evaluation)).feeds["x"]
    np.testing.assert_array_equal(run_model(simplified, x), run_model(original, x))
    np.testing.assert_allclose(run_model(simplified, x), x @ (A + B), rtol=1e-6)


def test_simplify_records_counts_before_and_after(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)

    artifact = SimplifyStage().run(ctx)

    assert artifact.metadata["before"] == {"nodes": 3, "initializers": 2, "parameters": 24}
    assert artifact.metadata["after"] == {"nodes": 1, "initializers": 1, "parameters": 12}
    assert artifact.metadata["removed_ops"] == {"Add": 1, "Relu": 1}


def test_simplify_leaves_input_file_and_no_temp_files(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    before = ctx.path_of("export").read_bytes()

    SimplifyStage().run(ctx)

    assert ctx.path_of("export").read_bytes() == before
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.onnx", SIMPLIFIED_MODEL]


def test_simplify_uses_the_newest_model(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    # A later .onnx artifact is what the stage must transform; a non-model artifact is ignored.
    newer = write_foldable_model(ctx.workdir / "model.newer.onnx")
    ctx.artifacts["other"] = Artifact(
        stage="other", path="model.newer.onnx", sha256=sha256_file(newer), record=ModelRecord()
    )
    ctx.artifacts["notes"] = Artifact(stage="notes", path="notes.txt", sha256="0" * 64)

    artifact = SimplifyStage().run(ctx)

    assert artifact.parent_sha256 == ctx.artifacts["other"].sha256


def test_simplify_is_enabled_by_default(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)

    assert SimplifyStage().enabled(ctx.job)
    assert not SimplifyStage().enabled(ctx.job.model_copy(update={"simplify": pipeline.SimplifyOptions(enabled=False)}))


def test_simplify_failure_raises_stage_error(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "invalid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, ctx.path_of("export"))

    with pytest.raises(pipeline.StageError) as caught:
        SimplifyStage().run(ctx)

    assert caught.value.stage == "simplify"
    assert caught.value.job == "tiny_simplify"
    assert "NoSuchOp" in caught.value.detail
    assert not (ctx.workdir / SIMPLIFIED_MODEL).exists()
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.onnx"]


class _ConvBnNet(torch.nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> Linear -> BatchNorm1d, with non-trivial running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.fc, self.bn1d = torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5)
        with torch.no_grad():
            for bn in (self.bn, self.bn1d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1d(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))


def test_simplify_folds_batch_norms_into_conv_and_gemm_and_drops_identities(tmp_path: Path) -> None:
    # The TorchScript exporter without constant folding keeps BatchNormalization nodes: what an
    # ONNX file from elsewhere often looks like. An Identity is spliced in front of the output.
    net = _ConvBnNet().eval()
    source = tmp_path / "bn.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(source), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["pre"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    proto = onnx.load(str(source))
    proto.graph.node.append(helper.make_node("Identity", ["pre"], ["y"], name="identity"))
    proto.graph.output[0].name = "y"
    onnx.save(proto, str(source))
    job = ConversionJob.model_validate(
        {
            "name": "bn",
            "model": {"onnx": source},
            "inputs": [{"name": "x", "shape": ["batch", 3, 8, 8]}],
            "evaluation": {"npz": _npz(tmp_path, {"x": np.random.default_rng(0).random((4, 3, 8, 8), np.float32)})},
            "quantize": {"enabled": False},
            "output_dir": tmp_path / "out",
        }
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "model.onnx").write_bytes(source.read_bytes())
    ctx = stage_context(job, workdir / "model.onnx", after="export")

    artifact = SimplifyStage().run(ctx)

    ops = {node.op_type for node in onnx.load(str(ctx.workdir / SIMPLIFIED_MODEL)).graph.node}
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert {"Conv", "Gemm"} <= ops
    assert artifact.metadata["removed_ops"]["BatchNormalization"] == 2
    assert artifact.metadata["removed_ops"]["Identity"] == 1
    x = np.random.default_rng(1).random((3, 3, 8, 8), np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(ctx.workdir / SIMPLIFIED_MODEL, x), expected, atol=1e-5)


def _npz(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return path


def test_an_optimizer_failure_on_a_valid_model_keeps_it_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_context(tmp_path)

    def fails(model: object) -> None:
        raise ValueError("Cannot convert the shape [batch,256] to a tuple of ints")

    monkeypatch.setattr(onnxscript.optimizer, "optimize", fails)

    artifact = SimplifyStage().run(ctx)

    record = artifact.record_as(SimplifyRecord)
    assert record.optimizer_error == "ValueError: Cannot convert the shape [batch,256] to a tuple of ints"
    # The dead Relu still goes; the constant Add stays, since nothing folded it.
    assert record.removed_ops == {"Relu": 1}
    assert (record.before.nodes, record.after.nodes) == (3, 2)
    onnx.checker.check_model(str(ctx.workdir / SIMPLIFIED_MODEL), full_check=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory maps are read from /proc")
def test_no_map_of_the_parents_weights_outlives_the_stage(tmp_path: Path) -> None:
    """onnxscript's rewrite rules keep the last graph they matched, and the folded weights are views
    into the parent's memory maps: after the stage those maps must be closed, or a 1 B model's
    weights stay resident through every later stage."""
    ctx = make_context(tmp_path)
    source = ctx.path_of("export")
    weight = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [  # y = x @ W.T, as torch exports a Linear: simplify folds the Transpose into a new weight
            helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="transpose"),
            helper.make_node("MatMul", ["x", "Wt"], ["y"], name="linear"),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)

    SimplifyStage().run(ctx)

    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith("model.onnx.data")]
    assert mapped == []
