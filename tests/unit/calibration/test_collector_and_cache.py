"""Unit tests of tensor selection, streamed statistics collection and the calibration cache.

The model is a tiny masked attention block (``Softmax(x @ W + mask) @ W2``) whose ``mask`` input
holds 0 and -inf, as attention masks do.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.calibration import cache, collector
from pipeline.calibration.collector import CalibrationStats, collect_statistics, select_tensors
from pipeline.calibration.histogram import BINS, HISTOGRAM_SAMPLE, TensorHistogram
from pipeline.calibration.ranges import compute_range
from tests.unit.calibration.masked_attention import (
    MASK,
    MASKED,
    PROBS,
    SCORES,
    X,
    Y,
    batches,
    masked_attention_data,
    masked_attention_model,
)

BATCH = 16
SAMPLES = 96


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return masked_attention_model()


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return masked_attention_data(SAMPLES)


@pytest.fixture(scope="module")
def tensors(model: onnx.ModelProto) -> list[str]:
    return select_tensors(model, None)


@pytest.fixture(scope="module")
def stats(
    model: onnx.ModelProto, data: dict[str, np.ndarray], tensors: list[str], tmp_path_factory: pytest.TempPathFactory
) -> CalibrationStats:
    folder = tmp_path_factory.mktemp("collect")
    return collect_statistics(model, folder, tensors, batches(data, BATCH), histograms=True)


def collect(model: onnx.ModelProto, folder: Path, tensors: list[str], data: dict[str, np.ndarray]) -> CalibrationStats:
    return collect_statistics(model, folder, tensors, batches(data, BATCH), histograms=True)


def half(data: dict[str, np.ndarray], first: bool) -> dict[str, np.ndarray]:
    middle = SAMPLES // 2
    return {name: array[:middle] if first else array[middle:] for name, array in data.items()}


def test_select_tensors_of_matmul_nodes(model: onnx.ModelProto) -> None:
    assert select_tensors(model, {"MatMul"}) == [X, SCORES, PROBS, Y]  # weights are not activations


def test_select_inputs_only(model: onnx.ModelProto) -> None:
    assert select_tensors(model, {"MatMul"}, outputs=False) == [X, PROBS]


def test_select_every_float_activation(tensors: list[str]) -> None:
    assert tensors == [X, SCORES, MASK, MASKED, PROBS, Y]


def test_select_nothing_for_absent_op_types(model: onnx.ModelProto) -> None:
    assert select_tensors(model, {"Conv"}) == []
    assert select_tensors(model, {"Softmax"}) == [MASKED, PROBS]


def test_select_needs_value_info() -> None:
    # Without shape inference the intermediates have no type: only graph inputs and outputs qualify.
    bare = masked_attention_model()
    del bare.graph.value_info[:]

    assert select_tensors(bare, None) == [X, MASK, Y]


def test_collect_counts_batches_samples_and_values(stats: CalibrationStats, tensors: list[str]) -> None:
    assert stats.batches == math.ceil(SAMPLES / BATCH)
    assert stats.samples == SAMPLES
    assert list(stats.tensors) == tensors
    for name in (X, SCORES, MASKED, PROBS):
        histogram = stats.tensors[name]
        assert histogram.finite + histogram.nonfinite + histogram.huge == SAMPLES * 8, name
        assert histogram.counts.sum() == histogram.finite


def test_collect_matches_the_data(stats: CalibrationStats, data: dict[str, np.ndarray]) -> None:
    x = stats.tensors[X]
    assert (x.minimum, x.maximum) == (float(data[X].min()), float(data[X].max()))
    masked_out = int(np.isinf(data[MASK]).sum())
    assert stats.tensors[MASK].nonfinite == masked_out
    assert stats.tensors[MASK].finite == data[MASK].size - masked_out
    probs = stats.tensors[PROBS]
    assert probs.nonfinite == 0 and 0.0 <= probs.minimum and probs.maximum <= 1.0


def test_masked_scores_are_irregular_with_finite_ranges(stats: CalibrationStats, data: dict[str, np.ndarray]) -> None:
    masked = stats.tensors[MASKED]

    assert masked.nonfinite == int(np.isinf(data[MASK]).sum()) > 0
    assert math.isfinite(masked.minimum) and math.isfinite(masked.maximum)
    for method in ("minmax", "percentile", "entropy", "mse"):
        low, high = compute_range(masked, method)
        assert math.isfinite(low) and math.isfinite(high) and low < high, method
    assert stats.tensors[SCORES].nonfinite == 0  # before the mask is added


def test_collect_without_histograms_keeps_min_max(
    model: onnx.ModelProto, data: dict[str, np.ndarray], stats: CalibrationStats, tmp_path: Path
) -> None:
    light = collect_statistics(model, tmp_path, [SCORES, MASKED], batches(data, BATCH), histograms=False)

    for name in (SCORES, MASKED):
        assert light.tensors[name].half_range == 0
        assert light.tensors[name].counts.sum() == 0
        assert (light.tensors[name].minimum, light.tensors[name].maximum) == (
            stats.tensors[name].minimum,
            stats.tensors[name].maximum,
        )
        assert light.tensors[name].nonfinite == stats.tensors[name].nonfinite


def test_slices_of_a_batch_share_its_histogram_sample(
    model: onnx.ModelProto, data: dict[str, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An output budget of 4 samples' tensors: every batch of 16 runs in several slices.
    monkeypatch.setattr(collector, "OUTPUT_BUDGET", 4 * 8)
    slices: list[tuple[int, int]] = []
    update = TensorHistogram.update

    def spy(histogram: TensorHistogram, values: np.ndarray, with_histogram: bool, sample: int) -> None:
        slices.append((values.shape[0], sample))
        update(histogram, values, with_histogram, sample)

    monkeypatch.setattr(TensorHistogram, "update", spy)
    collect_statistics(model, tmp_path, [X], batches(data, BATCH), histograms=True)

    batch_slices: list[list[tuple[int, int]]] = [[]]
    for rows, sample in slices:
        if sum(r for r, _ in batch_slices[-1]) == BATCH:
            batch_slices.append([])
        batch_slices[-1].append((rows, sample))
    assert len(batch_slices) == SAMPLES // BATCH
    for parts in batch_slices:
        assert len(parts) >= 4 and sum(rows for rows, _ in parts) == BATCH
        assert HISTOGRAM_SAMPLE - len(parts) <= sum(sample for _, sample in parts) <= HISTOGRAM_SAMPLE


def test_collect_leaves_no_file_behind(model: onnx.ModelProto, data: dict[str, np.ndarray], tmp_path: Path) -> None:
    collect(model, tmp_path, [Y], data)

    assert list(tmp_path.iterdir()) == []


def test_merged_halves_have_the_scalars_of_all_data(
    model: onnx.ModelProto, data: dict[str, np.ndarray], tensors: list[str], stats: CalibrationStats, tmp_path: Path
) -> None:
    merged = collect(model, tmp_path, tensors, half(data, first=True))
    merged.merge(collect(model, tmp_path, tensors, half(data, first=False)))

    assert (merged.batches, merged.samples) == (stats.batches, stats.samples)
    for name in tensors:
        mine, theirs = merged.tensors[name], stats.tensors[name]
        assert (mine.minimum, mine.maximum) == (theirs.minimum, theirs.maximum), name
        assert (mine.finite, mine.nonfinite, mine.huge) == (theirs.finite, theirs.nonfinite, theirs.huge), name
        assert mine.counts.sum() == theirs.counts.sum(), name


def test_merge_adds_tensors_it_has_not_seen(stats: CalibrationStats) -> None:
    merged = CalibrationStats()

    merged.merge(stats)
    merged.tensors[X].update(np.float32([1000.0]))

    assert list(merged.tensors) == list(stats.tensors)
    assert stats.tensors[X].finite == merged.tensors[X].finite - 1  # copied, not shared


def test_merged_halves_equal_all_data(
    model: onnx.ModelProto, data: dict[str, np.ndarray], tensors: list[str], stats: CalibrationStats, tmp_path: Path
) -> None:
    merged = collect(model, tmp_path, tensors, half(data, first=True))
    merged.merge(collect(model, tmp_path, tensors, half(data, first=False)))

    for name in tensors:
        assert merged.tensors[name].half_range == stats.tensors[name].half_range, name
        np.testing.assert_array_equal(merged.tensors[name].counts, stats.tensors[name].counts, err_msg=name)


# --- cache ---------------------------------------------------------------------------------------

MODEL_SHA = "a" * 64
DATA_DIGEST = "b" * 64


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.default_cache_dir() == tmp_path / "mine"

    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "onnxforge"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "onnxforge"


def test_store_then_load_round_trips_every_field(stats: CalibrationStats, tmp_path: Path) -> None:
    odd = CalibrationStats(
        tensors={
            **stats.tensors,
            "empty": TensorHistogram(),  # min +inf, max -inf
            "only irregular": TensorHistogram(nonfinite=7, huge=3),
            'quote"and/slash': TensorHistogram(half_range=2.0**-20, minimum=-1e-7, maximum=3e-7, finite=2),
        },
        batches=stats.batches,
        samples=stats.samples,
    )
    odd.tensors['quote"and/slash'].counts[[BINS // 2 - 1, BINS - 1]] = 1
    key = cache.cache_key(MODEL_SHA, DATA_DIGEST, list(odd.tensors))

    cache.store(tmp_path, key, odd)
    loaded = cache.load(tmp_path, key)

    assert loaded is not None
    assert (loaded.batches, loaded.samples) == (odd.batches, odd.samples)
    assert list(loaded.tensors) == list(odd.tensors)
    for name, original in odd.tensors.items():
        copy = loaded.tensors[name]
        for attribute in ("half_range", "minimum", "maximum", "finite", "nonfinite", "huge"):
            assert getattr(copy, attribute) == getattr(original, attribute), (name, attribute)
            assert type(getattr(copy, attribute)) is type(getattr(original, attribute)), (name, attribute)
        assert copy.counts.dtype == np.int64
        np.testing.assert_array_equal(copy.counts, original.counts, err_msg=name)


def test_load_of_a_missing_key_is_none(tmp_path: Path) -> None:
    assert cache.load(tmp_path, "0" * 64) is None
    assert cache.load(tmp_path / "absent", "0" * 64) is None


def test_store_overwrites_and_leaves_only_the_entry(stats: CalibrationStats, tmp_path: Path) -> None:
    cache.store(tmp_path, "k", CalibrationStats(batches=1))
    cache.store(tmp_path, "k", stats)

    assert [p.name for p in (tmp_path / "calibration").iterdir()] == ["k.npz"]
    loaded = cache.load(tmp_path, "k")
    assert loaded is not None and loaded.batches == stats.batches


def test_cache_key_depends_on_model_data_and_tensors() -> None:
    key = cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x", "y"])

    assert key == cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x", "y"])  # stable
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        cache.cache_key("c" * 64, DATA_DIGEST, ["x", "y"]),
        cache.cache_key(MODEL_SHA, "d" * 64, ["x", "y"]),
        cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x"]),
        cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x", "y", "z"]),
        cache.cache_key(MODEL_SHA, DATA_DIGEST, ["xy"]),
        cache.cache_key(MODEL_SHA, DATA_DIGEST, ["y", "x"]),
        cache.cache_key(MODEL_SHA, DATA_DIGEST, []),
        cache.cache_key(DATA_DIGEST, MODEL_SHA, ["x", "y"]),  # the parts are not interchangeable
    }
    assert key not in others
    assert len(others) == 8


def test_cache_key_depends_on_the_histogram_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    key = cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x"])
    monkeypatch.setattr(cache, "HISTOGRAM_SAMPLE", 2 * HISTOGRAM_SAMPLE)

    assert cache.cache_key(MODEL_SHA, DATA_DIGEST, ["x"]) != key


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _meta(**fields: object) -> np.ndarray:
    return np.array(json.dumps({"tensors": ["t"], "batches": 1, "samples": 1, **fields}))


def _valid(tmp_path: Path) -> bytes:
    histogram = TensorHistogram()
    histogram.update(np.linspace(-1, 1, 1000, dtype=np.float32))
    cache.store(tmp_path, "valid", CalibrationStats({"t": histogram}, batches=2, samples=8))
    return (tmp_path / "calibration" / "valid.npz").read_bytes()


CORRUPTIONS: list[object] = [
    pytest.param(lambda _: b"not an npz at all" * 10, id="garbage"),
    pytest.param(lambda _: _npz(meta=np.array("{not json")), id="bad-json"),
    pytest.param(lambda _: _npz(meta=_meta(tensors=["t"]), c0=np.zeros(BINS)), id="missing-array"),
    pytest.param(lambda _: _npz(other=np.zeros(3)), id="missing-meta"),
    pytest.param(lambda _: b"", id="empty-file"),
    pytest.param(
        lambda path: _valid(path)[:300],
        id="truncated",
    ),
    pytest.param(
        lambda _: _npz(meta=np.array(json.dumps(["t"]))),
        id="meta-not-an-object",
    ),
    pytest.param(
        lambda _: _npz(meta=_meta(), c0=np.zeros(BINS), s0=np.zeros(2)),
        id="short-scalars",
    ),
    pytest.param(
        lambda _: _npz(meta=_meta(), c0=np.zeros(3), s0=np.zeros(6)),
        id="wrong-bin-count",
    ),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_entry_is_ignored(corrupt: Callable[[Path], bytes], tmp_path: Path) -> None:
    payload = corrupt(tmp_path)
    entry = tmp_path / "calibration" / "k.npz"
    entry.parent.mkdir(exist_ok=True)
    entry.write_bytes(payload)

    assert cache.load(tmp_path, "k") is None
