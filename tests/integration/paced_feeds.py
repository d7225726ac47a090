"""The digits calibration batches as a data factory that can be slowed down on request.

`test_batch_resume.py` kills a batch while its first job is quantizing. Digits calibration takes a
tenth of a second, so a kill sent when the quantize stage starts could land after it finished;
with ``$ONNXFORGE_TEST_CALIBRATION_PACE_S`` set, every batch waits that long first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

PACE_ENV = "ONNXFORGE_TEST_CALIBRATION_PACE_S"
_CALIBRATION = Path(__file__).resolve().parents[2] / "samples" / "digits_cnn" / "data" / "calibration.npz"


def calibration_feeds() -> Iterator[dict[str, np.ndarray]]:
    """The sample's calibration images in batches of 32, each after the configured pause."""
    pace = float(os.environ.get(PACE_ENV, "0"))
    with np.load(_CALIBRATION) as data:
        images = data["image"]
    for start in range(0, len(images), 32):
        time.sleep(pace)
        yield {"image": images[start : start + 32]}
