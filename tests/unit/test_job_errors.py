"""Bad job inputs: every one is a `JobError` (or `BackendError`) raised before anything is written.

Each case writes a job file (and, where needed, helper modules or .npz files) into ``tmp_path``,
runs `pipeline.convert` on it and checks three things:

* the error names the job file, the dotted key of the offending setting and what was expected;
* ``error.key`` is that dotted key;
* nothing was written: the job's output folder does not exist and ``tmp_path`` (hidden entries
  included, since the runner stages into hidden folders) holds exactly what the test wrote.

The model factory and data errors must come from preflight, so no case exports a model.
"""

from __future__ import annotations

import copy
import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pydantic
import pytest

import pipeline
import pipeline.api
from pipeline.job import validate_job
from tests.conftest import tree

Raw = dict[str, Any]
WriteJob = Callable[..., Path]

IMAGE_SHAPE = (1, 8, 8)  # the digits sample's fixed dims; its input is ["batch", 1, 8, 8] float32


# ---------------------------------------------------------------- helpers


def convert_fails(job_file: Path, tmp_path: Path, expected: type[pipeline.OnnxforgeError] = pipeline.JobError) -> Any:
    """Run `pipeline.convert` on `job_file`, expect `expected`, and check nothing was written.

    Returns:
        The raised error.
    """
    before = tree(tmp_path)
    with pytest.raises(expected) as excinfo:
        pipeline.convert(job_file)
    assert not (tmp_path / "out").exists(), "the output folder was created for a bad job"
    assert tree(tmp_path) == before, "the failed job wrote (or left) files"
    return excinfo.value


def assert_names(error: pipeline.JobError, job_file: Path, key: str, *expected: str) -> None:
    """The error names the job file, the dotted key and each expected phrase."""
    message = str(error)
    assert error.key == key, message
    assert str(job_file.resolve()) in message
    assert f": {key}: " in message
    for phrase in expected:
        assert phrase in message, f"{phrase!r} not in {message!r}"


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the helper modules must not write __pycache__ into tmp_path (it is compared)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Write a module into a uniquely named package under tmp_path; return its import name.

    The package name is unique per test so ``sys.modules`` never serves a module written by
    another test; the modules are dropped from ``sys.modules`` afterwards. The job's
    ``python_path`` must include ``tmp_path``.
    """
    package = f"userpkg_{uuid.uuid4().hex[:12]}"
    count = 0

    def write(source: str) -> str:
        nonlocal count
        count += 1
        folder = tmp_path / package
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
        (folder / f"mod{count}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return f"{package}.mod{count}"

    yield write
    for name in [name for name in sys.modules if name == package or name.startswith(f"{package}.")]:
        del sys.modules[name]


def with_user_path(raw: Raw, tmp_path: Path) -> Raw:
    """Add tmp_path to the job's python_path (after the repo root the digits model needs)."""
    raw["python_path"] = [*raw.get("python_path", []), str(tmp_path)]
    return raw


def images(samples: int = 10, dtype: type = np.float32, shape: tuple[int, ...] = IMAGE_SHAPE) -> np.ndarray:
    """A batch of zero images."""
    return np.zeros((samples, *shape), dtype=dtype)


# ---------------------------------------------------------------- the job file's schema


def _remove_data(raw: Raw) -> None:
    raw.pop("calibration")
    raw.pop("evaluation")
    raw["quantize"]["enabled"] = True


SCHEMA_CASES: list[tuple[str, Callable[[Raw], Any], str, tuple[str, ...]]] = [
    (
        "unknown-top-level-key",
        lambda raw: raw.update(colour="red"),
        "colour",
        ("unknown key", "expected one of:", "calibration", "inputs", "model", "output_dir", "targets"),
    ),
    (
        "unknown-nested-key",
        lambda raw: raw["quantize"].update(colour="red"),
        "quantize.colour",
        ("unknown key", "expected one of:", "per_channel", "activation_type", "weight_type", "exclude_nodes"),
    ),
    (
        "max-fallback-above-one",
        lambda raw: raw["targets"][0].update(max_fallback=1.5),
        "targets[0].max_fallback",
        ("less than or equal to 1",),
    ),
    (
        "unknown-key-in-array-of-tables",
        lambda raw: raw["targets"][0].update(colour="red"),
        "targets[0].colour",
        ("unknown key", "expected one of: backend, max_fallback, min_accelerator_share, options, precisions"),
    ),
    (
        "shape-float",
        lambda raw: raw["inputs"][0].update(shape=["batch", 1, 8.5, 8]),
        "inputs[0].shape[2]",
        ("valid integer", "8.5"),
    ),
    (
        "shape-negative",
        lambda raw: raw["inputs"][0].update(shape=["batch", 1, -8, 8]),
        "inputs[0].shape[2]",
        ("greater than or equal to 1", "-8"),
    ),
    (
        "batch-size-zero",
        lambda raw: raw["calibration"].update(batch_size=0),
        "calibration.batch_size",
        ("greater than or equal to 1", "got 0"),
    ),
    (
        "opset-too-high",
        lambda raw: raw.update(export={"opset": 99}),
        "export.opset",
        ("less than or equal to 23", "got 99"),
    ),
    (
        "opset-too-low",
        lambda raw: raw.update(export={"opset": 7}),
        "export.opset",
        ("greater than or equal to 13", "got 7"),
    ),
    (
        "bad-dtype",
        lambda raw: raw["inputs"][0].update(dtype="float33"),
        "inputs[0].dtype",
        ("'float32'", "'int64'", "'float33'"),
    ),
    (
        "model-missing",
        lambda raw: raw.pop("model"),
        "model",
        ("required key is missing",),
    ),
    (
        "inputs-empty",
        lambda raw: raw.update(inputs=[]),
        "inputs",
        ("at least 1 item",),
    ),
    (
        "prune-ratio-one",
        lambda raw: raw.update(prune={"structured": {"ratio": 1.0}}),
        "prune.structured.ratio",
        ("less than 1", "1.0"),
    ),
    (
        "prune-layer-ratio-negative",
        lambda raw: raw.update(prune={"structured": {"layers": {"features.*": -0.5}}}),
        "prune.structured.layers.features.*",
        ("greater than or equal to 0", "-0.5"),
    ),
    (
        "prune-unknown-criterion",
        lambda raw: raw.update(prune={"structured": {"criterion": "taylor"}}),
        "prune.structured.criterion",
        ("'l1'", "'activation'", "'taylor'"),
    ),
    (
        "sparsity-n-not-below-m",
        lambda raw: raw.update(prune={"sparsity": {"pattern": "n:m", "n": 4, "m": 4}}),
        "prune.sparsity",
        ("n must be smaller than m", "n=4, m=4"),
    ),
    (
        "prune-recovery-without-calibration",
        lambda raw: (
            raw.pop("calibration"),
            raw.update(quantize={"enabled": False}, prune={"structured": {"ratio": 0.5}}),
        ),
        "prune",
        ("needs [calibration] data", "recovery = false"),
    ),
]


@pytest.mark.parametrize(("mutate", "key", "expected"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
def test_schema_error(
    mutate: Callable[[Raw], Any],
    key: str,
    expected: tuple[str, ...],
    digits_job: Raw,
    write_job: WriteJob,
    tmp_path: Path,
) -> None:
    mutate(digits_job)
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, key, *expected)


def test_unknown_key_lists_only_settable_keys(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    """`source_file` is internal (excluded): it must not be offered as a key to set."""
    digits_job["colour"] = "red"
    error = convert_fails(write_job(digits_job), tmp_path)
    assert "source_file" not in error.problem


def test_bool_setting_given_a_string(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the job validated: quantize.per_channel = 'yes' was accepted")

    monkeypatch.setattr(pipeline.api, "run_job", must_not_run)  # fail fast instead of converting
    digits_job["quantize"]["per_channel"] = "yes"
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "quantize.per_channel", "valid boolean", "yes")


def test_quantize_without_calibration(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    _remove_data(digits_job)
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert error.key == "quantize"
    assert str(job_file) in str(error)
    assert "enabled" in error.problem
    assert "[calibration]" in error.problem


def test_calibration_npz_not_found(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    missing = tmp_path / "data" / "nope.npz"
    digits_job["calibration"]["npz"] = str(missing)
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "calibration.npz", "file not found", str(missing))


def test_relative_npz_is_resolved_against_the_job_file(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["calibration"]["npz"] = "data/nope.npz"
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "calibration.npz", "file not found", str(tmp_path / "data" / "nope.npz"))


def test_job_file_missing(tmp_path: Path) -> None:
    job_file = tmp_path / "missing.toml"

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "<file>", "job file not found")


def test_job_file_not_toml(tmp_path: Path) -> None:
    job_file = tmp_path / "job.toml"
    job_file.write_text('name = "digits"\n[model\nfactory = "a:b"\n')

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "<file>", "not valid TOML", "line 2")


# ---------------------------------------------------------------- the model factory

MISSING = None  # no module written: the spec names a module that does not exist

FACTORY_CASES: list[tuple[str, str | None, str, tuple[str, ...]]] = [
    (
        "module-does-not-exist",
        MISSING,
        "model.factory",
        ("no module named", "missing_", "set python_path"),
    ),
    (
        "module-raises-at-import",
        "raise RuntimeError('boom at import time')\n",
        "model.factory",
        ("raised while importing", "RuntimeError: boom at import time"),
    ),
    (
        "factory-name-missing",
        "def other():\n    return None\n",
        "model.factory",
        ("has no attribute 'make'",),
    ),
    (
        "factory-not-callable",
        "make = 42\n",
        "model.factory",
        ("is not callable", "expected a function returning an nn.Module"),
    ),
    (
        "returns-not-a-module",
        "def make():\n    return {'weights': 1}\n",
        "model.factory",
        ("returned dict", "expected a torch.nn.Module"),
    ),
    (
        "factory-raises",
        "def make():\n    raise ValueError('weights file is corrupt')\n",
        "model.factory",
        ("the factory raised ValueError: weights file is corrupt",),
    ),
    (
        "forward-arity-mismatch",
        """
        import torch

        class TwoInputs(torch.nn.Module):
            def forward(self, left, right):
                return left + right

        def make():
            return TwoInputs()
        """,
        "inputs",
        (
            "1 input(s) ['image']",
            "TwoInputs.forward takes ['left', 'right']",
            "one [[inputs]] entry per forward argument",
        ),
    ),
]


@pytest.mark.parametrize(
    ("source", "key", "expected"), [c[1:] for c in FACTORY_CASES], ids=[c[0] for c in FACTORY_CASES]
)
def test_model_factory_error(
    source: str | None,
    key: str,
    expected: tuple[str, ...],
    digits_job: Raw,
    write_job: WriteJob,
    user_module: Callable[[str], str],
    tmp_path: Path,
) -> None:
    module = f"missing_{uuid.uuid4().hex[:12]}" if source is MISSING else user_module(source)
    digits_job["model"]["factory"] = f"{module}:make"
    job_file = write_job(with_user_path(digits_job, tmp_path))

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, key, *expected)


def test_import_error_names_the_folders_searched(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["model"]["factory"] = f"missing_{uuid.uuid4().hex[:12]}:make"
    job_file = write_job(with_user_path(digits_job, tmp_path))

    error = convert_fails(job_file, tmp_path)

    assert f"searched first: {digits_job['python_path'][0]}, {tmp_path}" in error.problem


# ---------------------------------------------------------------- the data


def _save(tmp_path: Path, name: str, **arrays: Any) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


NPZ_CASES: list[tuple[str, str, Callable[[], dict[str, np.ndarray]], tuple[str, ...]]] = [
    (
        "wrong-array-name",
        "calibration",
        lambda: {"img": images()},
        ("has arrays ['img']", "expected exactly the model inputs ['image']"),
    ),
    (
        "wrong-dtype",
        "calibration",
        lambda: {"image": images(dtype=np.float64)},
        ("input 'image'", "dtype float64; expected float32"),
    ),
    (
        "wrong-fixed-dim",
        "calibration",
        lambda: {"image": images(shape=(1, 8, 9))},
        ("input 'image'", "shape [10, 1, 8, 9]", "expected ['batch', 1, 8, 8]"),
    ),
    (
        "wrong-rank",
        "calibration",
        lambda: {"image": images(shape=(8, 8))},
        ("input 'image'", "shape [10, 8, 8]", "expected ['batch', 1, 8, 8]"),
    ),
    (
        "labels-wrong-shape",
        "evaluation",
        lambda: {"image": images(), "label": np.zeros((10, 2), np.int64)},
        ("labels 'label'", "[10, 2]", "expected integers of shape [10]"),
    ),
    (
        "labels-not-integers",
        "evaluation",
        lambda: {"image": images(), "label": np.zeros(10, np.float32)},
        ("labels 'label'", "float32", "expected integers of shape [10]"),
    ),
    (
        "different-sample-counts",
        "evaluation",
        lambda: {"image": images(10), "label": np.zeros(9, np.int64)},
        ("differ in sample count", "'image': 10", "'label': 9"),
    ),
    (
        "no-samples",
        "calibration",
        lambda: {"image": images(0)},
        ("yielded no batches",),
    ),
]


@pytest.mark.parametrize(("section", "arrays", "expected"), [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES])
def test_npz_data_error(
    section: str,
    arrays: Callable[[], dict[str, np.ndarray]],
    expected: tuple[str, ...],
    digits_job: Raw,
    write_job: WriteJob,
    tmp_path: Path,
) -> None:
    digits_job[section]["npz"] = _save(tmp_path, f"{section}.npz", **arrays())
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, f"{section}.npz", *expected)


def test_npz_that_is_not_an_npz(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    bogus = tmp_path / "calibration.npz"
    bogus.write_text("image,label\n0,1\n")
    digits_job["calibration"]["npz"] = str(bogus)
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "calibration.npz", f"cannot read {bogus} as an .npz")


DATA_FACTORY_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "batch-wrong-dtype",
        """
        import numpy as np

        def batches():
            yield {"image": np.zeros((4, 1, 8, 8), np.float64)}
        """,
        ("batch 0, input 'image'", "dtype float64; expected float32"),
    ),
    (
        "returns-non-iterable",
        "def batches():\n    return 42\n",
        ("returned int", "expected an iterable of {input name: array} dicts"),
    ),
    (
        "batch-not-a-dict",
        "def batches():\n    return [[1, 2, 3]]\n",
        ("batch 0 is a list", "expected a dict of arrays"),
    ),
    (
        "factory-raises",
        "def batches():\n    raise OSError('dataset server unreachable')\n",
        ("raised OSError: dataset server unreachable",),
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [c[1:] for c in DATA_FACTORY_CASES], ids=[c[0] for c in DATA_FACTORY_CASES]
)
def test_data_factory_error(
    source: str,
    expected: tuple[str, ...],
    digits_job: Raw,
    write_job: WriteJob,
    user_module: Callable[[str], str],
    tmp_path: Path,
) -> None:
    digits_job["calibration"] = {"factory": f"{user_module(source)}:batches"}
    job_file = write_job(with_user_path(digits_job, tmp_path))

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "calibration.factory", *expected)


# ---------------------------------------------------------------- targets and output folder


@pytest.mark.parametrize(
    ("targets", "key"),
    [
        ([{"backend": "nosuch"}], "targets[0].backend"),
        ([{"backend": "cpu"}, {"backend": "nosuch"}], "targets[1].backend"),
    ],
    ids=["only-target", "second-target"],
)
def test_unknown_backend(
    targets: list[dict[str, str]], key: str, digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    digits_job["targets"] = targets
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, key, "'nosuch'", "unknown backend", "registered: cpu, cuda, fpga")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
    reason="this onnxruntime has CUDA: the cuda backend is available here",
)
def test_unavailable_backend(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["targets"] = [{"backend": "cuda"}]
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path, pipeline.BackendError)

    message = str(error)
    assert error.backend == "cuda"
    assert "no CUDAExecutionProvider" in error.reason  # what is missing
    assert "onnxruntime-gpu" in error.hint  # how to install it
    assert str(job_file) in message
    assert "targets[0]" in message
    assert "onnxruntime-gpu" in message


def test_bad_target_options(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["targets"] = [{"backend": "cpu", "options": {"graph_optimization_level": "turbo"}}]
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)

    assert_names(error, job_file, "targets[0].options.graph_optimization_level", "backend 'cpu'", "'all'", "turbo")


def test_bad_fpga_profile_stops_the_job_before_anything_is_written(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = 'x'\n[ops.Conv]\nstride_max = 0\n")
    digits_job["targets"] = [{"backend": "fpga", "options": {"profile": str(broken)}}]
    job_file = write_job(digits_job)

    error = convert_fails(job_file, tmp_path)  # also checks that nothing was written

    assert_names(error, job_file, "targets[0].options.profile", "backend 'fpga'", "ops.Conv.stride_max")


def test_output_dir_not_an_onnxforge_output(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / ".hidden").write_text("keep me")
    job_file = write_job(digits_job)
    before = tree(tmp_path)

    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(job_file)

    assert_names(excinfo.value, job_file, "output_dir", str(out), "holds no manifest.json", "not replaced")
    assert tree(tmp_path) == before
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / ".hidden").read_text() == "keep me"


# ---------------------------------------------------------------- jobs built in Python


def test_python_built_job_raises_validation_error(tmp_path: Path, digits_job: Raw) -> None:
    digits_job["output_dir"] = str(tmp_path / "out")
    digits_job["export"] = {"opset": 99}

    with pytest.raises(pydantic.ValidationError) as excinfo:
        pipeline.ConversionJob.model_validate(digits_job)

    assert excinfo.value.errors()[0]["loc"] == ("export", "opset")


def test_validate_job_names_the_origin(tmp_path: Path, digits_job: Raw) -> None:
    digits_job["output_dir"] = str(tmp_path / "out")
    digits_job["inputs"][0]["dtype"] = "complex64"

    with pytest.raises(pipeline.JobError) as excinfo:
        validate_job(digits_job, origin="notebook cell 3")

    error = excinfo.value
    assert error.source == "notebook cell 3"
    assert error.key == "inputs[0].dtype"
    assert str(error).startswith("notebook cell 3: inputs[0].dtype: ")
    assert "'complex64'" in error.problem


def test_python_built_job_with_bad_factory_names_the_job(tmp_path: Path, digits_job: Raw) -> None:
    digits_job["output_dir"] = str(tmp_path / "out")
    digits_job["model"]["factory"] = f"missing_{uuid.uuid4().hex[:12]}:make"
    job = pipeline.ConversionJob.model_validate(copy.deepcopy(digits_job))
    before = tree(tmp_path)

    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(job)

    error = excinfo.value
    assert error.key == "model.factory"
    assert error.source == "job 'digits_cnn'"
    assert "no module named" in error.problem
    assert not (tmp_path / "out").exists()
    assert tree(tmp_path) == before


def test_union_labels_do_not_leak_into_keys(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["model"]["kwargs"] = {"width": [1]}
    error = convert_fails(write_job(digits_job), tmp_path)
    assert error.key == "model.kwargs.width"
    assert "more problem" not in error.problem


def test_one_bad_shape_entry_is_one_problem(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["inputs"][0]["shape"] = ["batch", 1, 8.5, 8]
    error = convert_fails(write_job(digits_job), tmp_path)
    assert error.key == "inputs[0].shape[2]"
    assert "problems at" not in error.problem


def test_duplicate_input_names_name_the_inputs_key(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["inputs"] = [digits_job["inputs"][0], digits_job["inputs"][0]]
    error = convert_fails(write_job(digits_job), tmp_path)
    assert error.key == "inputs"
    assert "unique" in error.problem


def test_a_backend_listed_twice_as_a_target_names_the_targets_key(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    digits_job["targets"] = [{"backend": "cpu"}, {"backend": "cpu", "options": {"intra_op_threads": 1}}]
    error = convert_fails(write_job(digits_job), tmp_path)
    assert error.key == "targets"
    assert "each backend may be a target once" in error.problem and "'cpu', 'cpu'" in error.problem


@pytest.mark.parametrize(
    ("precisions", "expected"),
    [(["int8", "int8"], "each precision may be listed once"), (["bf16"], "'int8' or 'fp32'"), ([], "at least 1")],
)
def test_bad_target_precisions_name_the_key(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path, precisions: list[str], expected: str
) -> None:
    digits_job["targets"] = [{"backend": "cpu", "precisions": precisions}]
    error = convert_fails(write_job(digits_job), tmp_path)
    assert error.key.startswith("targets[0].precisions")
    assert expected in error.problem


def test_several_problems_are_all_named(write_job: WriteJob, tmp_path: Path) -> None:
    error = convert_fails(write_job({"name": "x", "bogus": 1}), tmp_path)
    assert error.key == "model"
    assert "required key is missing" in error.problem
    assert "problems at bogus, inputs" in error.problem
    assert "<job>" not in str(error)
