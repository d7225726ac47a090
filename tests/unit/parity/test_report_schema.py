"""docs/report-schema.json is the JSON Schema of the report.json this code writes."""

from __future__ import annotations

import json

from pipeline.parity.report import REPORT_SCHEMA_VERSION, ParityReport, report_json_schema
from tests.conftest import REPO_ROOT

SCHEMA = REPO_ROOT / "docs" / "report-schema.json"
REGENERATE = (
    'python -c "from pipeline.parity.report import report_json_schema; '
    "open('docs/report-schema.json', 'w').write(report_json_schema())\""
)


def test_report_schema_file_is_current() -> None:
    assert SCHEMA.read_text() == report_json_schema(), f"docs/report-schema.json is stale; regenerate: {REGENERATE}"


def test_report_schema_names_the_decision_data() -> None:
    schema = json.loads(SCHEMA.read_text())
    fields = set(schema["properties"])
    assert {"summary", "models", "quantization", "stage_timings", "tool_versions", "input_hashes"} <= fields
    assert schema["properties"]["schema_version"]["default"] == REPORT_SCHEMA_VERSION == 9
    # Schema 8: generation parity of a causal LM, per model and target.
    assert {"agreement", "perplexity", "perplexity_ratio", "speed", "checks"} <= set(
        schema["$defs"]["ModelGeneration"]["properties"]
    )
    # Schema 7: the hls4ml projects of fpga targets, each with its C simulation's comparisons.
    assert {"vs_emulator", "vs_cpu_qdq", "emulator_vs_cpu_qdq", "differences"} <= set(
        schema["$defs"]["HlsBuild"]["properties"]
    )
    # Schema 6: one quantization entry per int8 model (per group of targets), each with its search.
    assert schema["properties"]["quantization"]["type"] == "array"
    assert {"candidates", "shipped", "reason", "judged_on"} <= set(schema["$defs"]["SearchDecision"]["properties"])
    assert ParityReport.model_fields["tool_versions"].annotation == dict[str, str]
