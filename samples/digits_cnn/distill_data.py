"""Write the digits sample's distillation data: the teacher's training split, cut into train and validation.

Run from the repository root (needs the ``samples`` extra, for scikit-learn)::

    python -m samples.digits_cnn.distill_data

The teacher (``train.py``) trained on a stratified 80 % of scikit-learn's digits and holds out the
other 20 % (``data/heldout.npz``). The student learns from the same 80 %, of which a stratified
10 % (``random_state=1``) is kept aside for its per-epoch accuracy, best-epoch choice and early
stop, so the held-out 20 % stays unseen by every choice made in training. Written atomically:

* ``data/train.npz``: ``image`` float32 ``[1293, 1, 8, 8]`` and ``label`` int64 ``[1293]``;
* ``data/validation.npz``: ``image`` float32 ``[144, 1, 8, 8]`` and ``label`` int64 ``[144]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from samples.digits_cnn.train import SAMPLE_DIR, _save_npz, load_dataset

logger = logging.getLogger(__name__)

VALIDATION_SHARE = 0.1


def write_distillation_data(out_dir: Path = SAMPLE_DIR) -> None:
    """Write ``data/train.npz`` and ``data/validation.npz`` under `out_dir`."""
    images, labels = load_dataset()
    train_x, _, train_y, _ = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=VALIDATION_SHARE, stratify=train_y, random_state=1
    )
    for name, x, y in (("train", fit_x, fit_y), ("validation", val_x, val_y)):
        _save_npz(
            out_dir / "data" / f"{name}.npz",
            image=np.ascontiguousarray(x, dtype=np.float32),
            label=np.ascontiguousarray(y, dtype=np.int64),
        )
        logger.info("wrote data/%s.npz: %d images", name, len(y))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_distillation_data()
