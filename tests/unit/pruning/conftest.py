"""Small models for the pruning tests, exported for real, and a runner for ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch
import torch.nn.functional as F
from onnx_ir.passes.common import ShapeInferencePass
from torch import nn


class ResidualNet(nn.Module):
    """stem -> (body1 -> body2) + stem -> head -> pool -> flatten -> fc: a skip connection ties
    stem's and body2's channels, and the flatten feeds channel blocks into a Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body1 = nn.Conv2d(16, 12, 3, padding=1)
        self.body2 = nn.Conv2d(12, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        merged = torch.relu(skip + self.body2(torch.relu(self.body1(skip))))
        pooled = F.max_pool2d(torch.relu(self.head(merged)), 2)
        return self.fc(pooled.flatten(1))


class BranchNet(nn.Module):
    """Two branches concatenated on channels, a depthwise conv over the concat, a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 6, 1)
        self.depthwise = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.out = nn.Conv2d(14, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.out(torch.relu(self.depthwise(joined))).mean(dim=(2, 3))


class FeedForward(nn.Module):
    """A transformer FFN block with its residual and LayerNorm: only the hidden neurons can go."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(F.gelu(self.up(x))))


def export(module: nn.Module, example: torch.Tensor, folder: Path) -> ir.Model:
    """Export with dynamo (batch dynamic), simplify, infer shapes: what the prune stage receives."""
    module.eval()
    path = folder / f"{type(module).__name__}.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), input_names=["x"], optimize=False
    )
    model = ir.external_data.load_to_model(ir.load(path))
    onnxscript.optimizer.optimize(model)
    ShapeInferencePass()(model)
    return model


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The model's first output on `x`, with ONNX Runtime's CPU provider."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (pruning works in place)."""
    return ir.from_proto(ir.to_proto(model))


@pytest.fixture
def exported(tmp_path: Path) -> Callable[[nn.Module, torch.Tensor], ir.Model]:
    torch.manual_seed(0)
    return lambda module, example: export(module, example, tmp_path)


class GroupedNet(nn.Module):
    """A grouped convolution (4 groups) between two ordinary ones."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.last = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.grouped(torch.relu(self.first(x)))))
