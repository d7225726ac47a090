"""Where the validate stage's outputs come from: every model run on each batch as it streams (all
sessions open together), or, for models too large to hold together, one model at a time.

One model at a time: PyTorch runs first on every request (each evaluation batch and each extra
shape), then its weights are released (above 1 GiB: `pipeline.stages.source_weights`); then each
session opens alone, runs every request and closes (the speed guard opens its pair together).
Every output goes to a scratch folder as it is produced, and the comparisons read a batch's
outputs back from there, so memory holds one model and one batch's outputs, not all of them.
The figures are the same either way: the same runs, in another order.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from backends.base import Session
from pipeline.parity.chain import RunKey, Runs
from pipeline.processes import release_freed_memory

logger = logging.getLogger(__name__)

#: Above this many bytes of model files (external data included) in one job, validate holds one
#: model at a time: a 1 B-parameter decoder's fp32, simplified and int4 models are 10 GB together.
HOLD_ONE_ABOVE_BYTES = 2 * 2**30

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class RunRequest:
    """One input the stage runs every model on.

    Attributes:
        kind: "evaluation" (a batch of the evaluation data) or "shape" (an export.check_shapes size).
        index: Its position among the requests of its kind.
        feeds: The inputs.
    """

    kind: str
    index: int
    feeds: Feeds


class BatchRuns(Protocol):
    """Every model's outputs on one request."""

    def runs(self, request: RunRequest) -> Runs:
        """The outputs of every run key on `request`."""
        ...


@dataclass
class LiveRuns:
    """All sessions open: each request runs through every model when asked (`run_all`)."""

    run_all: Callable[[Feeds], Runs]

    def runs(self, request: RunRequest) -> Runs:
        """Run every model on the request's feeds."""
        return self.run_all(request.feeds)


class RunStore:
    """Outputs by (request, run key), in a scratch folder under the stage's work folder (deleted on
    `close`). Keys that share outputs (PyTorch's, the same on every target) share one file."""

    def __init__(self, workdir: Path) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix=".validate-runs-", dir=workdir))
        self._files: dict[tuple[str, int], dict[RunKey, list[Path]]] = {}

    def put(self, request: RunRequest, keys: Sequence[RunKey], outputs: Sequence[np.ndarray]) -> None:
        """Keep `outputs` as the outputs of every key in `keys` on `request`."""
        stem = f"{request.kind}-{request.index}-{len(self._files.get((request.kind, request.index), {}))}"
        paths = []
        for position, value in enumerate(outputs):
            path = self._folder / f"{stem}-{position}.npy"
            np.save(path, np.ascontiguousarray(value), allow_pickle=False)
            paths.append(path)
        slot = self._files.setdefault((request.kind, request.index), {})
        for key in keys:
            slot[key] = paths

    def runs(self, request: RunRequest) -> Runs:
        """Every key's outputs on `request`, read back."""
        slot = self._files.get((request.kind, request.index), {})
        return {key: [np.load(path, allow_pickle=False) for path in paths] for key, paths in slot.items()}

    def close(self) -> None:
        """Delete the scratch folder."""
        shutil.rmtree(self._folder, ignore_errors=True)


@dataclass
class OneAtATime:
    """How to run each model, for `record_one_at_a_time`.

    Attributes:
        requests: Every request the stage will ask about, in order (may be called twice).
        torch_runs: PyTorch's outputs on feeds, by the keys they stand for (empty: no PyTorch model).
        after_torch: Called once PyTorch has run every request (releases its weights).
        keys: The sessions' run keys, in the order to open them.
        open_session: Opens one key's session.
        clean: A key's outputs as the comparisons take them (a decoder's padding zeroed).
        output_names: The outputs, in order.
        on_session: Called with each open session after its requests ran (generation parity).
    """

    requests: Callable[[], Iterator[RunRequest]]
    torch_runs: Callable[[Feeds], dict[tuple[RunKey, ...], list[np.ndarray]]]
    after_torch: Callable[[], None]
    keys: Sequence[RunKey]
    open_session: Callable[[RunKey], Session]
    clean: Callable[[Feeds, list[np.ndarray]], list[np.ndarray]]
    output_names: Sequence[str]
    on_session: Callable[[RunKey, Session], None]


def record_one_at_a_time(plan: OneAtATime, store: RunStore) -> None:
    """Run PyTorch, then each session alone, on every request, into `store`."""
    for request in plan.requests():
        for keys, outputs in plan.torch_runs(request.feeds).items():
            store.put(request, keys, plan.clean(request.feeds, outputs))
    plan.after_torch()
    release_freed_memory()
    for key in plan.keys:
        logger.info("validate: running %s on %s alone", key[1], key[0])
        with plan.open_session(key) as session:
            for request in plan.requests():
                produced = session.run(request.feeds)
                store.put(request, [key], plan.clean(request.feeds, [produced[name] for name in plan.output_names]))
            plan.on_session(key, session)
        release_freed_memory()  # this model's weights are gone before the next one loads


@dataclass
class RecordedRuns:
    """Runs read back from a `RunStore` (`record_one_at_a_time` filled it)."""

    store: RunStore

    def runs(self, request: RunRequest) -> Runs:
        """Every key's outputs on `request`."""
        return self.store.runs(request)
