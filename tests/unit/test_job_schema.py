"""The job file's JSON Schema (`onnxforge schema`) and the generated docs/job-reference.md.

The schema must be a valid draft 2020-12 schema that accepts every bundled sample job file and
refuses what the job models refuse (unknown keys, wrong types); every table and key carries a
description taken from the models' docstrings. The reference must be what
`render_job_reference()` renders now, so a change to the models that is not regenerated fails here.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.job import ConversionJob
from pipeline.job.reference import render_job_reference
from pipeline.job.schema import REFERENCE_PATH, SCHEMA_DRAFT, docstring_attributes, job_schema, section_models

jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema package is not installed")

REPO = Path(__file__).resolve().parents[2]
SAMPLE_JOBS = sorted(REPO.glob("samples/*/job*.toml"))
REGENERATE = "python -m pipeline.job.schema --write-reference"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return job_schema()


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Any:
    return jsonschema.Draft202012Validator(schema)


def _sample(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def test_schema_is_valid_draft_2020_12(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == SCHEMA_DRAFT
    assert schema["$id"] and schema["title"] == "onnxforge job file"
    assert "source_file" not in schema["properties"], "set by the loader, not a key of the job file"


def test_every_table_and_key_is_described(schema: dict[str, Any]) -> None:
    nodes = {"ConversionJob": schema, **schema["$defs"]}
    assert set(nodes) == {model.__name__ for model in section_models()}
    for name, node in nodes.items():
        assert node.get("description"), f"{name} has no description"
        assert "Attributes:" not in node["description"], f"{name}: the Attributes section belongs to the keys"
        undescribed = [key for key, prop in node["properties"].items() if not prop.get("description")]
        assert not undescribed, f"{name}: keys without a description: {undescribed}"


@pytest.mark.parametrize("job_file", SAMPLE_JOBS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_sample_jobs_validate(validator: Any, job_file: Path) -> None:
    errors = [error.message for error in validator.iter_errors(_sample(job_file))]
    assert not errors


def test_there_are_sample_jobs() -> None:
    assert len(SAMPLE_JOBS) >= 4


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("quantize", "per_chanel"), True),  # an unknown (misspelt) key
        (("calibraton",), {"npz": "x.npz"}),  # an unknown table
        (("quantize", "per_channel"), "yes"),  # no coercion: a string is no boolean
        (("inputs", 0, "dtype"), "float"),  # not one of the element types
        (("inputs", 0, "shape"), [0, 8]),  # a size below 1
        (("name",), "has space"),  # not an identifier
        (("export", "check_shapes"), [{"1batch": 1}]),  # not a dimension name
        (("parity", "outputs", "logits", "int8", "min_cosin"), 0.9),  # unknown key in a per-output rule
    ],
)
def test_schema_refuses_what_the_models_refuse(validator: Any, path: tuple[str | int, ...], value: Any) -> None:
    raw = copy.deepcopy(_sample(REPO / "samples" / "digits_cnn" / "job.toml"))
    node: Any = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    assert not validator.is_valid(raw)


def test_required_keys(validator: Any) -> None:
    raw = _sample(REPO / "samples" / "digits_cnn" / "job.toml")
    for key in ("name", "model", "inputs", "output_dir"):
        assert not validator.is_valid({k: v for k, v in raw.items() if k != key}), key


def test_docstring_attributes_joins_continuation_lines() -> None:
    doc = """Summary.

    Attributes:
        first: One line.
        second: Two
            lines.

    Returns:
        Nothing.
    """
    assert docstring_attributes(doc) == {"first": "One line.", "second": "Two lines."}


def test_cli_writes_the_schema(tmp_path: Path, schema: dict[str, Any]) -> None:
    from pipeline.cli import app

    target = tmp_path / "job.schema.json"
    result = CliRunner().invoke(app, ["schema", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text(encoding="utf-8")) == schema
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == schema


def test_cli_schema_to_an_unwritable_path_exits_2(tmp_path: Path) -> None:
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["schema", "-o", str(tmp_path / "missing" / "job.schema.json")])
    assert result.exit_code == 2, result.output


def test_reference_covers_every_key() -> None:
    text = render_job_reference()
    for header in ("[model]", "[[inputs]]", "[calibration]", "[evaluation]", "[export]", "[simplify]", "[prune]"):
        assert f"## `{header}`" in text or f"`{header}`" in text, header
    for header in ("[prune.structured]", "[prune.sparsity]", "[quantize]", "[distill]", "[[targets]]", "[parity]"):
        assert f"`{header}`" in text, header
    for header in ("[parity.fp32]", "[parity.distill]", "[parity.prune]", "[parity.int8]", "[parity.outputs.NAME]"):
        assert f"## `{header}`" in text, header
    for model in section_models():
        for name, field in model.model_fields.items():
            if not field.exclude:
                assert f"| `{name}` |" in text, f"{model.__name__}.{name}"
    assert "source_file" not in text
    assert ConversionJob.model_fields["output_dir"].is_required()


def test_reference_is_current() -> None:
    assert REFERENCE_PATH == REPO / "docs" / "job-reference.md"
    current = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.is_file() else ""
    assert current == render_job_reference(), f"docs/job-reference.md is stale: run `{REGENERATE}`"
