"""Compare any two ONNX models on any two backends: the engine of `onnxforge parity A B`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from backends import registry as backend_registry
from pipeline.errors import BackendError, JobError
from pipeline.job import Fp32Policy, TaskPolicy
from pipeline.parity.localize import localize
from pipeline.parity.metrics import AccuracyCounter, OutputComparator
from pipeline.parity.policy import accuracy_drop_check, fp32_checks, task_checks
from pipeline.parity.report import AccuracyParity, Comparison, OutputParity, ParityReport

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def npz_batches(
    path: Path, inputs: dict[str, ir.Value], batch_size: int, labels: str | None
) -> Iterator[tuple[Feeds, np.ndarray | None]]:
    """Batches of an .npz whose arrays are named like the model inputs (first axis: samples).

    Raises:
        JobError: The file is missing or unreadable, lacks an input or the labels, or holds an
            input of another element type or rank than the model's.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise JobError(path, "--data", f"cannot read the .npz: {e}") from e
    missing = [name for name in [*inputs, *([labels] if labels else [])] if name not in data.files]
    if missing:
        raise JobError(path, "--data", f"no array named {', '.join(missing)}; it has {', '.join(data.files)}")
    for name, value in inputs.items():
        array, expected = data[name], np.dtype(value.dtype.numpy()) if value.dtype is not None else None
        if (expected is not None and array.dtype != expected) or (value.shape and array.ndim != len(value.shape)):
            rank = len(value.shape) if value.shape else "any"
            raise JobError(
                path,
                "--data",
                f"array {name!r} is {array.dtype} with {array.ndim} dims; "
                f"the model's input takes {expected}, {rank} dims",
            )
    samples = data[next(iter(inputs))].shape[0]
    for start in range(0, samples, batch_size):
        feeds = {name: data[name][start : start + batch_size] for name in inputs}
        yield feeds, (data[labels][start : start + batch_size] if labels else None)


def compare_models(
    reference: Path,
    candidate: Path,
    data: Path,
    *,
    reference_backend: str = "cpu",
    candidate_backend: str = "cpu",
    policy: TaskPolicy | None = None,
    exact: Fp32Policy | None = None,
    labels: str | None = None,
    batch_size: int = 32,
    localise: bool | None = None,
) -> ParityReport:
    """Run both models on the data and judge the candidate against the reference.

    Args:
        reference: The reference model.
        candidate: The candidate model.
        data: An .npz with one array per model input (and optionally labels).
        reference_backend: Backend the reference runs on.
        candidate_backend: Backend the candidate runs on.
        policy: Task-level gate (cosine, SNR, top-1, accuracy drop); default cosine >= 0.99.
        exact: Element-wise gate instead (atol / rtol), for models meant to be equal.
        labels: Name of the labels array, for top-1 accuracy.
        batch_size: Samples per run.
        localise: Find where the error enters: True always, None when the gate fails.

    Returns:
        The report (one comparison, and a localisation when asked or failing).

    Raises:
        JobError: A model or the data is unusable.
        BackendError: A backend is unknown or unavailable.
    """
    task = policy or TaskPolicy()
    sessions = [_open(path, name) for path, name in ((reference, reference_backend), (candidate, candidate_backend))]
    with sessions[0] as first, sessions[1] as second:
        names = first.output_names
        if second.output_names != names:
            raise JobError(candidate, "<model>", f"outputs {second.output_names} differ from the reference's {names}")
        inputs = {str(value.name): value for value in ir.load(reference).graph.inputs}
        # Top-1 agreement on the first output when the data has labels (a classifier).
        comparators = [
            OutputComparator(exact.rtol if exact else 1e-3, classifier=labels is not None and index == 0)
            for index in range(len(names))
        ]
        accuracy = [AccuracyCounter(), AccuracyCounter()]
        samples = 0
        batches = list(npz_batches(data, inputs, batch_size, labels))
        for feeds, truth in batches:
            expected, actual = first.run(feeds), second.run(feeds)
            for comparator, name in zip(comparators, names, strict=True):
                comparator.update(expected[name], actual[name])
            if truth is not None:
                accuracy[0].update(expected[names[0]], truth)
                accuracy[1].update(actual[names[0]], truth)
            samples += len(next(iter(feeds.values())))
    outputs = []
    for name, comparator in zip(names, comparators, strict=True):
        metrics = comparator.result()
        checks = fp32_checks(metrics, exact) if exact else task_checks(metrics, task)
        outputs.append(OutputParity(name=name, metrics=metrics, checks=checks))
    comparison = Comparison(
        stage="parity",
        target=candidate_backend
        if candidate_backend == reference_backend
        else f"{reference_backend}->{candidate_backend}",
        reference=reference.name,
        candidate=candidate.name,
        precision="fp32" if exact else "task",
        outputs=outputs,
        accuracy=_accuracy(names[0], accuracy, task) if labels else None,
    )
    localisations = []
    if localise or (localise is None and not comparison.passed):
        localisations.append(
            localize(
                ir.load(reference),
                ir.load(candidate),
                [feeds for feeds, _ in batches[:1]],
                reference_name=reference.name,
                candidate_name=candidate.name,
            )
        )
    notes = []
    if reference_backend != candidate_backend:
        notes.append("Localisation runs both graphs on the CPU provider, as written (no fusions).")
    return ParityReport.build(
        job=f"{candidate.name} vs {reference.name}",
        data=f"{data.name}",
        samples=samples,
        notes=notes if localisations else [],
        comparisons=[comparison],
        localisations=localisations,
    )


def _open(path: Path, backend_name: str):  # type: ignore[no-untyped-def]
    if not path.is_file():
        raise JobError(path, "<model>", "model file not found")
    backend = backend_registry.get_backend(backend_name)
    availability = backend.availability()
    if not availability.ok:
        raise BackendError(backend_name, availability.reason, availability.hint)
    return backend.open(path, backend.options_model())


def _accuracy(output: str, counters: list[AccuracyCounter], policy: TaskPolicy) -> AccuracyParity | None:
    if not counters[1].total:
        return None
    return AccuracyParity(
        output=output,
        reference=counters[0].accuracy,
        candidate=counters[1].accuracy,
        check=accuracy_drop_check(counters[0].accuracy, counters[1].accuracy, policy),
    )
