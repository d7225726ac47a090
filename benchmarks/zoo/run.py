"""Converts every zoo model with ``pipeline.convert`` and prints what the report says per target.

Usage: ``python -m benchmarks.zoo.run [--models NAME ...] [--targets cpu fpga] [--work-dir DIR]``

One job per model validates on all the given targets at once. Each row is one (model, target):
the verdict, the shipped precision, int8 latency against float and whether it is faster, the
nodes kept float, the task metric from PyTorch to the shipped model, and the conversion time. A
job that fails a parity gate still has its report (``ParityError.result``); any other error is a
failed row with its message. Per-target sections of ``report.json`` this runner does not know yet
(a ``decision`` or ``search`` record) are printed as they are, so new report fields show up.
Everything shown is also written to ``<work dir>/<targets>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.zoo.jobs import write_job
from benchmarks.zoo.models import ZOO, build, parameter_count

DEFAULT_WORK_DIR: Path = Path(__file__).resolve().parent / ".cache" / "runs"

#: Top-level report keys that, when present, are shown per target (the search's choice, if any).
DECISION_KEYS: tuple[str, ...] = ("decisions", "decision", "search", "searches", "precision_search")


@dataclass
class Row:
    """One (model, target) line of the table."""

    model: str
    family: str
    params: int
    target: str
    verdict: str
    seconds: float
    precision: str = ""
    fp32_ms: float | None = None
    int8_ms: float | None = None
    ratio: float | None = None
    faster: bool | None = None
    kept_float: int | None = None
    float_compute_nodes: int | None = None
    recipe: str = ""
    metric: str = ""
    search: str = ""
    int8_model: str = ""
    decision: str = ""
    failures: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    on_accelerator: str = ""


def by_target(section: Any) -> dict[str, dict[str, Any]]:
    """A report section as ``{target: entry}``: a list of dicts naming ``target`` (or ``backend``),
    or a dict keyed by target name; anything else maps to ``{}``."""
    if isinstance(section, list):
        return {str(e.get("target", e.get("backend"))): e for e in section if isinstance(e, dict)}
    if isinstance(section, dict) and all(isinstance(v, dict) for v in section.values()):
        return {str(k): v for k, v in section.items()}
    return {}


def _metric(summary: dict[str, Any]) -> str:
    """``"top-1 accuracy 0.992 -> 0.989"`` from a summary entry (PyTorch, then the shipped model)."""
    if summary.get("metric") is None:
        return ""
    values = [summary.get(k) for k in ("pytorch_metric", "shipped_metric")]
    shown = " -> ".join(f"{v:.4g}" for v in values if isinstance(v, int | float))
    return f"{summary['metric']} ({summary.get('metric_output', '')}) {shown}"


def _candidate(candidate: dict[str, Any]) -> str:
    """``"int8 static 0.88x*"``: a search candidate, its verdict or latency ratios, ``*`` when shipped."""
    ratios = [
        f"{m['ratio']:.2f}x"
        for entry in candidate.get("latency") or []
        if isinstance(m := entry.get("measurement"), dict) and isinstance(m.get("ratio"), int | float)
    ]
    passed = candidate.get("passed")
    state = "n/a" if passed is None else ("" if passed else "fail")
    return " ".join([str(candidate.get("name")), *ratios, state]).strip() + ("*" if candidate.get("shipped") else "")


def compact(value: Any, limit: int = 400) -> str:
    """A decision record in a few words: its choice and reason when it names them, else its JSON."""
    if isinstance(value, dict) and ("shipped" in value or "reason" in value):
        candidates = [_candidate(c) for c in value.get("candidates") or [] if isinstance(c, dict)]
        speedup = value.get("speedup")
        text = f"ships {value.get('shipped')}: {value.get('reason', '')}"
        text += f"; speedup {speedup}" if speedup is not None else ""
        text += f" || {' | '.join(candidates)}" if candidates else ""
        return text[:limit]
    return json.dumps(value, default=str)[:limit]


def _decision(report: dict[str, Any], target: str, sections: Sequence[dict[str, Any]]) -> str:
    """What any decision / search record says about ``target``: a top-level report section (per
    target, or one for the job), or a key of the target's own summary / performance / quantization
    entries."""
    found = []
    for key in DECISION_KEYS:
        section = report.get(key)
        entry = by_target(section).get(target) if section is not None else None
        if entry is None and isinstance(section, dict) and section and not by_target(section):
            entry = section  # one decision for the whole job
        if entry is not None:
            found.append(f"{key}: {compact(entry)}")
        found.extend(f"{key}: {compact(s[key])}" for s in sections if s.get(key) is not None)
    return "; ".join(found)


def quantization_for(report: dict[str, Any], target: str) -> dict[str, Any]:
    """The quantization record behind ``target``'s int8 model: schema 5 has one dict; schema 6 a
    list of them, each naming the ``targets`` it serves (an empty list: every target)."""
    section = report.get("quantization")
    if isinstance(section, dict):
        return section
    entries = [e for e in section or [] if isinstance(e, dict)]
    named = [e for e in entries if target in (e.get("targets") or [])]
    shared = [e for e in entries if not e.get("targets")]
    return (named or shared or [{}])[0]


def _search(quantization: dict[str, Any]) -> str:
    """The mixed-precision search in a few words: its probes, the last one's figures, the model."""
    probes = quantization.get("probes") or []
    if not probes:
        return ""
    last = probes[-1]
    return f"{len(probes)} probe(s), last kept {last.get('kept_float')} float: {last.get('summary', '')}"


def _share(summary: dict[str, Any]) -> str:
    """``"100% of MACs"``: a summary entry's share of the work on the target's accelerator ("" for a CPU target)."""
    share = summary.get("accelerator_share")
    return f"{share:.0%} of {summary.get('share_basis', '')}" if isinstance(share, int | float) else ""


def report_rows(name: str, params: int, seconds: float, report: dict[str, Any]) -> list[Row]:
    """One row per target of a report.json."""
    summaries = by_target(report.get("summary"))
    performance = by_target(report.get("performance"))
    targets = list(dict.fromkeys([*summaries, *performance])) or ["?"]
    rows = []
    for target in targets:
        s, p = summaries.get(target, {}), performance.get(target, {})
        quantization = quantization_for(report, target)
        failures = [f for f in report.get("failures", []) if target in str(f)] or (
            list(report.get("failures", [])) if len(targets) == 1 else []
        )
        rows.append(
            Row(
                model=name,
                family=ZOO[name].family,
                params=params,
                target=target,
                verdict=str(s.get("verdict", report.get("verdict", "?"))),
                seconds=seconds,
                precision=str(s.get("precision", "")),
                fp32_ms=p.get("fp32_ms", s.get("fp32_ms")),
                int8_ms=p.get("int8_ms"),
                ratio=p.get("ratio", s.get("latency_ratio")),
                faster=p.get("faster"),
                kept_float=len(quantization.get("kept_float") or []) if quantization else None,
                float_compute_nodes=p.get("float_compute_nodes"),
                recipe=str(quantization.get("recipe", "")),
                metric=_metric(s),
                search=_search(quantization),
                int8_model=str(quantization.get("model", "")),
                decision=_decision(report, target, [s, p, quantization]),
                failures=[str(f) for f in failures],
                reasons=[str(r) for r in p.get("reasons", [])],
                on_accelerator=_share(s),
            )
        )
    return rows


def convert_one(name: str, job_dir: Path, targets: Sequence[str], precisions: Sequence[str] | None = None) -> list[Row]:
    """Writes the job of ``name``, converts it, and returns its rows (a failed row on an error)."""
    import pipeline

    params = parameter_count(build(name))
    start = time.perf_counter()
    try:
        job = write_job(ZOO[name], job_dir, targets, precisions)
        start = time.perf_counter()
        pipeline.convert(job, output_dir=job_dir / "out")
    except pipeline.ParityError:
        pass  # the report is written; its rows say what failed
    except Exception as error:  # noqa: BLE001 - one model's failure must not stop the zoo
        seconds = time.perf_counter() - start
        detail = f"{type(error).__name__}: {error}"
        (job_dir / "error.txt").write_text(detail + "\n\n" + traceback.format_exc())
        return [Row(name, ZOO[name].family, params, t, "error", seconds, failures=[detail]) for t in targets]
    seconds = time.perf_counter() - start
    report = json.loads((job_dir / "out" / "report.json").read_text())
    return report_rows(name, params, seconds, report)


def rerender(name: str, job_dir: Path, targets: Sequence[str], previous: dict[str, float]) -> list[Row]:
    """The rows of an earlier conversion, from its ``report.json`` (or ``error.txt``), without converting."""
    params = parameter_count(build(name))
    seconds = previous.get(name, 0.0)
    report_path = job_dir / "out" / "report.json"
    error = job_dir / "error.txt"
    if error.is_file() and (not report_path.is_file() or error.stat().st_mtime > report_path.stat().st_mtime):
        detail = error.read_text().split("\n\n")[0]
        return [Row(name, ZOO[name].family, params, t, "error", seconds, failures=[detail]) for t in targets]
    if not report_path.is_file():
        return [Row(name, ZOO[name].family, params, t, "missing", seconds) for t in targets]
    return report_rows(name, params, seconds, json.loads(report_path.read_text()))


def _fmt(value: Any, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def table(rows: Sequence[Row], title: str) -> Table:
    """The rich table of ``rows``."""
    t = Table(title=title, show_lines=True)
    columns = ["model", "family", "params", "target", "verdict", "on accelerator", "ships", "fp32 ms", "int8 ms"]
    columns.append("int8/fp32")
    more = ["faster", "kept float", "float nodes", "recipe", "search", "metric", "decision", "s", "failures"]
    for column in [*columns, *more]:
        t.add_column(column, overflow="fold")
    for r in rows:
        verdict = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "error": "[red]ERROR[/]"}.get(r.verdict, r.verdict)
        t.add_row(
            r.model, r.family.split(" (")[0], f"{r.params:,}", r.target, verdict, r.on_accelerator or "-", r.precision,
            _fmt(r.fp32_ms, ".3f"),
            _fmt(r.int8_ms, ".3f"), _fmt(r.ratio, ".2f"),
            "undecided" if r.faster is None and r.ratio is not None else _fmt(r.faster), _fmt(r.kept_float),
            _fmt(r.float_compute_nodes), r.recipe, r.search, r.metric, r.decision or "-", f"{r.seconds:.1f}",
            "\n".join(r.failures)[:600],
        )  # fmt: skip
    return t


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 when every conversion passed, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo.run", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO))
    parser.add_argument("--targets", nargs="+", default=["cpu"])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--precisions", nargs="+", choices=["int8", "fp32"], help="every target's precisions")
    parser.add_argument("--rerender", action="store_true", help="print the table of the last run, converting nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=240)
    root = args.work_dir / "-".join([*args.targets, *(args.precisions or [])])
    rows: list[Row] = []
    if args.rerender:
        results = root / "results.json"
        old = json.loads(results.read_text()) if results.is_file() else []
        previous = {r["model"]: r["seconds"] for r in old}
        rows = [row for name in args.models for row in rerender(name, root / name, args.targets, previous)]
        console.print(table(rows, f"onnxforge zoo on {', '.join(args.targets)} (from the last run's reports)"))
        return 0 if all(r.verdict == "pass" for r in rows) else 1
    for name in args.models:
        console.print(f"converting {name} on {', '.join(args.targets)} ...")
        found = convert_one(name, root / name, args.targets, args.precisions)
        for row in found:
            console.print(f"  {row.target}: {row.verdict} in {row.seconds:.1f} s {'; '.join(row.failures)[:300]}")
        rows.extend(found)
    (root / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    console.print(table(rows, f"onnxforge zoo on {', '.join(args.targets)}"))
    for r in rows:
        if r.reasons:
            console.print(f"{r.model} on {r.target}, performance notes: " + "; ".join(r.reasons))
    return 0 if all(r.verdict == "pass" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
