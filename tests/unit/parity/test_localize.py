"""Layer-wise localisation on a real exported MLP and its ONNX Runtime QDQ rewrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
from torch import nn

from pipeline.parity.localize import EXACT_DB, localize

RNG = np.random.default_rng(0)
BATCHES = [{"x": RNG.standard_normal((32, 16)).astype(np.float32)} for _ in range(3)]


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(torch.relu(self.second(torch.tanh(self.first(x)))))


class _Reader(CalibrationDataReader):
    def __init__(self) -> None:
        self._batches = iter(BATCHES)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("localize")
    torch.manual_seed(0)
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        Mlp().eval(), (torch.zeros(2, 16),), str(fp32), dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},)
    )
    onnx.save(onnx.load(str(fp32)), str(fp32))  # weights inline
    quantize_static(fp32, int8, _Reader(), quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax)
    return fp32, int8


def test_identical_models_match_everywhere(models: tuple[Path, Path]) -> None:
    fp32, _ = models
    result = localize(ir.load(fp32), ir.load(fp32), BATCHES)
    assert result.compared > 3
    assert result.first_diverging is None
    assert all(t.sqnr_db == EXACT_DB and t.local_sqnr_db == EXACT_DB for t in result.tensors)


def test_a_broken_scale_is_found_and_blamed(models: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = models
    broken = onnx.load(str(int8))
    quantize_nodes = [node for node in broken.graph.node if node.op_type == "QuantizeLinear"]
    victim = quantize_nodes[len(quantize_nodes) // 2]  # an activation in the middle of the network
    tensor = victim.input[0]
    scale = next(init for init in broken.graph.initializer if init.name == victim.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 40, scale.name))  # 40x too coarse
    damaged = tmp_path / "damaged.onnx"
    onnx.save(broken, str(damaged))

    healthy = localize(ir.load(fp32), ir.load(int8), BATCHES)
    result = localize(ir.load(fp32), ir.load(damaged), BATCHES)

    worst = result.ranked[0]
    assert worst.tensor == tensor and worst.kind == "quantized"
    assert worst.local_sqnr_db < min(t.local_sqnr_db for t in healthy.ranked) - 10
    producer = next(node.name for node in broken.graph.node if tensor in node.output)
    assert producer in worst.culprits
    assert result.first_diverging is not None and result.first_diverging.order <= worst.order


def test_chunking_does_not_change_the_figures(models: tuple[Path, Path]) -> None:
    fp32, int8 = models
    whole = localize(ir.load(fp32), ir.load(int8), BATCHES)
    one_at_a_time = localize(ir.load(fp32), ir.load(int8), BATCHES, element_budget=1)
    assert [(t.tensor, t.kind, t.sqnr_db) for t in whole.tensors] == [
        (t.tensor, t.kind, t.sqnr_db) for t in one_at_a_time.tensors
    ]
