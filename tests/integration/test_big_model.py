"""A model over the 2 GiB protobuf limit: weights go to external data at every stage, checked by path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline

_BIG_MODEL = '''
import torch


class BigLookup(torch.nn.Module):
    """540k x 1000 float32 embedding table: 2.16 GB of weights, cheap to run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(540_000, 1000)

    def forward(self, ids):
        return self.table(ids).mean(dim=1)
'''


@pytest.mark.slow
def test_model_over_two_gib_uses_external_data(tmp_path: Path, write_job) -> None:
    (tmp_path / "big_model_mod.py").write_text(_BIG_MODEL)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, 540_000, size=(8, 16), dtype=np.int64))
    job_file = write_job(
        {
            "name": "big",
            "python_path": [str(tmp_path)],
            "model": {"factory": "big_model_mod:BigLookup"},
            "inputs": [{"name": "ids", "shape": ["batch", "sequence"], "dtype": "int64"}],
            "evaluation": {"npz": str(tmp_path / "ids.npz"), "batch_size": 4},
            "quantize": {"enabled": False},
        }
    )
    result = pipeline.convert(job_file)
    assert result.passed
    for stage in ("export", "simplify"):
        artifact = result.artifacts[stage]
        model_file = result.output_dir / artifact.path
        data_file = result.output_dir / f"{artifact.path}.data"
        assert model_file.stat().st_size < 10 * 2**20, stage  # the graph alone; weights are outside
        assert data_file.stat().st_size > 2**31, stage
        assert list(artifact.external_data) == [data_file.name]
    shutil.rmtree(result.output_dir)  # 4+ GB: do not leave it in pytest's kept temp folders
