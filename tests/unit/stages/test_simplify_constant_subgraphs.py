"""Unit tests of the simplify stage's folding of the constant subgraphs onnxscript leaves.

A torch GRU / LSTM export (dynamo, through the export stage) keeps a Slice -> Concat -> Unsqueeze
chain on its recurrent weight after onnxscript's optimizer; the stage must fold it. Hand-built
models pin the size rule: a constant Expand / Tile / ConstantOfShape into a large tensor stays a
node, a weight over the cap split into parts is folded as one subgraph, and slices of a weight
that the graph also reads whole are kept (folding them would duplicate it).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.job import ConversionJob
from pipeline.model_source import SourceModel
from pipeline.records import SimplifyRecord
from pipeline.stages.base import StageContext
from pipeline.stages.export import ExportStage
from pipeline.stages.simplify import SIMPLIFIED_MODEL, SimplifyStage
from tests.conftest import stage_context

RNG = np.random.default_rng(0)
# Over 1 MiB (the growth cap) and over onnxscript's 8,192-element input limit.
BIG_WEIGHT = RNG.normal(size=(3 * 600, 600)).astype(np.float32)


class _RowRnn(torch.nn.Module):
    """An 8-step recurrent classifier as in the zoo's gru_digits: its 192 x 64 recurrent weight is
    over onnxscript's input limit."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](8, 64, batch_first=True)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(rows)
        return self.head(out[:, -1])


def _job(tmp_path: Path, inputs: dict[str, np.ndarray], **sections: Any) -> ConversionJob:
    npz = tmp_path / "eval.npz"
    np.savez(npz, **inputs)
    return ConversionJob.model_validate(
        {
            "name": "constant_subgraphs",
            "model": {"factory": "torch.nn:Identity", "output_names": ["y"]},
            "inputs": [{"name": name, "shape": ["batch", *array.shape[1:]]} for name, array in inputs.items()],
            "evaluation": {"npz": npz, "batch_size": 4},
            "quantize": {"enabled": False},
            "output_dir": tmp_path / "out",
            **sections,
        }
    )


def _context(tmp_path: Path, graph: onnx.GraphProto, job: ConversionJob, external: bool = False) -> StageContext:
    """A context whose exported model is `graph` (weights in external data if asked)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    path = workdir / "model.onnx"
    onnx.save(model, path, save_as_external_data=external, location="model.onnx.data", size_threshold=1024)
    return stage_context(job, path, after="export")


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _nodes_on_constants(model: onnx.ModelProto) -> list[str]:
    """Nodes whose inputs are all initializers or Constant outputs (checked apart from the stage's code)."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants.update(output for node in model.graph.node if node.op_type == "Constant" for output in node.output)
    return [
        node.op_type
        for node in model.graph.node
        if node.op_type != "Constant" and node.input and all(name in constants for name in node.input if name)
    ]


def _placeholder_model(tmp_path: Path) -> Path:
    """A placeholder model file: the export stage writes the real one."""
    folder = tmp_path / "work"
    folder.mkdir()
    path = folder / "placeholder.onnx"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("cell", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_a_torch_rnn_export_keeps_no_node_on_constants_and_still_matches(tmp_path: Path, cell: str) -> None:
    torch.manual_seed(0)
    net = _RowRnn(cell).eval()
    rows = RNG.normal(size=(6, 8, 8)).astype(np.float32)
    ctx = stage_context(_job(tmp_path, {"rows": rows}), _placeholder_model(tmp_path), after="none")
    ctx = dataclasses.replace(ctx, source=SourceModel(module=net), artifacts={})
    ctx.artifacts["export"] = ExportStage().run(ctx)

    record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    simplified = onnx.load(str(ctx.workdir / SIMPLIFIED_MODEL))
    assert _nodes_on_constants(simplified) == []
    assert record.constant_nodes_kept == {}
    # The recurrent weight reaches the GRU / LSTM as one initializer, already in ONNX's gate order.
    recurrent = next(node for node in simplified.graph.node if node.op_type == cell.upper()).input[2]
    weights = {tensor.name: tensor for tensor in simplified.graph.initializer}
    assert list(weights[recurrent].dims) == [1, (3 if cell == "gru" else 4) * 64, 64]
    with torch.no_grad():
        expected = net(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(_run(ctx.workdir / SIMPLIFIED_MODEL, {"rows": rows})[0], expected, atol=1e-5)


def _blow_up(op: str, shape: list[int]) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """`op` making a float tensor of `shape` ([4, n]) from one small constant."""
    one, four_ones = np.ones((1, 1), np.float32), np.ones((4, 1), np.float32)
    target = numpy_helper.from_array(np.array(shape, np.int64), "shape")
    if op == "Expand":
        return helper.make_node("Expand", ["c", "shape"], ["big"]), [numpy_helper.from_array(one, "c"), target]
    if op == "Tile":
        repeats = numpy_helper.from_array(np.array([1, shape[1]], np.int64), "repeats")
        return helper.make_node("Tile", ["c", "repeats"], ["big"]), [numpy_helper.from_array(four_ones, "c"), repeats]
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.5])
    return helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill), [target]


@pytest.mark.parametrize("op", ["Expand", "Tile", "ConstantOfShape"])
@pytest.mark.parametrize(("width", "folded"), [(300_000, False), (1_000, True)])
def test_a_small_constant_made_large_stays_a_node_and_made_small_is_folded(
    tmp_path: Path, op: str, width: int, folded: bool
) -> None:
    # 4 x 300,000 float32 is 4.8 MB from a few bytes: over the 1 MiB cap. 4 x 1,000 is 16 KB.
    node, initializers = _blow_up(op, [4, width])
    graph = helper.make_graph(
        [node, helper.make_node("MatMul", ["x", "big"], ["y"])],
        "blow_up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    ctx = _context(tmp_path, graph, _job(tmp_path, {"x": x}))

    record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    simplified = ctx.workdir / SIMPLIFIED_MODEL
    ops = [node.op_type for node in onnx.load(str(simplified)).graph.node]
    assert ops == (["MatMul"] if folded else [op, "MatMul"])
    assert record.constant_nodes_kept == ({} if folded else {op: 1})
    # Folded: the file holds the 16 KB tensor; kept: only the small constant, not 4.8 MB.
    assert (simplified.stat().st_size > 16_000) == folded
    np.testing.assert_allclose(_run(simplified, {"x": x})[0], _run(ctx.path_of("export"), {"x": x})[0])


def _split_weight_graph(read_whole: bool) -> onnx.GraphProto:
    """y = sum of x @ W[k*600:(k+1)*600] for the three parts of BIG_WEIGHT; when `read_whole`,
    also w_all = x @ W^T (so W itself must stay)."""
    nodes, bounds = [], []
    for part in range(3):
        start, end = f"start{part}", f"end{part}"
        bounds += [numpy_helper.from_array(np.array([600 * part], np.int64), start),
                   numpy_helper.from_array(np.array([600 * (part + 1)], np.int64), end)]  # fmt: skip
        nodes += [helper.make_node("Slice", ["W", start, end], [f"w{part}"]),
                  helper.make_node("MatMul", ["x", f"w{part}"], [f"y{part}"])]  # fmt: skip
    nodes += [helper.make_node("Sum", ["y0", "y1", "y2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 600])]
    if read_whole:
        nodes.append(helper.make_node("Gemm", ["x", "W"], ["w_all"], transB=1))
        outputs.append(helper.make_tensor_value_info("w_all", TensorProto.FLOAT, ["batch", 1800]))
    return helper.make_graph(
        nodes,
        "split_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 600])],
        outputs,
        initializer=[numpy_helper.from_array(BIG_WEIGHT, "W"), *bounds],
    )


def test_a_weight_over_the_cap_cut_into_parts_is_folded_as_one_subgraph_in_external_data(tmp_path: Path) -> None:
    # Each 600 x 600 part (1.44 MB) alone would be over the cap; together they replace the weight.
    x = RNG.normal(size=(6, 600)).astype(np.float32)
    job = _job(tmp_path, {"x": x}, export={"external_data_threshold_mb": 1.0})
    ctx = _context(tmp_path, _split_weight_graph(read_whole=False), job, external=True)

    artifact = SimplifyStage().run(ctx)

    simplified = ctx.workdir / SIMPLIFIED_MODEL
    model = onnx.load(str(simplified))
    assert [node.op_type for node in model.graph.node] == ["MatMul", "MatMul", "MatMul", "Sum"]
    assert sorted(tuple(tensor.dims) for tensor in model.graph.initializer) == [(600, 600)] * 3
    assert artifact.external_data.keys() == {f"{SIMPLIFIED_MODEL}.data"}
    assert artifact.record_as(SimplifyRecord).removed_ops == {"Slice": 3}
    np.testing.assert_allclose(_run(simplified, {"x": x})[0], _run(ctx.path_of("export"), {"x": x})[0], rtol=1e-6)


def test_parts_of_a_weight_the_graph_also_reads_whole_are_not_folded(tmp_path: Path) -> None:
    # Folding would add 4.3 MB of parts next to the weight, which stays for the Gemm.
    x = RNG.normal(size=(6, 600)).astype(np.float32)
    ctx = _context(tmp_path, _split_weight_graph(read_whole=True), _job(tmp_path, {"x": x}))

    record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    assert record.constant_nodes_kept == {"Slice": 3}
    assert record.after.parameters < 2 * BIG_WEIGHT.size  # the weight once, not again as its parts


def _split_graph() -> onnx.GraphProto:
    """y = x @ W[:10] + x @ W[10:], the halves from one Split (two outputs). W is small, so
    onnxscript evaluates the Split, then warns that it cannot store two outputs."""
    weight = RNG.normal(size=(20, 10)).astype(np.float32)
    return helper.make_graph(
        [
            helper.make_node("Split", ["W", "sizes"], ["w0", "w1"], axis=0),
            helper.make_node("MatMul", ["x", "w0"], ["y0"]),
            helper.make_node("MatMul", ["x", "w1"], ["y1"]),
            helper.make_node("Add", ["y0", "y1"], ["y"]),
        ],
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([10, 10]), "sizes")],
    )


def test_a_split_of_a_weight_is_folded_without_onnxscript_warning_about_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = RNG.normal(size=(6, 10)).astype(np.float32)
    ctx = _context(tmp_path, _split_graph(), _job(tmp_path, {"x": x}))

    with caplog.at_level(logging.WARNING):
        record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    simplified = ctx.workdir / SIMPLIFIED_MODEL
    assert [node.op_type for node in onnx.load(str(simplified)).graph.node] == ["MatMul", "MatMul", "Add"]
    assert record.constant_nodes_kept == {} and record.removed_ops == {"Split": 1}
    assert not [entry for entry in caplog.records if "multiple outputs" in entry.getMessage()]
    np.testing.assert_allclose(_run(simplified, {"x": x})[0], _run(ctx.path_of("export"), {"x": x})[0], rtol=1e-6)


def test_a_split_nothing_can_evaluate_stays_and_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = RNG.normal(size=(6, 10)).astype(np.float32)
    ctx = _context(tmp_path, _split_graph(), _job(tmp_path, {"x": x}))

    def cannot_run(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no implementation of Split")

    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", cannot_run)

    record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    assert record.constant_nodes_kept == {"Split": 1}
    assert record.optimizer_error == ""
    onnx.checker.check_model(str(ctx.workdir / SIMPLIFIED_MODEL), full_check=True)


def test_a_failure_folding_the_subgraphs_keeps_the_model_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = RNG.normal(size=(6, 600)).astype(np.float32)
    ctx = _context(tmp_path, _split_weight_graph(read_whole=False), _job(tmp_path, {"x": x}))

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error during constant folding for node 'Slice_0' (::Slice)")

    monkeypatch.setattr(onnxscript.optimizer, "fold_constants", fails)

    record = SimplifyStage().run(ctx).record_as(SimplifyRecord)

    assert record.optimizer_error == "RuntimeError: Error during constant folding for node 'Slice_0' (::Slice)"
    assert record.constant_nodes_kept == {"Slice": 3}
    simplified = ctx.workdir / SIMPLIFIED_MODEL
    np.testing.assert_allclose(_run(simplified, {"x": x})[0], _run(ctx.path_of("export"), {"x": x})[0])
