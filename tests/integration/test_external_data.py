"""Legitimate external data converts end to end: an ONNX source whose weights sit beside it, and a
PyTorch export above `export.external_data_threshold_mb`, quantize included.

The output folder must stand on its own: every model's data file is in it under the model's
final name (`model.*.onnx.data`), listed in the manifest, and every model loads and runs from a
copy of the folder made elsewhere (nothing refers to the user's folder or the staging folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import pipeline
from tests.security.models import matmul_model, save_external, write_job

_SMALL_THRESHOLD = {"external_data_threshold_mb": 0.001}  # 1 KiB: the 8 KiB weight (and its 2 KiB int8) go out
_MODELS = ("model.fp32.onnx", "model.simplified.onnx", "model.int8.onnx")

_TORCH_MODEL = """
import numpy as np
import torch


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 256)

    def forward(self, x):
        return torch.relu(self.proj(x))


def feeds():
    rng = np.random.default_rng(0)
    for _ in range(2):
        yield {"x": rng.normal(size=(8, 8)).astype("float32")}
"""


def _assert_self_contained(output: Path, elsewhere: Path) -> None:
    """Every model's data is in `output` under its final name and in the manifest; a copy loads alone."""
    manifest = json.loads((output / "manifest.json").read_text())
    listed = {
        record["artifact"]["path"]: record["artifact"]["external_data"]
        for record in manifest["stages"]
        if record.get("artifact") and record["artifact"]["path"].endswith(".onnx")
    }
    for name in _MODELS:
        assert list(listed[name]) == [f"{name}.data"], (name, listed)
        assert (output / f"{name}.data").is_file(), name
    copy = shutil.copytree(output, elsewhere / "copy")
    shutil.rmtree(output)  # nothing may still point at the original folder
    for name in _MODELS:
        locations = {
            entry.value
            for tensor in onnx.load(str(copy / name), load_external_data=False).graph.initializer
            for entry in tensor.external_data
            if entry.key == "location"
        }
        assert locations == {f"{name}.data"}, (name, locations)
        onnx.checker.check_model(str(copy / name), full_check=True)
        onnx.load(str(copy / name))  # with its data, from the copy alone
        session = ort.InferenceSession(str(copy / name), providers=["CPUExecutionProvider"])
        (output_value,) = session.run(None, {"x": np.ones((2, 8), np.float32)})
        assert output_value.shape == (2, 256)


def test_onnx_source_with_external_data_converts_and_the_output_stands_alone(tmp_path: Path) -> None:
    source = save_external(matmul_model(), tmp_path / "user" / "model.onnx", location="weights.bin")
    job_file = write_job(tmp_path, source, export=_SMALL_THRESHOLD)

    result = pipeline.convert(job_file)

    assert result.passed
    assert result.artifacts["export"].metadata["exporter"] == "none (ONNX file given)"
    assert result.artifacts["export"].metadata["external_data"] is True
    manifest = json.loads(result.manifest_path.read_text())
    assert "model_onnx_data:weights.bin" in manifest["input_hashes"]  # the weights are part of the input
    _assert_self_contained(result.output_dir, tmp_path / "elsewhere")
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx", "weights.bin"]  # left as it was


def test_onnx_source_with_external_data_exits_0_under_the_default_threshold(tmp_path: Path) -> None:
    from tests.unit.test_cli import invoke

    source = save_external(matmul_model(), tmp_path / "user" / "model.onnx")
    result = invoke("convert", str(write_job(tmp_path, source)))

    assert result.exit_code == 0, result.output
    fp32 = tmp_path / "out" / "model.fp32.onnx"
    onnx.load(str(fp32))  # small: the weights are now inside the adopted model itself
    assert not list((tmp_path / "out").glob("*.data"))


@pytest.fixture
def torch_job(tmp_path: Path) -> Path:
    package = tmp_path / "wide_model"
    package.mkdir()
    (package / "__init__.py").write_text(_TORCH_MODEL)
    job_file = write_job(tmp_path / "job", tmp_path / "unused.onnx", export=_SMALL_THRESHOLD)
    text = job_file.read_text().replace(f'onnx = "{tmp_path / "unused.onnx"}"', 'factory = "wide_model:Wide"')
    job_file.write_text(f'python_path = ["{tmp_path}"]\n' + text)
    return job_file


def test_torch_export_above_the_threshold_converts_and_the_output_stands_alone(torch_job: Path, tmp_path: Path) -> None:
    result = pipeline.convert(torch_job)

    assert result.passed
    assert result.artifacts["quantize"].metadata["nodes"] > 0
    for stage in ("export", "simplify", "quantize"):
        assert result.artifacts[stage].external_data, stage
    _assert_self_contained(result.output_dir, tmp_path / "elsewhere")
