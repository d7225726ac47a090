"""The job-file reference (``docs/job-reference.md``), rendered from the job models.

One section per TOML table, found by walking `ConversionJob`'s fields: each key with its type,
allowed values, default and description (the models' ``Attributes:`` docstrings, see
`pipeline.job.schema`). A table whose model was already shown (``[distill.data]`` is a data
source like ``[calibration]``) links to that section instead of repeating it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.job.base import DimName, Identifier, ImportSpec
from pipeline.job.conversion import ConversionJob
from pipeline.job.schema import (
    docstring_summary,
    field_descriptions,
    job_schema,
    nested_model,
    public_fields,
)

# The order of the top-level tables in the reference: the order the stages run in; fields not
# named here follow in declaration order.
_TOP_ORDER = (
    *("name", "output_dir", "python_path", "model", "inputs", "calibration", "evaluation", "export"),
    *("simplify", "prune", "quantize", "distill", "targets", "parity"),
)
_KIND_TEXT = {"table": "table", "array": "array of tables", "map": "tables by name"}
_JSON_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}


def _pattern(annotated: Any) -> str:
    """The regular expression of a constrained string type (`ImportSpec`, `Identifier`, ...)."""
    return str(get_args(annotated)[1].pattern)


_PATTERN_TEXT = {
    _pattern(ImportSpec): '`"package.module:attribute"`',
    _pattern(Identifier): "a name: a letter or `_`, then letters, digits, `_`, `.`, `-`",
    _pattern(DimName): "a dimension name: a letter or `_`, then letters, digits, `_`",
}

_INTRO = """\
# Job file reference

<!-- Generated from the job models in pipeline/job/ by `python -m pipeline.job.schema
--write-reference`; do not edit by hand (tests/unit/test_job_schema.py fails when it is stale). -->

A job file is TOML: one model, its inputs and data, the stage options, the targets and the parity
policy. This page lists every table and key the job models (`pipeline/job/`) accept.

- Unknown keys are errors (with the key it most likely misspells), and values are not converted:
  `"yes"` is no boolean, `"8"` no integer.
- Relative paths are relative to the job file's folder.
- TOML has no null: leave a key out to leave it unset.
- For an editor that validates job files and shows this help as you type, write the JSON Schema
  with `onnxforge schema -o job.schema.json` and point the editor at it (for taplo / Even Better
  TOML, a first line `#:schema ./job.schema.json`).
"""


@dataclass(frozen=True)
class _Table:
    """One section of the reference: the TOML headers it covers and the model of their keys."""

    headers: tuple[str, ...]
    anchor: str
    model: type[BaseModel]


def render_job_reference() -> str:
    """The Markdown of ``docs/job-reference.md``.

    Returns:
        The reference, ending in a newline.
    """
    schema = job_schema()
    top = _Table(("top level",), "top-level-keys", ConversionJob)
    shown: dict[type[BaseModel], _Table] = {ConversionJob: top}
    parts = [_INTRO]
    for table in [top, *_tables(ConversionJob, "", shown)]:
        node = schema if table.model is ConversionJob else schema["$defs"][table.model.__name__]
        parts.append(_section(table, node, shown))
    return "\n".join(parts)


def _tables(model: type[BaseModel], prefix: str, shown: dict[type[BaseModel], _Table]) -> list[_Table]:
    """The sections under `model`'s table (at dotted path `prefix`), depth first; fills `shown`
    with the section each model is first shown in."""
    groups: dict[type[BaseModel], list[tuple[str, str]]] = {}
    for name, field in _ordered_fields(model, top=not prefix):
        hit = nested_model(field.annotation)
        if hit is not None:
            groups.setdefault(hit[0], []).append((name, hit[1]))
    found: list[_Table] = []
    for nested, members in groups.items():
        if nested in shown:
            continue
        paths = [_path(prefix, name, kind) for name, kind in members]
        headers = tuple(_header(path, kind) for path, (_, kind) in zip(paths, members, strict=True))
        shown[nested] = _Table(headers, _slug(paths[0]), nested)
        found.append(shown[nested])
        found.extend(_tables(nested, paths[0], shown))
    return found


def _ordered_fields(model: type[BaseModel], top: bool) -> list[tuple[str, FieldInfo]]:
    """A model's settable fields, in declaration order (the top level: in `_TOP_ORDER`)."""
    fields = list(public_fields(model).items())
    if not top:
        return fields
    rank = {name: index for index, name in enumerate(_TOP_ORDER)}
    return sorted(fields, key=lambda item: rank.get(item[0], len(rank)))


def _path(prefix: str, name: str, kind: str) -> str:
    """The dotted path of a nested table (a map's entries are shown as ``NAME``)."""
    path = f"{prefix}.{name}" if prefix else name
    return f"{path}.NAME" if kind == "map" else path


def _header(path: str, kind: str) -> str:
    """The TOML header of a table: ``[path]``, or ``[[path]]`` for an array of tables."""
    return f"[[{path}]]" if kind == "array" else f"[{path}]"


def _slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def _section(table: _Table, node: dict[str, Any], shown: dict[type[BaseModel], _Table]) -> str:
    """One table's section: heading, the model's summary, and a row per key."""
    heading = " / ".join(f"`{header}`" for header in table.headers) if table.model is not ConversionJob else "Top level"
    lines = [f'<a id="{table.anchor}"></a>', "", f"## {heading}", "", docstring_summary(table.model.__doc__), ""]
    lines += ["| Key | Type | Allowed | Default | Description |", "| --- | --- | --- | --- | --- |"]
    descriptions = field_descriptions(table.model)
    for name, field in _ordered_fields(table.model, top=table.model is ConversionJob):
        hit = nested_model(field.annotation)
        if hit is None:
            kind, allowed = _value_text(node["properties"][name])
        else:
            target = shown[hit[0]]
            kind, allowed = _KIND_TEXT[hit[1]], f"see [`{target.headers[0]}`](#{target.anchor})"
        cells = [f"`{name}`", kind, allowed, _default_text(field), descriptions.get(name, "")]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _value_text(prop: dict[str, Any]) -> tuple[str, str]:
    """(type, allowed values) of a key's JSON Schema, in words."""
    if "anyOf" in prop:
        branches = [_value_text(branch) for branch in prop["anyOf"] if branch.get("type") != "null"]
        kind = " or ".join(text for text, _ in branches)
        if len(branches) == 1:
            return branches[0]
        return kind, "; ".join(f"{text}: {allowed}" for text, allowed in branches if allowed)
    json_type = prop.get("type", "")
    if "enum" in prop:
        return _JSON_TYPES.get(json_type, json_type), ", ".join(f"`{json.dumps(value)}`" for value in prop["enum"])
    if json_type == "array":
        kind, allowed = _value_text(prop.get("items", {}))
        extra = f"at least {prop['minItems']} entries" if "minItems" in prop else ""
        return f"array of {kind}", "; ".join(part for part in (allowed, extra) if part)
    if json_type == "object":
        return _table_text(prop)
    if json_type == "string" and prop.get("format") == "path":
        return "path (string)", ""
    return _JSON_TYPES.get(json_type, json_type or "any"), _constraints(prop)


def _table_text(prop: dict[str, Any]) -> tuple[str, str]:
    """(type, allowed values) of a table of values (``dict[str, int]``, keys maybe constrained)."""
    patterns: dict[str, Any] = prop.get("patternProperties", {})
    values = prop.get("additionalProperties")
    if patterns:
        key_pattern, values = next(iter(patterns.items()))
        keys = f"keys: {_PATTERN_TEXT.get(key_pattern, f'matching `{key_pattern}`')}"
    else:
        keys = ""
    if not isinstance(values, dict):
        return "table", keys
    kind, allowed = _value_text(values)
    return f"table of {kind}", "; ".join(part for part in (keys, allowed and f"values: {allowed}") if part)


def _constraints(prop: dict[str, Any]) -> str:
    """A scalar's bounds, pattern and length limit, in words."""
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    parts = [f"{sign} {prop[key]}" for key, sign in bounds.items() if key in prop]
    if "pattern" in prop:
        parts.append(_PATTERN_TEXT.get(prop["pattern"], f"matching `{prop['pattern']}`"))
    if "maxLength" in prop:
        parts.append(f"at most {prop['maxLength']} characters")
    return ", ".join(parts)


def _default_text(field: FieldInfo) -> str:
    """A key's default as TOML, "required", "unset" (no default) or "defaults" (a table of defaults)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "defaults"
    return f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    """A value written as TOML (inline tables for models, only their non-default keys)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }" if value else "{}"
    return repr(value)


def _cell(text: str) -> str:
    """Text made safe for a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
