"""Judging candidate int8 models during quantization, on calibration data they were not calibrated on.

Every `HOLDOUT_EVERY`-th calibration batch is held out: ranges come from the others, and the search
judges each candidate on the held-out ones. A candidate judged on the batches it was calibrated on
looks better than it is (a residual CNN at 1.0000 top-1 agreement there failed at 0.977 on the
evaluation data); the evaluation data itself stays the final, untouched judge (validate stage).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.errors import StageError
from pipeline.feeds import Batch, FeedSource
from pipeline.job import ConversionJob
from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES
from pipeline.parity.chain import Link, ParityChain
from pipeline.parity.report import Comparison
from pipeline.records import StageName
from pipeline.threads import session_options

# One calibration batch in this many is held out for judging (with at least this many batches).
HOLDOUT_EVERY = 4
# The search aims this share inside each int8 limit (`ParityPolicy.with_int8_margin`): a few
# held-out batches estimate the evaluation figures with sampling error, and a candidate that
# barely passes them fails the final judge about half the time (MiniLM: 0.9952 held out, 0.99500
# on the evaluation sentences, limit 0.995).
JUDGE_MARGIN = 0.1
# Run names of the judge's two models (the float model runs once, its outputs kept).
CPU, FLOAT, CANDIDATE = "cpu", "float", "candidate"


def is_held_out(index: int) -> bool:
    """Whether calibration batch `index` is held out for judging, not calibrated on.

    Data of fewer than `HOLDOUT_EVERY` batches has no such index, so nothing is held out there (a
    third or half of so little data would cost calibration more than judging on it costs
    honesty): its batches both calibrate and judge, and the report says so.
    """
    return index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def calibration_part(data: FeedSource) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of the batches ranges are calibrated on."""
    return (batch.feeds for index, batch in enumerate(data) if not is_held_out(index))


def held_out_part(data: FeedSource) -> tuple[list[Batch], int]:
    """The batches candidates are judged on, and how many batches the data has, in one pass.

    Too little data to hold any batch out: every batch (at most `HOLDOUT_EVERY` - 1) judges.
    """
    held: list[Batch] = []
    first: list[Batch] = []
    batches = 0
    for index, batch in enumerate(data):
        batches += 1
        if index < HOLDOUT_EVERY - 1:
            first.append(batch)
        elif is_held_out(index):
            held.append(batch)
    return held or first, batches


def describe_held_out(batches: int, held_out: list[Batch]) -> str:
    """What the search judged on, for the report."""
    samples = sum(batch.size for batch in held_out)
    margin = f"int8 limits tightened by {JUDGE_MARGIN:.0%} toward perfect"
    if batches < HOLDOUT_EVERY:
        return (
            f"the {batches} calibration batch(es) ({samples} samples), which ranges were also calibrated on; {margin}"
        )
    return f"{len(held_out)} held-out calibration batches of {batches} ({samples} samples), not calibrated on; {margin}"


class PolicyJudge:
    """Judges candidate int8 models against the float model on the held-out calibration batches.

    The judging is the parity engine's (`pipeline.parity.chain`), with the job's own int8 policy
    tightened by `JUDGE_MARGIN`: the checks that apply to each output are the ones validation
    applies. Without labels in the calibration data, the classifier output's top-1 agreement
    bounds the accuracy drop.
    """

    def __init__(self, job: ConversionJob, float_model: Path, held_out: list[Batch]) -> None:
        self._job = job
        self._policy = job.parity.with_int8_margin(JUDGE_MARGIN)
        self._feeds = [batch.feeds for batch in held_out]
        self._labels = [batch.labels for batch in held_out]
        session = open_cpu_session(float_model)
        self._names = [output.name for output in session.get_outputs()]
        self._references = [session.run(self._names, feeds) for feeds in self._feeds]

    @property
    def first_feeds(self) -> dict[str, np.ndarray]:
        """The first judged batch (the latency of candidates is timed on it)."""
        return self._feeds[0]

    def damage(self, model: onnx.ModelProto) -> float:
        """1 - cosine of the worst output on the first batch: a continuous harm score."""
        comparison = self._compare(model, batches=1)
        return max(1.0 - output.metrics.cosine_mean for output in comparison.outputs)

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        """Whether the candidate meets the int8 policy on the judged batches, and its figures."""
        comparison = self._compare(model, batches=len(self._feeds))
        figures = [
            f"{check.metric} {check.value:.4f}"
            for output in comparison.outputs
            for check in output.checks
            if check.metric != "nan_inf_count"
        ]
        if comparison.accuracy is not None and comparison.accuracy.check is not None:
            check = comparison.accuracy.check
            figures.append(f"accuracy drop bound ({check.metric}) {check.value:.4f}")
        summary = ", ".join(figures)
        return comparison.passed, summary

    def _compare(self, model: onnx.ModelProto, batches: int) -> Comparison:
        session = open_cpu_session(model)
        link = Link.on_target(StageName.QUANTIZE, CPU, FLOAT, CANDIDATE, "int8")
        chain = ParityChain([link], self._names, rtol=self._job.parity.fp32.rtol, is_classifier=self._job.is_classifier)
        for feeds, labels, reference in zip(
            self._feeds[:batches], self._labels[:batches], self._references[:batches], strict=True
        ):
            runs = {link.reference_run: list(reference), link.candidate_run: session.run(self._names, feeds)}
            chain.update(runs, len(next(iter(feeds.values()))), labels)
        (comparison,) = chain.judge(self._policy, agreement_bounds_drop=True)
        return comparison


def open_cpu_session(model: Path | onnx.ModelProto) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of a model file or an in-memory model.

    Raises:
        StageError: An in-memory model over protobuf's 2 GiB limit.
    """
    options = session_options()
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
            raise StageError("quantize", "", "mixed precision cannot judge a model over 2 GiB in memory")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
