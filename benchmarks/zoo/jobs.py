"""Writes one onnxforge job folder per zoo model: ``job.toml``, ``calibration.npz``, ``evaluation.npz``.

Usage: ``python -m benchmarks.zoo.jobs [--models NAME ...] [--targets cpu fpga] [--root DIR]``

Each job names :func:`benchmarks.zoo.models.build` as its factory (``kwargs = { name = ... }``),
puts the repository root on ``python_path``, names the cached trained weights for trained models
(training them first when missing), and lists the chosen targets. Paths in the job are absolute
where they leave the job folder (repository root, weights) and relative inside it (data, output).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from benchmarks.zoo.models import ZOO, ZooModel, weights

REPO_ROOT: Path = Path(__file__).resolve().parents[2]
DEFAULT_ROOT: Path = Path(__file__).resolve().parent / ".cache" / "jobs"
DEFAULT_TARGETS: tuple[str, ...] = ("cpu",)


def _data(entry: ZooModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The calibration arrays (the first samples of the training split: inputs only) and the
    evaluation arrays (the held-out split: inputs, and ``label`` for classifiers with labels)."""
    split = entry.split()
    names = entry.input_names
    calibration = {name: split.train[name][: entry.calibration_samples] for name in names}
    keys = [*names, "label"] if entry.labels else names
    evaluation = {key: split.test[key][: entry.evaluation_samples] for key in keys}
    return calibration, evaluation


def target_entry(target: str, precisions: Sequence[str] | None) -> dict[str, Any]:
    """One ``[[targets]]`` entry from ``backend`` or ``backend:profile`` (an fpga profile)."""
    backend, _, profile = target.partition(":")
    entry: dict[str, Any] = {"backend": backend}
    if profile:
        entry["options"] = {"profile": profile}
    if precisions:
        entry["precisions"] = list(precisions)
    return entry


def job_table(
    entry: ZooModel, targets: Sequence[str], weights_path: Path | None, precisions: Sequence[str] | None = None
) -> dict[str, Any]:
    """The job file's tables, as a dict ready for TOML.

    Args:
        entry: The zoo model.
        targets: Backend names, each one ``[[targets]]`` entry; ``fpga:npu-int8`` names an fpga
            target with that profile.
        weights_path: The trained state dict, or ``None`` for random weights.
        precisions: Every target's ``precisions`` (None: the default, int8 only).
    """
    model: dict[str, Any] = {
        "factory": "benchmarks.zoo.models:build",
        "kwargs": {"name": entry.name},
        "output_names": list(entry.output_names),
        "task": entry.task,
    }
    if weights_path is not None:
        model["weights"] = str(weights_path)
    evaluation: dict[str, Any] = {"npz": "evaluation.npz", "batch_size": 64}
    if entry.labels:
        evaluation["labels"] = "label"
    job: dict[str, Any] = {
        "name": f"zoo_{entry.name}",
        "python_path": [str(REPO_ROOT)],
        "output_dir": "out",
        "model": model,
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in entry.inputs],
        "calibration": {"npz": "calibration.npz", "batch_size": 32},
        "evaluation": evaluation,
        "targets": [target_entry(target, precisions) for target in targets],
        "parity": {"int8": dict(entry.int8)},
    }
    if entry.check_shapes:
        job["export"] = {"check_shapes": [dict(shape) for shape in entry.check_shapes]}
    if entry.outputs:
        job["parity"]["outputs"] = entry.outputs
    return job


def write_job(
    entry: ZooModel, folder: Path, targets: Sequence[str] = DEFAULT_TARGETS, precisions: Sequence[str] | None = None
) -> Path:
    """Writes ``entry``'s job folder (data files and ``job.toml``) and returns the job file.

    Args:
        entry: The zoo model.
        folder: The job folder (created).
        targets: Backend names.
        precisions: Every target's ``precisions`` (None: the default).
    """
    folder.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = _data(entry)
    np.savez(folder / "calibration.npz", **calibration)
    np.savez(folder / "evaluation.npz", **evaluation)
    found = weights(entry.name)
    job = job_table(entry, targets, None if found is None else found[0], precisions)
    path = folder / "job.toml"
    header = f"# onnxforge job for the zoo model {entry.name!r}: {entry.family}. Written by benchmarks/zoo/jobs.py.\n"
    path.write_text(header + tomli_w.dumps(job))
    return path


def write_jobs(names: Sequence[str], root: Path, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Path]:
    """Writes the job folders ``root/<name>/`` of the named zoo models; returns their job files by name."""
    return {name: write_job(ZOO[name], root / name, targets) for name in names}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: writes the job folders and prints their paths."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo.jobs", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO))
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args(argv)
    for path in write_jobs(args.models, args.root, args.targets).values():
        print(path)


if __name__ == "__main__":
    main()
