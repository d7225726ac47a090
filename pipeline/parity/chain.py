"""The parity engine: compare models' outputs link by link, batch by batch, and judge each link.

Running models is kept apart from comparing them (as Polygraphy keeps its runners apart from its
comparator): the caller runs every model on a batch, on whatever backend, and hands the outputs
over as `Runs`; a `ParityChain` accumulates each `Link`'s metrics and accuracy in constant
memory, and `judge_link` alone decides which checks apply to which output: the policy of the
link's precision (with per-output overrides), top-1 agreement and the accuracy drop only on the
classifier output. Validation, `onnxforge parity` and the mixed-precision search all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.job import Fp32Policy, ParityPolicy, Precision, TaskPolicy
from pipeline.outputs import classifier_index
from pipeline.parity.metrics import AccuracyCounter, OutputComparator, OutputMetrics
from pipeline.parity.policy import Check, accuracy_drop_check, agreement_bound_check, fp32_checks, task_checks
from pipeline.parity.report import AccuracyParity, Comparison, OutputParity

# (where it ran, what ran): a target name and a model name ("pytorch", a model file).
RunKey = tuple[str, str]
# Every model's outputs on one batch, in the chain's output order.
Runs = dict[RunKey, list[np.ndarray]]


@dataclass(frozen=True)
class Link:
    """One comparison of the chain: a candidate's outputs against its reference's.

    Attributes:
        stage: The stage whose output is the candidate ("parity" for two models given by hand).
        target: The target named in the report (e.g. ``cpu``, or ``cpu->cuda``).
        reference: What the candidate is compared to ("pytorch" or a model file).
        candidate: The candidate model.
        precision: Which policy judges it.
        reference_run: Where to find the reference's outputs in `Runs`.
        candidate_run: Where to find the candidate's outputs in `Runs`.
    """

    stage: str
    target: str
    reference: str
    candidate: str
    precision: Precision
    reference_run: RunKey
    candidate_run: RunKey

    @classmethod
    def on_target(cls, stage: str, target: str, reference: str, candidate: str, precision: Precision) -> Link:
        """A link whose reference and candidate both ran on `target`."""
        return cls(stage, target, reference, candidate, precision, (target, reference), (target, candidate))


@dataclass(frozen=True)
class OutputRoles:
    """The outputs every model of a chain returns, and which one is the classifier.

    Attributes:
        names: Output names, in order.
        classifier: Index of the classifier output (the first ``[samples, classes]`` output of a
            classifier job), the only one top-1 agreement and accuracy apply to; None: no classifier.
    """

    names: tuple[str, ...]
    classifier: int | None

    @classmethod
    def of(cls, names: Sequence[str], shapes: Sequence[tuple[int, ...]], is_classifier: bool) -> OutputRoles:
        """The roles of outputs with these shapes (one batch's), for a classifier job or not."""
        return cls(tuple(names), classifier_index(list(shapes)) if is_classifier else None)

    @property
    def classifier_name(self) -> str | None:
        """The classifier output's name (None: no classifier)."""
        return None if self.classifier is None else self.names[self.classifier]


class ParityChain:
    """Accumulates every link's metrics over the batches it is given, then judges each link.

    Args:
        links: The comparisons to make.
        names: The outputs every model returns, in the order of the runs' arrays.
        rtol: The relative tolerance the metrics' ``min_atol`` is computed for.
        is_classifier: The job's outputs are class scores (top-1 agreement and accuracy then
            apply to the first ``[samples, classes]`` output, and to it alone).
    """

    def __init__(self, links: Sequence[Link], names: Sequence[str], *, rtol: float, is_classifier: bool) -> None:
        self.links = list(links)
        self._names = list(names)
        self._rtol = rtol
        self._is_classifier = is_classifier
        self.roles: OutputRoles | None = None
        self._comparators: dict[Link, list[OutputComparator]] = {}
        self._accuracy: dict[RunKey, AccuracyCounter] = {}
        self.samples = 0

    def update(self, runs: Runs, samples: int, labels: np.ndarray | None = None) -> None:
        """Compare one batch's outputs along every link (and count accuracy when there are labels)."""
        roles = self._roles(runs)
        for link in self.links:
            reference, candidate = runs[link.reference_run], runs[link.candidate_run]
            for comparator, ref, cand in zip(self._comparators[link], reference, candidate, strict=True):
                comparator.update(ref, cand)
        if roles.classifier is not None and labels is not None:
            for key in dict.fromkeys(key for link in self.links for key in (link.reference_run, link.candidate_run)):
                self._accuracy.setdefault(key, AccuracyCounter()).update(runs[key][roles.classifier], labels)
        self.samples += samples

    def _roles(self, runs: Runs) -> OutputRoles:
        """The output roles, fixed on the first batch (and the comparators made for them)."""
        if self.roles is None:
            shapes = [array.shape for array in runs[self.links[0].reference_run]]
            self.roles = OutputRoles.of(self._names, shapes, self._is_classifier)
            for link in self.links:
                self._comparators[link] = [
                    OutputComparator(self._rtol, classifier=index == self.roles.classifier)
                    for index in range(len(self._names))
                ]
        return self.roles

    @property
    def accuracy_measured(self) -> bool:
        """Accuracy was counted (a classifier output and labelled data)."""
        return bool(self._accuracy)

    def metrics(self, link: Link) -> list[OutputMetrics]:
        """A link's metrics per output, over the batches so far."""
        return [comparator.result() for comparator in self._comparators[link]]

    def accuracy(self, link: Link) -> tuple[float, float] | None:
        """Top-1 accuracy of the link's reference and candidate (None: not measured)."""
        reference = self._accuracy.get(link.reference_run)
        candidate = self._accuracy.get(link.candidate_run)
        if reference is None or candidate is None or not candidate.total:
            return None
        return reference.accuracy, candidate.accuracy

    def judge(self, policy: ParityPolicy, *, agreement_bounds_drop: bool = False) -> list[Comparison]:
        """Every link judged by `policy` (see `judge_link`), in link order."""
        assert self.roles is not None, "judge() needs at least one batch"
        return [
            judge_link(link, self.metrics(link), self.roles, self.accuracy(link), policy, agreement_bounds_drop)
            for link in self.links
        ]


def judge_link(
    link: Link,
    metrics: Sequence[OutputMetrics],
    roles: OutputRoles,
    accuracy: tuple[float, float] | None,
    policy: ParityPolicy,
    agreement_bounds_drop: bool = False,
) -> Comparison:
    """Judge one link: the one place that decides which checks apply to which output.

    Each output gets the rule of the link's precision (`ParityPolicy.for_link`): element-wise for
    fp32 links, task-level otherwise. Top-1 agreement is measured on the classifier output only,
    and the accuracy drop is checked on it only, from labelled accuracy; without labels and with
    `agreement_bounds_drop`, its top-1 agreement bounds the drop instead (the mixed-precision
    search judges unlabelled calibration data this way).

    Args:
        link: The comparison.
        metrics: Its metrics per output, in `roles.names` order.
        roles: The outputs and the classifier among them.
        accuracy: Labelled top-1 accuracy of the reference and the candidate (None: not measured).
        policy: The job's parity policy.
        agreement_bounds_drop: Without labels, check the classifier's top-1 agreement against
            the accuracy-drop limit.

    Returns:
        The comparison, with every check.
    """
    outputs = []
    for index, (name, output_metrics) in enumerate(zip(roles.names, metrics, strict=True)):
        rule = policy.for_link(link.precision, name)
        checks = _checks(output_metrics, rule)
        if agreement_bounds_drop and accuracy is None and index == roles.classifier and isinstance(rule, TaskPolicy):
            checks += _optional(agreement_bound_check(output_metrics, rule))
        outputs.append(OutputParity(name=name, metrics=output_metrics, checks=checks))
    return Comparison(
        stage=link.stage,
        target=link.target,
        reference=link.reference,
        candidate=link.candidate,
        precision=link.precision,
        outputs=outputs,
        accuracy=_accuracy_parity(link, roles, accuracy, policy),
    )


def _checks(metrics: OutputMetrics, rule: Fp32Policy | TaskPolicy) -> list[Check]:
    return fp32_checks(metrics, rule) if isinstance(rule, Fp32Policy) else task_checks(metrics, rule)


def _optional(check: Check | None) -> list[Check]:
    return [] if check is None else [check]


def _accuracy_parity(
    link: Link, roles: OutputRoles, accuracy: tuple[float, float] | None, policy: ParityPolicy
) -> AccuracyParity | None:
    """The classifier's labelled accuracy, with the drop checked on task-level links."""
    name = roles.classifier_name
    if accuracy is None or name is None:
        return None
    reference, candidate = accuracy
    rule = policy.for_link(link.precision, name)
    check = accuracy_drop_check(reference, candidate, rule) if isinstance(rule, TaskPolicy) else None
    return AccuracyParity(output=name, reference=reference, candidate=candidate, check=check)
