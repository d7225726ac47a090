"""Quantization is deterministic: the digits sample converted in two fresh processes gives the same bytes.

Each process gets its own empty calibration cache, so both really calibrate (nothing is reused).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DIGITS_DIR, REPO_ROOT

# The static recipe only: each recipe is deterministic, while which one ships may follow timing.
_CONVERT = (
    "import sys, pipeline; "
    "job = pipeline.load_job(sys.argv[1], output_dir=sys.argv[2], quantize={'recipes': ['static']}); "
    "result = pipeline.convert(job); "
    "print('cache_hit', result.artifacts['quantize'].metadata['calibration']['cache_hit'])"
)


def _start(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], Path, Path]:
    cache_dir = tmp_path / f"cache-{name}"
    cache_dir.mkdir()
    out = tmp_path / f"out-{name}"
    env = {**os.environ, "ONNXFORGE_CACHE_DIR": str(cache_dir), "PYTHONHASHSEED": "random"}
    process = subprocess.Popen(
        [sys.executable, "-c", _CONVERT, str(DIGITS_DIR / "job.toml"), str(out)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, out, cache_dir


@pytest.mark.slow  # two fresh interpreters converting digits (~12 s)
def test_two_processes_produce_byte_identical_int8_models(tmp_path: Path) -> None:
    runs = [_start(tmp_path, name) for name in ("a", "b")]

    digests = []
    for process, out, cache_dir in runs:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-4000:]
        assert "cache_hit False" in stdout  # calibration ran in this process
        assert list((cache_dir / "calibration").glob("*.npz"))  # and filled its own cache
        digests.append(hashlib.sha256((out / "model.int8.onnx").read_bytes()).hexdigest())

    assert digests[0] == digests[1]
