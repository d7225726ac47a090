"""The batch's aggregate report: summary.json, summary.md and JUnit XML for CI systems."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

from pipeline.artifacts import write_atomic
from pipeline.batch.base import JobOutcome
from pipeline.job import ConversionJob


def write_summary(outcomes: list[JobOutcome], jobs: list[ConversionJob], folder: Path) -> Path:
    """Write the three summary files atomically into `folder`; return summary.json's path."""
    counts: Counter[str] = Counter(str(outcome.status) for outcome in outcomes)
    summary = {
        "schema_version": 1,
        "jobs": len(outcomes),
        "counts": dict(sorted(counts.items())),
        "outcomes": [outcome.model_dump() for outcome in outcomes],
    }
    path = folder / "summary.json"
    write_atomic(path, json.dumps(summary, indent=2))
    write_atomic(folder / "summary.md", _markdown(outcomes, counts))
    write_atomic(folder / "junit.xml", _junit(outcomes, jobs))
    return path


def _markdown(outcomes: list[JobOutcome], counts: Counter[str]) -> str:
    lines = [
        "# Batch summary",
        "",
        ", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
        "",
        "| job | status | seconds | message |",
        "|---|---|---|---|",
    ]
    for outcome in outcomes:
        message = outcome.message.splitlines()[0] if outcome.message else ""
        lines.append(f"| {outcome.job} | {outcome.status} | {outcome.seconds:.1f} | {message.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _junit(outcomes: list[JobOutcome], jobs: list[ConversionJob]) -> str:
    """One test case per job x target: failure for a failed gate, error when the job did not finish."""
    targets = {job.name: [target.backend for target in job.targets] for job in jobs}
    suite = ElementTree.Element("testsuite", name="onnxforge", tests="0", failures="0", errors="0")
    tests = failures = errors = 0
    for outcome in outcomes:
        for target in targets.get(outcome.job, ["cpu"]):
            case = ElementTree.SubElement(
                suite, "testcase", classname=outcome.job, name=target, time=f"{outcome.seconds:.3f}"
            )
            tests += 1
            failed_checks = [
                key for key, verdict in outcome.verdicts.items() if key.endswith(f"@{target}") and verdict != "pass"
            ]
            if outcome.status in ("failed", "crashed", "timeout"):
                errors += 1
                ElementTree.SubElement(case, "error", type=outcome.status, message=outcome.message[:500])
            elif failed_checks:
                failures += 1
                ElementTree.SubElement(case, "failure", type="parity", message=", ".join(failed_checks))
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)
