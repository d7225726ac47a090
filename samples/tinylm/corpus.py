"""The tinylm sample's text: the Python standard library's own top-level source files.

Every machine with Python has them offline. The corpus is the sorted list of ``*.py`` files
directly in ``sysconfig.get_paths()["stdlib"]`` (no packages, no tests), split by name into
three fixed, disjoint sets:

* evaluation files (:data:`EVALUATION_FILES`): held-out perplexity, prompts and the evaluation
  feeds; never trained on;
* calibration files (:data:`CALIBRATION_FILES`): the calibration feeds; never trained on either,
  and different from the evaluation files;
* training files: every other top-level file.

The held-out modules were picked among those present in every CPython from 3.11 on, so the
evaluation data exists on any supported Python; its exact content (and so every figure in the
README) is that of the Python the weights were trained with (see ``weights/config.json``).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

#: Held out for evaluation: perplexity, prompts, evaluation feeds.
EVALUATION_FILES: tuple[str, ...] = (
    "argparse.py",
    "calendar.py",
    "fractions.py",
    "heapq.py",
    "shlex.py",
    "textwrap.py",
)

#: Held out for calibration (weight-only / activation quantization): never trained on.
CALIBRATION_FILES: tuple[str, ...] = (
    "csv.py",
    "difflib.py",
    "queue.py",
    "statistics.py",
)

#: Written between two files in the token stream (the tokenizer's only special token).
END_OF_TEXT = "<|endoftext|>"


def stdlib_dir() -> Path:
    """Return the folder of the running Python's standard library source.

    Returns:
        ``sysconfig.get_paths()["stdlib"]`` as a path.
    """
    return Path(sysconfig.get_paths()["stdlib"])


def training_files() -> list[Path]:
    """Return the training files: every top-level stdlib ``*.py`` file not held out, sorted by name.

    Returns:
        Paths in sorted order (the order they are concatenated in for training).
    """
    held_out = set(EVALUATION_FILES) | set(CALIBRATION_FILES)
    return [path for path in sorted(stdlib_dir().glob("*.py")) if path.name not in held_out]


def held_out_files(names: Sequence[str]) -> list[Path]:
    """Return the paths of held-out files, in the given order.

    Args:
        names: File names in the stdlib folder, e.g. :data:`EVALUATION_FILES`.

    Returns:
        Their paths.

    Raises:
        FileNotFoundError: One of them is missing from this Python's standard library.
    """
    paths = [stdlib_dir() / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out files missing from {stdlib_dir()}: {missing}")
    return paths


def read_text(path: Path) -> str:
    """Read one source file as text, decoding it the same way everywhere.

    Args:
        path: A stdlib source file.

    Returns:
        Its content as UTF-8 (undecodable bytes replaced), with ``\\n`` line ends.
    """
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
