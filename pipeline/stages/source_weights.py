"""A large PyTorch model held only while a stage needs it.

A 1 B-parameter decoder's weights are 4.4 GB in float32; kept through the whole run they sit
beside every ONNX model the later stages load, doubling each stage's memory. So once the export
has what it needs from PyTorch, a model above `RELEASE_ABOVE_BYTES` that came from a factory is
dropped (its state dict hashed first, for the manifest), and validation builds it again from the
job with the same code (`load_model`), checking that the weights hash the same.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from pipeline.errors import JobError
from pipeline.model_source import input_hashes, load_model, state_dict_sha256
from pipeline.processes import release_freed_memory
from pipeline.stages.base import StageContext

logger = logging.getLogger(__name__)

#: PyTorch models with more parameter and buffer bytes than this are released between uses.
RELEASE_ABOVE_BYTES = 2**30
_STATE_DICT_HASH = "model_state_dict"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (tied weights)."""
    storages: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def job_input_hashes(ctx: StageContext) -> dict[str, str]:
    """Hashes of everything the conversion read (`input_hashes`), computed once per run."""
    if ctx.input_hashes is None:
        ctx.input_hashes = input_hashes(ctx.job, ctx.source)
    return ctx.input_hashes


def release_source_module(ctx: StageContext) -> bool:
    """Drop the job's PyTorch model if it is large and can be rebuilt from its factory.

    Returns:
        Whether it was released (`source_module` rebuilds it when next needed).
    """
    module = ctx.source.module
    if module is None or ctx.job.model.factory is None or ctx.job.distill is not None:
        return False
    size = module_bytes(module)
    if size <= RELEASE_ABOVE_BYTES:
        return False
    job_input_hashes(ctx)  # the weights' hash, while they are here
    ctx.source = replace(ctx.source, module=None)
    ctx.source_released = True
    del module
    release_freed_memory()
    logger.info("job %s: PyTorch model (%.2f GB) released until validation needs it", ctx.job.name, size / 1e9)
    return True


def source_module(ctx: StageContext) -> torch.nn.Module | None:
    """The job's PyTorch model, built again from the job if `release_source_module` dropped it.

    Raises:
        JobError: The rebuilt model's weights differ from those the export used (a factory that
            does not give the same weights on every call).
    """
    if ctx.source.module is not None or not ctx.source_released:
        return ctx.source.module
    logger.info("job %s: building the PyTorch model again for validation", ctx.job.name)
    rebuilt = load_model(ctx.job, check_inputs=False)  # preflight checked the forward against the data's inputs
    module = rebuilt.module
    assert module is not None, "a released model came from a factory"
    expected = job_input_hashes(ctx).get(_STATE_DICT_HASH)
    if expected is not None and state_dict_sha256(module) != expected:
        raise JobError(
            ctx.job.origin,
            "model.factory",
            f"built again for validation (models above {RELEASE_ABOVE_BYTES / 2**30:g} GiB are released after "
            "export), it returned different weights: make the factory deterministic, e.g. load the weights "
            "from a file (model.weights) or seed its initialisation",
        )
    ctx.source = rebuilt
    ctx.source_released = False
    return module
