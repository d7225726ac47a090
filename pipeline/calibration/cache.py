"""A calibration cache: statistics keyed by the model's and the data's content, reused across runs."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from pipeline.artifacts import write_atomic
from pipeline.calibration.collector import CalibrationStats
from pipeline.calibration.histogram import BINS, HISTOGRAM_SAMPLE, SAMPLE_BLOCK, TensorHistogram

logger = logging.getLogger(__name__)

CACHE_ENV = "ONNXFORGE_CACHE_DIR"
_FORMAT = 1


def default_cache_dir() -> Path:
    """$ONNXFORGE_CACHE_DIR, else $XDG_CACHE_HOME/onnxforge, else ~/.cache/onnxforge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onnxforge"


def cache_key(model_sha256: str, data_digest: str, tensors: list[str]) -> str:
    """Content key: the model file, the calibration data, the tensor set, the statistics format
    and how values are sampled into the bins (statistics gathered another way are not reused)."""
    digest = hashlib.sha256()
    statistics = f"format={_FORMAT};bins={BINS};sample={HISTOGRAM_SAMPLE} in blocks of {SAMPLE_BLOCK}"
    for part in (statistics, model_sha256, data_digest, *tensors):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def load(folder: Path, key: str) -> CalibrationStats | None:
    """The cached statistics for `key`, or None (missing or unreadable entries are ignored)."""
    path = folder / "calibration" / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            stats = CalibrationStats(batches=meta["batches"], samples=meta["samples"])
            for index, name in enumerate(meta["tensors"]):
                scalars = archive[f"s{index}"]
                stats.tensors[name] = TensorHistogram(
                    half_range=float(scalars[0]),
                    counts=archive[f"c{index}"].astype(np.int64),
                    minimum=float(scalars[1]),
                    maximum=float(scalars[2]),
                    finite=int(scalars[3]),
                    nonfinite=int(scalars[4]),
                    huge=int(scalars[5]),
                )
        if any(h.counts.shape != (BINS,) for h in stats.tensors.values()):
            raise ValueError(f"histograms are not {BINS} bins")
    except Exception as e:  # noqa: BLE001 - any unreadable entry is a cache miss, never a failure
        logger.warning("ignoring unreadable calibration cache entry %s: %s", path, e)
        return None
    logger.info("calibration cache hit: %s", path.name)
    return stats


def store(folder: Path, key: str, stats: CalibrationStats) -> None:
    """Write the statistics atomically under `key`."""
    names = list(stats.tensors)
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps({"tensors": names, "batches": stats.batches, "samples": stats.samples}))
    }
    for index, name in enumerate(names):
        h = stats.tensors[name]
        arrays[f"c{index}"] = h.counts
        arrays[f"s{index}"] = np.array([h.half_range, h.minimum, h.maximum, h.finite, h.nonfinite, h.huge], np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    write_atomic(folder / "calibration" / f"{key}.npz", buffer.getvalue())
