"""Compare any two ONNX models on any two backends: the engine of `onnxforge parity A B`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from backends.base import Session
from backends.resolve import resolve_target
from pipeline.errors import JobError
from pipeline.job import DEFAULT_BATCH_SIZE, Fp32Policy, Int8Policy, ParityPolicy, TaskPolicy
from pipeline.parity.chain import Link, ParityChain
from pipeline.parity.localize import localize
from pipeline.parity.report import ParityReport

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
    batch_size: int = DEFAULT_BATCH_SIZE,
    localise: bool | None = None,
) -> ParityReport:
    """Run both models on the data and judge the candidate against the reference.

    Args:
        reference: The reference model.
        candidate: The candidate model.
        data: An .npz with one array per model input (and optionally labels).
        reference_backend: Backend the reference runs on.
        candidate_backend: Backend the candidate runs on.
        policy: Task-level gate (cosine, SNR, top-1, accuracy drop); default: `TaskPolicy()`'s.
        exact: Element-wise gate instead (atol / rtol), for models meant to be equal.
        labels: Name of the labels array: the model is a classifier (top-1 agreement and
            accuracy on its first ``[samples, classes]`` output).
        batch_size: Samples per run.
        localise: Find where the error enters: True always, None when the gate fails.

    Returns:
        The report (one comparison, and a localisation when asked or failing).

    Raises:
        JobError: A model or the data is unusable.
        BackendError: A backend is unknown or unavailable.
    """
    link = _link(reference, candidate, reference_backend, candidate_backend, exact is not None)
    task = policy or TaskPolicy()
    rules = ParityPolicy(fp32=exact or Fp32Policy(), int8=Int8Policy.model_validate(task.model_dump()))
    chain, first_batch = _measure(link, rules.fp32.rtol, (reference, candidate), data, batch_size, labels)
    (comparison,) = chain.judge(rules)
    localisations = []
    if localise or (localise is None and not comparison.passed):
        pair = ir.load(reference), ir.load(candidate)
        localisations.append(localize(*pair, first_batch, reference_name=reference.name, candidate_name=candidate.name))
    cross_backend = reference_backend != candidate_backend
    notes = ["Localisation runs both graphs on the CPU provider, as written (no fusions)."] if cross_backend else []
    return ParityReport.build(
        job=f"{candidate.name} vs {reference.name}",
        data=f"{data.name}",
        samples=chain.samples,
        notes=notes if localisations else [],
        comparisons=[comparison],
        localisations=localisations,
    )


def _measure(
    link: Link, rtol: float, models: tuple[Path, Path], data: Path, batch_size: int, labels: str | None
) -> tuple[ParityChain, list[Feeds]]:
    """Both models over the .npz's batches (a classifier when there are labels); also the first batch."""
    reference, candidate = models
    with _open(reference, link.reference_run[0]) as first, _open(candidate, link.candidate_run[0]) as second:
        names = first.output_names
        if second.output_names != names:
            raise JobError(candidate, "<model>", f"outputs {second.output_names} differ from the reference's {names}")
        inputs = {str(value.name): value for value in ir.load(reference).graph.inputs}
        chain = ParityChain([link], names, rtol=rtol, is_classifier=labels is not None)
        first_batch: list[Feeds] = []
        for feeds, truth in npz_batches(data, inputs, batch_size, labels):
            expected, actual = first.run(feeds), second.run(feeds)
            runs = {link.reference_run: [expected[n] for n in names], link.candidate_run: [actual[n] for n in names]}
            chain.update(runs, len(next(iter(feeds.values()))), truth)
            first_batch = first_batch or [feeds]
    return chain, first_batch


def _link(reference: Path, candidate: Path, reference_backend: str, candidate_backend: str, exact: bool) -> Link:
    """The one link of a comparison by hand: element-wise when `exact`, else task-level."""
    same = candidate_backend == reference_backend
    return Link(
        stage="parity",
        target=candidate_backend if same else f"{reference_backend}->{candidate_backend}",
        reference=reference.name,
        candidate=candidate.name,
        precision="fp32" if exact else "task",
        reference_run=(reference_backend, reference.name),
        candidate_run=(candidate_backend, candidate.name),
    )


def _open(path: Path, backend_name: str) -> Session:
    """`path` opened on the backend with its default options.

    Raises:
        JobError: The model file is not there.
        BackendError: The backend is unknown, unavailable, or cannot load the model.
    """
    if not path.is_file():
        raise JobError(path, "<model>", "model file not found")
    target = resolve_target(backend_name)
    return target.backend.open(path, target.options)
