"""Tiny ONNX models and job files for the model-intake tests (security, unit and integration).

Every model is built with onnx.helper in a few lines: x[batch, 8] @ W[8, 256] (8 KiB of weights,
above the inline-tensor size, so external data really holds W) and variants of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tomli_w
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def weights() -> np.ndarray:
    """The 8 x 256 float32 weight of the MatMul model (seeded)."""
    return np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)


def matmul_model(
    input_name: str = "x",
    input_type: int = TensorProto.FLOAT,
    input_shape: list[int | str] | None = None,
    extra_nodes: list[onnx.NodeProto] | None = None,
    extra_initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """y = x @ W, optionally with extra nodes and initializers (their outputs unused or added to y)."""
    shape = input_shape if input_shape is not None else ["batch", 8]
    x = helper.make_tensor_value_info(input_name, input_type, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["y"], name="matmul"), *(extra_nodes or [])]
    initializers = [numpy_helper.from_array(weights(), "W"), *(extra_initializers or [])]
    graph = helper.make_graph(nodes, "g", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def save_external(model: onnx.ModelProto, path: Path, location: str = "model.onnx.data") -> Path:
    """Save with every tensor over 1 KiB in `location` (relative to the model's folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return path


def set_external_entry(path: Path, tensor: str, **entries: str) -> None:
    """Rewrite one tensor's external data entries (location, offset, length) in a saved model."""
    model = onnx.load(str(path), load_external_data=False)
    target = next(t for t in model.graph.initializer if t.name == tensor)
    current = {entry.key: entry.value for entry in target.external_data}
    current.update(entries)
    del target.external_data[:]
    for key, value in current.items():
        target.external_data.add(key=key, value=value)
    onnx.save_model(model, str(path))


def write_job(folder: Path, model: Path, inputs: list[dict[str, Any]] | None = None, **sections: Any) -> Path:
    """A job file converting `model` on 16 seeded calibration samples of x[*, 8]; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = inputs if inputs is not None else [{"name": "x", "shape": ["batch", 8]}]
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", **{spec["name"]: rng.normal(size=(16, 8)).astype(np.float32) for spec in specs})
    raw: dict[str, Any] = {
        "name": "intake",
        "output_dir": "out",
        "model": {"onnx": str(model)},
        "inputs": specs,
        "calibration": {"npz": "calib.npz", "batch_size": 8},
        **sections,
    }
    job_file = folder / "job.toml"
    job_file.write_text(tomli_w.dumps(raw))
    return job_file
