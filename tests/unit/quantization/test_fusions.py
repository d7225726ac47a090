"""GELU fusion into ONNX Runtime's contrib kernels, on a real torch export of a transformer FFN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
from torch import nn

from pipeline.quantization.fusions import CONTRIB_DOMAIN, contrib_ops, fuse_gelu
from pipeline.quantization.qdq import QdqSettings, quantize_qdq
from pipeline.quantization.targets import quantization_settings
from tests.unit.quantization.test_qdq_and_recipe import ranges_of
from tests.unit.stages.test_quantize import make_job, make_target


class FeedForward(nn.Module):
    """A BERT feed-forward block: up-projection, exact (erf) GELU, down-projection."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ffn") / "ffn.onnx"
    example = torch.randn(2, 5, 16)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        FeedForward().eval(),
        (example,),
        str(path),
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: batch, 1: sequence},),
        optimize=False,
        opset_version=18,  # the pipeline's default: GELU is written with Erf (ONNX has Gelu from 20)
    )
    return path


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).normal(size=(8, 12, 16)).astype(np.float32)}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def settings(fuse: bool) -> QdqSettings:
    return QdqSettings(True, "uint8", "int8", activation_symmetric=False, reduce_range=False, fuse_gelu=fuse)


def test_the_exported_gelu_fuses_with_its_bias_into_one_kernel(exported: Path, feeds: dict[str, np.ndarray]) -> None:
    model = onnx.load(str(exported))
    assert "Erf" in {node.op_type for node in model.graph.node}
    reference = run(model, feeds)
    gelu_output = next(node for node in model.graph.node if node.op_type == "Erf").output[0]
    interface = (list(model.graph.input), list(model.graph.output))

    fused = fuse_gelu(model)

    assert fused == {"BiasGelu": 1}
    assert "Erf" not in {node.op_type for node in model.graph.node}
    assert (list(model.graph.input), list(model.graph.output)) == interface
    assert any(entry.domain == CONTRIB_DOMAIN for entry in model.opset_import)
    assert gelu_output not in {name for node in model.graph.node for name in node.output}  # folded in
    np.testing.assert_allclose(run(model, feeds), reference, atol=1e-5)


def test_a_qdq_model_fuses_its_float_gelu_and_keeps_the_int8_matmuls(
    exported: Path, feeds: dict[str, np.ndarray], tmp_path: Path
) -> None:
    model = load_model_with_shape_infer(exported)
    ranges = ranges_of(model, feeds, tmp_path)
    # The transformer recipe: MatMuls in int8, their outputs (and the GELU) in float.
    plain = quantize_qdq(model, ranges, settings(fuse=False), ("MatMul",), [], quantize_outputs=False)
    fused = quantize_qdq(model, ranges, settings(fuse=True), ("MatMul",), [], quantize_outputs=False)

    assert contrib_ops(fused.graph) == {"BiasGelu": 1} and not contrib_ops(plain.graph)
    q_nodes = [node.op_type for node in fused.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert q_nodes == [
        node.op_type for node in plain.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]
    gelu = next(node for node in fused.graph.node if node.op_type == "BiasGelu")
    assert [node.op_type for node in fused.graph.node if gelu.output[0] in node.input] == ["QuantizeLinear"]
    expected, actual = run(plain, feeds), run(fused, feeds)
    cosine = (expected * actual).sum() / (np.linalg.norm(expected) * np.linalg.norm(actual))
    assert cosine > 0.9999


def test_a_model_without_gelu_is_left_alone() -> None:
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        )
    )
    before = model.SerializeToString()

    assert fuse_gelu(model) == {}
    assert model.SerializeToString() == before


def test_an_onnx_tanh_gelu_is_not_turned_into_the_exact_one(feeds: dict[str, np.ndarray]) -> None:
    # Opset 20's Gelu with approximate="tanh" after a bias Add: BiasGelu (erf) would change it.
    rng = np.random.default_rng(1)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "w")
    bias = onnx.numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b")
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["projected"]),
        onnx.helper.make_node("Add", ["projected", "b"], ["biased"]),
        onnx.helper.make_node("Gelu", ["biased"], ["y"], approximate="tanh"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "tanh_gelu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 16])],
        [weight, bias],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    reference = run(model, feeds)

    assert fuse_gelu(model) == {}
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Add", "Gelu"]
    np.testing.assert_array_equal(run(model, feeds), reference)


@pytest.mark.parametrize(
    ("targets", "option", "expected"),
    [
        (["cpu"], True, True),
        (["cpu", "cuda"], True, True),
        (["cpu", "fpga"], True, False),  # the accelerator's compiler reads standard ONNX only
        (["cpu"], False, False),
    ],
)
def test_gelu_is_fused_only_when_every_target_runs_contrib_ops(
    tmp_path: Path, targets: list[str], option: bool, expected: bool
) -> None:
    job = make_job(tmp_path, {"fuse_gelu": option}, targets)

    settings, _ = quantization_settings(job, [make_target(name) for name in targets])

    assert settings.fuse_gelu is expected
