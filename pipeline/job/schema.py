"""The job file's JSON Schema, built from the job models, with their docstrings as descriptions.

`job_schema()` is what ``onnxforge schema`` writes: ``ConversionJob.model_json_schema()`` (JSON
Schema draft 2020-12) with a ``$id`` and title, every table described by its model's docstring and
every key by the model's Google-style ``Attributes:`` entry (or its ``Field(description=...)``), so
an editor shows the same help as ``docs/job-reference.md`` (`pipeline.job.reference`).

Regenerate the reference with ``python -m pipeline.job.schema --write-reference``; without
arguments the module prints the schema.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from pipeline.errors import StorageError
from pipeline.job.conversion import ConversionJob

SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:onnxforge:job-file"
SCHEMA_TITLE = "onnxforge job file"
# Where `python -m pipeline.job.schema --write-reference` writes the reference (the repository's docs/).
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "job-reference.md"

# Keys whose models' docstrings have no Attributes entry for them; a docstring entry or a
# Field(description=...) takes precedence, so moving these into the docstrings is safe.
_FALLBACK_DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("Fp32Policy", "atol"): "Absolute tolerance of the element-wise gate.",
    ("Fp32Policy", "rtol"): "Relative tolerance of the element-wise gate (times |reference|).",
    ("SimplifyOptions", "enabled"): "Run the stage.",
}
_ENTRY = re.compile(r"^(?P<indent> +)(?P<name>\w+): ?(?P<text>.*)$")


def docstring_attributes(doc: str | None) -> dict[str, str]:
    """The entries of a Google-style docstring's ``Attributes:`` section.

    Args:
        doc: The docstring (None: none).

    Returns:
        Attribute name to its description, continuation lines joined by single spaces.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    entries: dict[str, list[str]] = {}
    level: str | None = None
    current: str | None = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if line and not line[0].isspace():
            break
        match = _ENTRY.match(line)
        if match and (level is None or match["indent"] == level):
            level, current = match["indent"], match["name"]
            entries[current] = [match["text"].strip()]
        elif current is not None and line.strip():
            entries[current].append(line.strip())
    return {name: " ".join(part for part in parts if part) for name, parts in entries.items()}


def docstring_summary(doc: str | None) -> str:
    """A docstring's text before its sections (``Attributes:``, ``Args:``...), paragraphs rewrapped.

    Args:
        doc: The docstring (None: none).

    Returns:
        The paragraphs, each on one line, separated by blank lines.
    """
    text = inspect.cleandoc(doc or "")
    text = re.split(r"^\w+:\n", text, maxsplit=1, flags=re.MULTILINE)[0]
    paragraphs = [" ".join(part.split()) for part in text.split("\n\n")]
    return "\n\n".join(part for part in paragraphs if part)


def field_descriptions(model: type[BaseModel]) -> dict[str, str]:
    """What each of a model's fields means, for the schema and the reference.

    The field's own ``description``, else the first ``Attributes:`` entry for it along the model's
    bases (a subclass redeclaring a field inherits its description), else a fallback of this module.

    Args:
        model: A job section model.

    Returns:
        Field name to description, for every field that has one.
    """
    described: dict[str, str] = {}
    for base in reversed(model.__mro__):
        if isinstance(base, type) and issubclass(base, BaseModel):
            described.update(docstring_attributes(base.__doc__))
    result: dict[str, str] = {}
    for name, field in model.model_fields.items():
        text = field.description or described.get(name) or _FALLBACK_DESCRIPTIONS.get((model.__name__, name))
        if text:
            result[name] = text
    return result


def nested_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The job section a field holds, and how: ``table``, ``array`` (of tables) or ``map`` (tables by name).

    Args:
        annotation: The field's type annotation.

    Returns:
        The model and the kind, or None when the field holds plain values.
    """
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "table"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args:
        inner = nested_model(args[0])
        return (inner[0], "array") if inner else None
    if origin is dict and len(args) == 2:
        inner = nested_model(args[1])
        return (inner[0], "map") if inner else None
    if origin is Union or type(annotation).__name__ == "UnionType":
        found = [hit for hit in map(nested_model, args) if hit is not None]
        return found[0] if found else None
    return None


def section_models(root: type[BaseModel] = ConversionJob) -> Iterator[type[BaseModel]]:
    """Every section model reachable from `root` (itself first), each once, depth first.

    Args:
        root: The model to start from.
    """
    seen: set[type[BaseModel]] = set()
    stack = [root]
    while stack:
        model = stack.pop(0)
        if model in seen:
            continue
        seen.add(model)
        yield model
        stack[:0] = [hit[0] for field in public_fields(model).values() if (hit := nested_model(field.annotation))]


def public_fields(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields that a job file may set (excluded ones, like ``source_file``, are internal)."""
    return {name: field for name, field in model.model_fields.items() if not field.exclude}


def job_schema() -> dict[str, Any]:
    """The job file's JSON Schema (draft 2020-12), with descriptions for every table and key.

    Returns:
        The schema as plain JSON data. Paths are strings (as TOML gives them); unknown keys are
        refused (``additionalProperties: false``), like the job models do.
    """
    raw = ConversionJob.model_json_schema(mode="validation")
    definitions: dict[str, Any] = raw.pop("$defs", {})
    for model in section_models():
        node = raw if model is ConversionJob else definitions[model.__name__]
        _describe(node, model)
    _close_pattern_tables(definitions)
    _close_pattern_tables(raw)
    raw.pop("title", None)
    return {"$schema": SCHEMA_DRAFT, "$id": SCHEMA_ID, "title": SCHEMA_TITLE, **raw, "$defs": definitions}


def _describe(node: dict[str, Any], model: type[BaseModel]) -> None:
    """Put a model's docstring and field descriptions into its schema node (in place), drop internal
    fields, and state the defaults that pydantic leaves out (those made by a default factory)."""
    node["description"] = docstring_summary(model.__doc__)
    properties: dict[str, Any] = node.get("properties", {})
    fields = public_fields(model)
    for name in set(properties) - set(fields):
        del properties[name]
    descriptions = field_descriptions(model)
    for name, prop in properties.items():
        if name in descriptions:
            prop.setdefault("description", descriptions[name])
        field = fields[name]
        if field.default_factory is not None and "default" not in prop:
            value = field.get_default(call_default_factory=True)
            if not isinstance(value, BaseModel):
                prop["default"] = to_jsonable_python(value)


def _close_pattern_tables(node: Any) -> None:
    """A table whose keys must match a pattern (``dict[DimName, int]``) refuses other keys too, as
    the model does: pydantic leaves ``additionalProperties`` open next to ``patternProperties``."""
    if isinstance(node, dict):
        if "patternProperties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close_pattern_tables(value)
    elif isinstance(node, list):
        for value in node:
            _close_pattern_tables(value)


def schema_text() -> str:
    """The schema as the JSON text ``onnxforge schema`` writes (indented, ending in a newline)."""
    return json.dumps(job_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(output: Path | None) -> None:
    """Write the schema (what ``onnxforge schema`` does).

    Args:
        output: The file to write (None: stdout).

    Raises:
        StorageError: The file cannot be written.
    """
    text = schema_text()
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise StorageError.from_os_error(e, output) from e


def main(argv: Sequence[str] | None = None) -> int:
    """Print the schema, or (``--write-reference``) regenerate ``docs/job-reference.md``.

    Args:
        argv: Command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.job.schema", description=main.__doc__)
    parser.add_argument("--write-reference", nargs="?", const=REFERENCE_PATH, type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    if args.write_reference is None:
        write_schema(None)
        return 0
    from pipeline.job.reference import render_job_reference

    args.write_reference.write_text(render_job_reference(), encoding="utf-8")
    print(f"wrote {args.write_reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
