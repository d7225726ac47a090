"""Load the job's trained PyTorch model from its factory and check it fits the job's inputs."""

from __future__ import annotations

import inspect
import logging

import torch

from pipeline.errors import JobError
from pipeline.imports import resolve_import
from pipeline.job import ConversionJob

logger = logging.getLogger(__name__)


def load_model(job: ConversionJob) -> torch.nn.Module:
    """Call the job's model factory and return the model in eval mode.

    Args:
        job: The conversion job.

    Returns:
        The model, in eval mode.

    Raises:
        JobError: The factory does not import, fails, returns something other than an
            ``nn.Module``, or its ``forward`` cannot take the job's inputs.
    """
    key = "model.factory"
    factory = resolve_import(job.model.factory, job.python_path, origin=job.origin, key=key)
    if not callable(factory):
        raise JobError(
            job.origin, key, f"{job.model.factory!r} is not callable; expected a function returning an nn.Module"
        )
    try:
        model = factory(**job.model.kwargs)
    except Exception as e:  # noqa: BLE001 - the factory is user code; report whatever it raised
        raise JobError(job.origin, key, f"the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise JobError(
            job.origin, key, f"the factory returned {type(model).__name__}; expected a torch.nn.Module"
        )
    _check_forward_arity(model, job)
    logger.info("loaded model %s from %s", type(model).__name__, job.model.factory)
    return model.eval()


def _check_forward_arity(model: torch.nn.Module, job: ConversionJob) -> None:
    """The job's inputs are passed positionally: forward must accept exactly that many."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return  # no introspectable signature (e.g. a compiled module): export will tell
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    count = len(job.inputs)
    if not len(required) <= count <= len(positional):
        names = [p.name for p in positional]
        raise JobError(
            job.origin,
            "inputs",
            f"the job lists {count} input(s) {[spec.name for spec in job.inputs]} but "
            f"{type(model).__name__}.forward takes {names}; list one [[inputs]] entry per forward argument, in order",
        )
