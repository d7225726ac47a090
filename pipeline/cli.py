"""The `onnxforge` command: parses arguments, calls the Python API, prints with rich.

Only typer and rich are imported with this module, so ``onnxforge --help`` and ``--version`` answer
at once; each command imports the API, torch and ONNX Runtime when it runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from backends.base import PlacementReport
    from pipeline.batch.base import BatchOverrides, JobOutcome
    from pipeline.errors import OnnxforgeError
    from pipeline.parity.localize import Localisation
    from pipeline.parity.report import ParityReport
    from pipeline.runner import StageEvent


def _job_defaults() -> ModuleType:
    """`pipeline/job/defaults.py` (the option defaults, defined once there) without running
    `pipeline.job`'s package imports (pydantic, and onnx through `pipeline.errors`)."""
    if (loaded := sys.modules.get("pipeline.job.defaults")) is not None:
        return loaded
    source = Path(__file__).parent / "job" / "defaults.py"
    spec = importlib.util.spec_from_file_location("_onnxforge_job_defaults", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DEFAULTS = _job_defaults()

app = typer.Typer(
    name="onnxforge",
    help="Convert trained PyTorch models to ONNX, simplify, quantize to int8 and prove parity on each backend.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Logs and CI captures are not terminals; rich would wrap their tables at 80 columns.
_PIPE_WIDTH = 120
stdout = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)

# Library chatter that says nothing about the user's model (e.g. torchvision ops not registered).
_QUIET_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
# torch.onnx's op registry ("torchvision is not installed. Skipping torchvision::nms"): with -v it is
# set explicitly, so a library default that quiets it (one that keeps an explicit level) leaves it shown.
_TORCH_OP_REGISTRY = "torch.onnx._internal.exporter._registration"
# Progress bars of the Hugging Face libraries (transformers' "Loading weights"): read at their import.
_HF_PROGRESS_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"


def _configure_logging(verbose: bool) -> None:
    """Warnings (and with -v, every step) on stderr, untimestamped, above the progress display;
    third-party chatter and progress bars only with -v."""
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr, show_time=False, show_path=False)
    if not verbose:
        # Some libraries log straight on the root logger (ONNX Runtime's quantizer advice): -v shows it.
        handler.addFilter(lambda record: record.name != "root")
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault(_HF_PROGRESS_BARS, "1")
    else:
        logging.getLogger(_TORCH_OP_REGISTRY).setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[handler], force=True
    )


def _show_version(value: bool) -> None:
    """--version: print ``onnxforge <version>`` and exit 0."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("onnxforge")
        except PackageNotFoundError:  # run from a source tree that was never installed
            found = "unknown"
        stdout.print(f"onnxforge {found}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Convert trained PyTorch models to ONNX, simplify, quantize to int8 and prove parity on each backend."""


@app.command()
def convert(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML).", show_default=False)],
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Write here instead of the job's output_dir.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Restore unchanged stages from the stage cache.")] = False,
    prune: Annotated[
        float | None,
        typer.Option(
            "--prune", help="Remove this share of the channels of every prunable layer (job: prune.structured)."
        ),
    ] = None,
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity", help="Zero weights: 'N:M' (e.g. 2:4) or 'unstructured:RATIO' (job: prune.sparsity)."
        ),
    ] = None,
) -> None:
    """Convert one model: export, simplify, prune, quantize, validate parity; print the parity table.

    Exit codes: 0 every gate passed, 1 a parity gate failed, 2 bad input, 3 internal error.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from pipeline.api import convert as convert_job
    from pipeline.errors import OnnxforgeError, ParityError
    from pipeline.job import load_job
    from pipeline.job.loading import prune_overrides

    _configure_logging(verbose)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TextColumn("{task.fields[detail]}"), console=stderr, transient=True) as progress:
        show = _stage_printer(progress, progress.add_task("starting", total=None, detail=""))
        try:
            job = load_job(job_file, **prune_overrides(job_file, prune, sparsity))
            result = convert_job(job, output_dir=output_dir, on_event=show, resume=resume)
        except ParityError as e:
            progress.stop()
            if e.result is not None:
                _print_report(e.result.report)  # type: ignore[attr-defined]
            _fail(e)
        except OnnxforgeError as e:
            progress.stop()
            _fail(e)
    _print_report(result.report)
    written = _written(result.output_dir, result.manifest_path.name)
    stdout.print(f"[green]wrote[/] {escape(str(result.output_dir))}: {written}", highlight=False)


def _stage_printer(progress: Progress, line: TaskID) -> Callable[[StageEvent], None]:
    """The callback that shows a conversion's stage events: the running stage, then one line per stage."""

    def show(event: StageEvent) -> None:
        if event.status == "started":
            description = f"[bold]{escape(event.job)}[/]: {event.stage}"
            progress.update(line, description=description, total=None, completed=0, detail="")
        elif event.status == "progress":  # e.g. a distillation epoch: loss and held-out accuracy
            progress.update(line, total=event.total, completed=event.done, detail=escape(event.detail))
        elif event.status == "finished":
            stderr.print(f"  {event.stage:<9} done in {event.seconds:.2f}s")
        elif event.status == "restored":
            stderr.print(f"  {event.stage:<9} restored from the stage cache")

    return show


def _written(output_dir: Path, manifest: str) -> str:
    """What a conversion wrote that a person reads: the HTML report first, then the rest."""
    described = {"report.html": "report.html (open in a browser)", "report.md": "report.md"}
    names = [text for name, text in described.items() if (output_dir / name).is_file()]
    return ", ".join([*names, manifest])


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="The batch manifest (TOML).", show_default=False)],
    workers: Annotated[int | None, typer.Option("--workers", "-w", help="Jobs at once (default: manifest).")] = None,
    executor: Annotated[
        str | None,
        typer.Option(help="Where jobs run: 'local' (spawned processes) or 'ray' (Ray tasks). Default: manifest."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster address (default: manifest, else a local Ray).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Restore unchanged stages from the stage cache.")] = False,
    events: Annotated[
        Path | None, typer.Option("--events", help="Append JSON-lines events (stage and job outcomes) here.")
    ] = None,
) -> None:
    """Convert every job of a manifest, each in its own process; write summary.json/.md and junit.xml.

    Exit codes: 0 every job passed, 1 a parity gate failed, 2 bad manifest or executor, 3 a job
    failed, crashed or timed out.
    """
    from pipeline.api import convert_batch
    from pipeline.batch.manifest import load_manifest
    from pipeline.batch.progress import BatchProgress, EventLog, outcome_table
    from pipeline.errors import ExitCode, OnnxforgeError

    _configure_logging(verbose=False)
    log = EventLog(events)
    try:
        loaded = load_manifest(manifest)
        with BatchProgress(stderr, len(loaded.jobs), disable=quiet) as board:

            def on_event(event: StageEvent) -> None:
                log.stage(event)
                board.stage(event)

            def on_outcome(outcome: JobOutcome) -> None:
                log.outcome(outcome)
                board.done(outcome)

            overrides = _batch_overrides(workers, ray_address, resume)
            result = convert_batch(loaded, executor=executor, on_event=on_event, on_outcome=on_outcome, **overrides)
    except OnnxforgeError as e:  # a bad manifest or executor (e.g. Ray unreachable), not a job
        _fail(e)
    stdout.print(outcome_table(result.outcomes))
    stdout.print(f"summary: {result.summary_path} (and summary.md, junit.xml)", highlight=False)
    if result.exit_code != ExitCode.OK:
        raise typer.Exit(int(result.exit_code))


def _batch_overrides(workers: int | None, ray_address: str | None, resume: bool) -> BatchOverrides:
    """The batch options given on the command line: they replace the manifest's settings."""
    from pipeline.batch.base import BatchOverrides

    overrides = BatchOverrides()
    if workers is not None:
        overrides["workers"] = workers
    if ray_address is not None:
        overrides["ray_address"] = ray_address
    if resume:
        overrides["resume"] = True
    return overrides


@app.command()
def parity(
    reference: Annotated[Path, typer.Argument(help="The reference model (.onnx).", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The candidate model (.onnx).", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="An .npz with one array per model input.", show_default=False)],
    backend_a: Annotated[str, typer.Option("--backend-a", help="Backend for the reference.")] = "cpu",
    backend_b: Annotated[str, typer.Option("--backend-b", help="Backend for the candidate.")] = "cpu",
    labels: Annotated[str | None, typer.Option(help="The .npz array of class labels (top-1 accuracy).")] = None,
    min_cosine: Annotated[
        float, typer.Option(help="Task gate: lowest mean cosine per output.")
    ] = _DEFAULTS.DEFAULT_MIN_COSINE,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="Task gate: largest top-1 drop in points (needs --labels).")
    ] = None,
    atol: Annotated[
        float | None, typer.Option(help="Element-wise gate instead: |b - a| <= atol + rtol*|a| everywhere.")
    ] = None,
    rtol: Annotated[float, typer.Option(help="With --atol.")] = _DEFAULTS.DEFAULT_RTOL,
    batch_size: Annotated[int, typer.Option(help="Samples per run.")] = _DEFAULTS.DEFAULT_BATCH_SIZE,
    localize: Annotated[
        bool | None,
        typer.Option("--localize/--no-localize", help="Find where the error enters (default: when the gate fails)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.json and report.md here.")] = None,
) -> None:
    """Compare any two models on any two backends; say where the error enters when they differ.

    Exit codes: 0 the gate passed, 1 it failed, 2 bad input (model, data, backend), 3 internal error.
    """
    from pipeline.errors import ExitCode, OnnxforgeError
    from pipeline.job import Fp32Policy, TaskPolicy
    from pipeline.parity.compare import compare_models
    from pipeline.parity.writers import write_reports

    _configure_logging(verbose=False)
    try:
        report = compare_models(
            reference,
            candidate,
            data,
            reference_backend=backend_a,
            candidate_backend=backend_b,
            policy=TaskPolicy(min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop),
            exact=Fp32Policy(atol=atol, rtol=rtol) if atol is not None else None,
            labels=labels,
            batch_size=batch_size,
            localise=localize,
        )
    except OnnxforgeError as e:
        _fail(e)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_reports(report, out)
    _print_report(report)
    for localisation in report.localisations:
        _print_localisation(localisation)
    if report.verdict != "pass":
        raise typer.Exit(int(ExitCode.PARITY_FAILED))


@app.command()
def report(
    output_dir: Annotated[Path, typer.Argument(help="A conversion's output folder (or any folder with report.json).")],
) -> None:
    """Re-render report.md from report.json (after an upgrade, or to regenerate a deleted file)."""
    from pydantic import ValidationError

    from pipeline.errors import JobError, first_line
    from pipeline.parity.report import ParityReport
    from pipeline.parity.writers import write_reports

    source = output_dir / "report.json"
    try:
        loaded = ParityReport.model_validate_json(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _fail(JobError(source, "<file>", "no report.json here: pass a conversion's output folder"))
    except (OSError, ValidationError) as e:
        _fail(JobError(source, "<file>", f"not a readable onnxforge report: {first_line(e)}"))
    write_reports(loaded, output_dir)
    stdout.print(f"[green]wrote[/] {output_dir / 'report.md'} (from report.json, schema {loaded.schema_version})")


def _print_localisation(localisation: Localisation) -> None:
    first = localisation.first_diverging
    where = f"`{first.tensor}` ({first.op_type} {first.node}), {first.sqnr_db:.1f} dB" if first else "nowhere"
    stdout.print(f"error enters first at {escape(where)}", highlight=False)
    for step in localisation.ranked[:3]:
        stdout.print(
            f"  {step.local_sqnr_db:6.1f} dB local SQNR: {escape(step.tensor)} ({step.kind}, {step.op_type}); "
            f"exclude {escape(', '.join(step.culprits))}",
            highlight=False,
        )
    culprits = localisation.responsible_nodes(5)
    if culprits:
        stdout.print(f"to keep in float: quantize.exclude_nodes = {escape(str(culprits))}", highlight=False)


@app.command()
def placement(
    model: Annotated[Path, typer.Argument(help="The ONNX model to place.", exists=True, dir_okay=False)],
    backend: Annotated[str, typer.Option("--backend", "-b", help="The backend to place it on.")] = "cpu",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="A backend option as key=value (repeatable), e.g. profile=my.toml."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Say which node of MODEL runs where on BACKEND, why nodes fall back, and (FPGA) the cost and memory plan.

    Exit codes: 0 placed, 2 bad input (model, backend, options), 3 internal error.
    """
    from backends.resolve import resolve_target_from_pairs
    from pipeline.errors import OnnxforgeError
    from pipeline.parity.target import render_placement

    _configure_logging(verbose)
    try:
        target = resolve_target_from_pairs(backend, option or [])
        report = target.backend.placement(model, target.options)
    except OnnxforgeError as e:
        _fail(e)
    stdout.print("\n".join(render_placement(report, rows=40)), highlight=False, markup=False)
    _print_placement_line(report)


@app.command()
def backends() -> None:
    """List every backend: execution providers, availability (with reason and install hint), capabilities."""
    from rich.table import Table

    from backends.registry import list_backends

    table = Table(title="onnxforge backends")
    for column in ("name", "origin", "execution providers", "available", "int8 activations"):
        table.add_column(column)
    entries = list_backends()
    for entry in entries:
        backend = entry.backend
        table.add_row(
            entry.name,
            entry.origin,
            ", ".join(backend.execution_providers) if backend else "-",
            "[green]yes[/]" if entry.availability.ok else "[red]no[/]",
            backend.capabilities.int8_summary() if backend is not None else "-",
        )
    stdout.print(table)
    for entry in entries:
        if entry.availability.ok and entry.availability.detail:
            stdout.print(f"[bold]{entry.name}[/]: {entry.availability.detail}", highlight=False)
        if not entry.availability.ok:
            stdout.print(f"[bold]{entry.name}[/] unavailable: {entry.availability.reason}", highlight=False)
            if entry.availability.hint:
                stdout.print(f"  to install: {entry.availability.hint}", highlight=False)


@app.command()
def schema(output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file.")] = None) -> None:
    """Write the job file's JSON Schema (draft 2020-12) to stdout or FILE, so editors check job files as you type."""
    from pipeline.errors import StorageError
    from pipeline.job.schema import write_schema

    try:
        write_schema(output)
    except StorageError as e:
        _fail(e)


def _print_report(report: ParityReport) -> None:
    """The parity table (checked values with the digits their limits need), the summary lines, the verdict."""
    from rich.table import Table

    from pipeline.parity.console import console_table, summary_lines

    table = Table(title=f"parity: {report.job} on {report.data}, {report.samples} samples")
    header, rows = console_table(report)
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Names such as "export[batch=1]" are not rich markup; only the result is coloured.
        table.add_row(*(escape(cell) for cell in row[:-1]), _RESULT_STYLE.get(row[-1], row[-1]))
    stdout.print(table)
    for line in summary_lines(report):
        stdout.print(line, highlight=False, markup=False)
    verdict = "[green]PASS[/]" if report.verdict == "pass" else "[red]FAIL[/]"
    notes = "; ".join(f"{escape(s.target)}: {escape(s.share_note)}" for s in report.summary if s.share_note)
    stdout.print(f"verdict: {verdict}" + (f" [yellow]({notes})[/]" if notes else ""))


_RESULT_STYLE = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]"}


def _print_placement_line(placement: PlacementReport) -> None:
    """One line per placement: the share that falls back and, for an accelerator, its estimate."""
    from pipeline.parity.console import placement_line

    stdout.print(placement_line(placement), highlight=False, markup=False)


def _fail(error: OnnxforgeError) -> NoReturn:
    stderr.print("[red]error:[/]", end=" ")
    stderr.print(str(error), markup=False, highlight=False)
    raise typer.Exit(int(error.exit_code))


def main() -> None:
    """Console-script entry point: run the app; unexpected errors exit with code 3."""
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # last resort: say what broke, exit "internal error"
        from pipeline.errors import ExitCode

        stderr.print("[red]internal error:[/]", end=" ")
        stderr.print(f"{type(e).__name__}: {e}", markup=False, highlight=False)
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        sys.exit(int(ExitCode.INTERNAL_ERROR))
