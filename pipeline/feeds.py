"""Sample data for calibration and parity: validated batches from an .npz or a factory."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.artifacts import sha256_file
from pipeline.errors import JobError
from pipeline.imports import resolve_import
from pipeline.job import DataSource, InputSpec

logger = logging.getLogger(__name__)


def feeds_digest(feeds: dict[str, np.ndarray]) -> str:
    """A content hash of one batch of feeds: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, array in feeds.items():
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def describe_source(source: DataSource, section: str) -> str:
    """A data source in a report: ``evaluation data (heldout.npz)``."""
    where = source.npz.name if source.npz is not None else source.factory
    return f"{section} data ({where})"


@dataclass(frozen=True)
class Batch:
    """One batch of model inputs, with class labels when the data has them."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of samples in the batch (the first axis)."""
        first = next(iter(self.feeds.values()))
        return int(first.shape[0]) if first.ndim else 1


class FeedSource:
    """A re-iterable stream of batches, each checked against the job's input specs.

    Args:
        source: The job's data source section.
        inputs: The model's input specs.
        origin: The job file, for error messages.
        key: The job section ("calibration" or "evaluation"), for error messages.
        python_path: Folders searched first when importing a data factory.
    """

    def __init__(
        self,
        source: DataSource,
        inputs: list[InputSpec],
        *,
        origin: str,
        key: str,
        python_path: list[Path],
    ) -> None:
        self._source = source
        self._inputs = inputs
        self._origin = origin
        self._key = f"{key}.npz" if source.npz is not None else f"{key}.factory"
        self._python_path = python_path
        self._digest: str | None = None
        self._dropped: int | None = None
        self._extend: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    @property
    def dropped_samples(self) -> int | None:
        """Samples left out for NaN or infinity (``nonfinite = "drop"``) in the last complete pass
        over the data (None: no pass has completed yet)."""
        return self._dropped

    def check(self) -> None:
        """Validate the source up front: every batch of an .npz (NaN and infinity included), or a
        factory's first batch (later batches are checked as they stream).

        Raises:
            JobError: The data cannot be read, does not match the input specs, holds NaN or
                infinity (unless they are dropped), or yields no batches.
        """
        batches = iter(self) if self._source.npz is not None else islice(self, 1)
        if sum(1 for _ in batches) == 0:
            dropped = f" ({self._dropped} samples with NaN or infinity were dropped)" if self._dropped else ""
            raise JobError(self._origin, self._key, f"the data source yielded no batches{dropped}")

    def digest(self) -> str:
        """A content hash of the data as batched (file hash for an .npz, the batches for a factory).

        Computed once per source: the stage cache and the calibration cache both ask.
        """
        if self._digest is None:
            batching = f"batch_size={self._source.batch_size};max={self._source.max_batches}"
            # Dropping changes the batches: its mode is part of the data (the default keeps old digests).
            mode = ";nonfinite=drop" if self._source.nonfinite == "drop" else ""
            digest = hashlib.sha256(f"{batching}{mode}".encode())
            if self._source.npz is not None:
                digest.update(sha256_file(self._source.npz).encode())
            else:
                for batch in self:
                    digest.update(feeds_digest(batch.feeds).encode())
            self._digest = digest.hexdigest()
        return self._digest

    def extend_feeds(self, extend: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        """Complete every checked batch with inputs the model needs and the data does not carry
        (a decoder's position ids and empty past caches), after the checks against the job's inputs.

        Args:
            extend: The job's feeds of a batch -> the model's feeds.
        """
        self._extend = extend

    def __iter__(self) -> Iterator[Batch]:
        # A factory that takes an epoch (training data) reads its first epoch for checks and hashes.
        raw_batches = self._npz_batches() if self._source.npz is not None else self._factory_batches({"epoch": 1})
        return self._checked(raw_batches)

    def epoch(self, epoch: int, seed: int) -> Iterator[Batch]:
        """One training epoch's batches: an .npz's samples in a random order drawn from
        ``(seed, epoch)``; a factory's batches as it yields them, passing ``epoch=`` when it takes one.

        Args:
            epoch: The epoch number.
            seed: The training seed.
        """
        if self._source.npz is not None:
            return self._checked(self._npz_batches(np.random.default_rng((seed, epoch))))
        return self._checked(self._factory_batches({"epoch": epoch}))

    def _checked(self, raw_batches: Iterator[Mapping[str, np.ndarray]]) -> Iterator[Batch]:
        """Validated batches, NaN / infinity refused or dropped; a complete pass records the drops."""
        dropped = samples = 0
        for index, raw in enumerate(islice(raw_batches, self._source.max_batches)):
            batch = self._validated(index, raw)
            finite = self._finite(index, batch)
            samples += batch.size
            dropped += batch.size - (finite.size if finite is not None else 0)
            if finite is not None:
                yield finite if self._extend is None else Batch(self._extend(finite.feeds), finite.labels)
        if dropped and self._dropped is None:
            where = describe_source(self._source, self._section)
            logger.warning(
                '%s: dropped %d of %d samples holding NaN or infinity (%s.nonfinite = "drop")',
                where,
                dropped,
                samples,
                self._section,
            )
        self._dropped = dropped

    def _finite(self, index: int, batch: Batch) -> Batch | None:
        """The batch without its samples holding NaN or infinity (None: none is left).

        Raises:
            JobError: The batch holds such values and the source's ``nonfinite`` is "error".
        """
        bad = np.zeros(batch.size, dtype=bool)
        for spec in self._inputs:
            counts = _nonfinite_per_sample(batch.feeds[spec.name], batch.size)
            if counts is None:
                continue
            if self._source.nonfinite == "error":
                problem = self._nonfinite_problem(index, spec.name, batch.feeds[spec.name], counts)
                raise JobError(self._origin, self._key, problem)
            bad |= counts > 0
        if not bad.any():
            return batch
        keep = ~bad
        if not keep.any():
            return None
        labels = batch.labels[keep] if batch.labels is not None else None
        return Batch(feeds={name: _rows(array, keep) for name, array in batch.feeds.items()}, labels=labels)

    def _nonfinite_problem(self, index: int, name: str, array: np.ndarray, counts: np.ndarray) -> str:
        where = self._source.npz if self._source.npz is not None else f"the batches of {self._source.factory}"
        total = int(np.count_nonzero(~np.isfinite(array)))
        return (
            f"{where}: batch {index}, input {name!r}: {total} non-finite value{'s' if total != 1 else ''} "
            f"(NaN or infinity) in {int(np.count_nonzero(counts))} of its {counts.size} samples; such values can be "
            f'neither calibrated nor compared: fix the data, or set {self._section}.nonfinite = "drop" to leave '
            "those samples out"
        )

    @property
    def _section(self) -> str:
        """The job section of this data (``calibration``, ``distill.data``), for messages."""
        return self._key.rsplit(".", 1)[0]

    def _npz_batches(self, shuffle: np.random.Generator | None = None) -> Iterator[Mapping[str, np.ndarray]]:
        path = self._source.npz
        assert path is not None
        try:
            # allow_pickle=False: an .npz from elsewhere must never run code when loaded.
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as e:
            # numpy reports a non-archive file as "pickled data": say what we really refuse.
            raise JobError(
                self._origin,
                self._key,
                f"cannot read {path} as an .npz of arrays (np.savez output; pickled objects are refused): {e}",
            ) from e
        counts = {name: array.shape[0] if array.ndim else -1 for name, array in arrays.items()}
        if len(set(counts.values())) > 1:
            raise JobError(
                self._origin, self._key, f"arrays in {path.name} differ in sample count (first axis): {counts}"
            )
        total = max(next(iter(counts.values()), 0), 0)
        order = None if shuffle is None else shuffle.permutation(total)
        step = self._source.batch_size
        for start in range(0, total, step):
            # File order takes views; a shuffled epoch gathers its rows.
            rows = slice(start, start + step) if order is None else order[start : start + step]
            yield {name: array[rows] for name, array in arrays.items()}

    def _factory_batches(self, optional: dict[str, int]) -> Iterator[Mapping[str, np.ndarray]]:
        """The factory's batches; `optional` keywords are passed when the factory accepts them."""
        spec = self._source.factory
        assert spec is not None
        factory = resolve_import(spec, self._python_path, origin=self._origin, key=self._key)
        try:
            produced = factory(**_accepted(factory, optional))
        except Exception as e:  # user code; report whatever it raised
            raise JobError(self._origin, self._key, f"{spec} raised {type(e).__name__}: {e}") from e
        if not isinstance(produced, Iterable):
            raise JobError(
                self._origin,
                self._key,
                f"{spec} returned {type(produced).__name__}; expected an iterable of {{input name: array}} dicts",
            )
        yield from produced

    def _validated(self, index: int, raw: Mapping[str, np.ndarray]) -> Batch:
        where = f"batch {index}"
        if not isinstance(raw, Mapping):
            raise JobError(self._origin, self._key, f"{where} is a {type(raw).__name__}; expected a dict of arrays")
        labels_key = self._source.labels
        expected = {spec.name for spec in self._inputs}
        given = set(raw) - {labels_key}
        if given != expected:
            raise JobError(
                self._origin,
                self._key,
                f"{where} has arrays {sorted(given)}; expected exactly the model inputs {sorted(expected)}"
                + (f" (plus labels {labels_key!r})" if labels_key else ""),
            )
        feeds = {spec.name: self._checked_array(where, spec, raw[spec.name]) for spec in self._inputs}
        self._check_shared_dims(where, feeds)
        labels = None
        if labels_key is not None:
            labels = self._checked_labels(where, raw.get(labels_key), feeds)
        return Batch(feeds=feeds, labels=labels)

    def _checked_array(self, where: str, spec: InputSpec, value: object) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != np.dtype(spec.dtype):
            raise JobError(
                self._origin,
                self._key,
                f"{where}, input {spec.name!r}: dtype {array.dtype}; expected {spec.dtype}",
            )
        fixed_ok = all(isinstance(dim, str) or dim == size for dim, size in zip(spec.shape, array.shape, strict=False))
        if array.ndim != len(spec.shape) or not fixed_ok:
            raise JobError(
                self._origin,
                self._key,
                f"{where}, input {spec.name!r}: shape {list(array.shape)}; expected {spec.shape}",
            )
        return np.ascontiguousarray(array)

    def _check_shared_dims(self, where: str, feeds: dict[str, np.ndarray]) -> None:
        seen: dict[str, tuple[str, int]] = {}
        for spec in self._inputs:
            for axis, dim in spec.dynamic_axes.items():
                size = int(feeds[spec.name].shape[axis])
                first = seen.setdefault(dim, (spec.name, size))
                if first[1] != size:
                    raise JobError(
                        self._origin,
                        self._key,
                        f"{where}: dimension {dim!r} is {first[1]} in input {first[0]!r} "
                        f"but {size} in input {spec.name!r}; named dims must agree",
                    )

    def _checked_labels(self, where: str, value: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
        labels = np.asarray(value) if value is not None else None
        samples = next(iter(feeds.values())).shape[0]
        if labels is None or labels.shape != (samples,) or not np.issubdtype(labels.dtype, np.integer):
            got = "nothing" if labels is None else f"{labels.dtype} {list(labels.shape)}"
            raise JobError(
                self._origin,
                self._key,
                f"{where}: labels {self._source.labels!r} are {got}; expected integers of shape [{samples}]",
            )
        return labels


def _nonfinite_per_sample(array: np.ndarray, samples: int) -> np.ndarray | None:
    """NaN and infinite values per sample of one float input (None: there are none).

    An additive attention mask (every value 0 or -inf) is no bad data: its -inf are what mask,
    and calibration keeps the nodes they reach float. An input without the batch's sample axis
    counts against every sample.
    """
    if not np.issubdtype(array.dtype, np.inexact):
        return None
    nonfinite = ~np.isfinite(array)
    if not nonfinite.any() or _is_additive_mask(array):
        return None
    if array.ndim and array.shape[0] == samples:
        return nonfinite.reshape(samples, -1).sum(axis=1)
    return np.full(samples, int(nonfinite.sum()))


def _is_additive_mask(array: np.ndarray) -> bool:
    """Every value is 0 (attend) or -inf (masked out), as in a transformer's attention mask."""
    return bool(np.all((array == 0) | (array == -np.inf)))


def _rows(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The kept samples of an input (an input without the sample axis is kept whole)."""
    return array[keep] if array.ndim and array.shape[0] == keep.size else array


def _accepted(function: Callable[..., object], keywords: dict[str, int]) -> dict[str, int]:
    """The keywords `function` takes by name (all of them when it has ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return keywords
    named = {name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in keywords.items() if key in named}
