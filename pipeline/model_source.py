"""Load the job's model from its source (factory, weights, .pt2 or ONNX file), never unsafely."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from pipeline.artifacts import sha256_file
from pipeline.errors import JobError, first_line
from pipeline.imports import resolve_import
from pipeline.intake import IntakeResult, check_onnx_source
from pipeline.job import ConversionJob

logger = logging.getLogger(__name__)

# Entries of a .pt2 archive that torch.export.load unpickles with plain pickle (code can run).
_UNSAFE_PT2_PREFIXES = ("custom_obj_", "opaque_obj_")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_TO_SAFETENSORS = (
    "if you trust the file, convert it once to safetensors in a trusted environment: "
    'python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN.pt', weights_only=False), 'OUT.safetensors')\" "
    "and set model.weights to the .safetensors file"
)


@dataclass(frozen=True)
class SourceModel:
    """The job's model as loaded.

    Attributes:
        module: What runs as the PyTorch reference (None when the source is an ONNX file).
        program: A loaded ExportedProgram, exported as it is (None otherwise).
        onnx_file: An existing ONNX file the chain starts from (None otherwise).
        onnx_intake: What intake found in `onnx_file` (its external data files, hashed).
    """

    module: torch.nn.Module | None
    program: torch.export.ExportedProgram | None = None
    onnx_file: Path | None = None
    onnx_intake: IntakeResult | None = None


def load_model(job: ConversionJob, check_inputs: bool = True) -> SourceModel:
    """Load the job's model source.

    Args:
        job: The conversion job.
        check_inputs: Check that a module's forward takes the job's inputs (off when building a
            model again after preflight checked it: a causal LM's job then lists its decoder's
            inputs, cache included, not the forward's).

    Returns:
        The loaded model, in eval mode where it is a module.

    Raises:
        JobError: The source cannot be loaded, would need unsafe unpickling, or does not fit
            the job's inputs.
    """
    source = job.model
    if source.onnx is not None:
        return SourceModel(module=None, onnx_file=source.onnx, onnx_intake=_check_onnx_file(job, source.onnx))
    if source.exported_program is not None:
        program = _load_exported_program(job, source.exported_program)
        return SourceModel(module=program.module(), program=program)
    module = _build_from_factory(job)
    if source.weights is not None:
        _apply_weights(job, module, source.weights)
    if check_inputs:
        check_forward_arity(module, job)
    return SourceModel(module=module.eval())


def _check_onnx_file(job: ConversionJob, path: Path) -> IntakeResult:
    """Model intake on the job's ONNX file (`pipeline.intake`): a bad model is bad input, caught up front.

    Raises:
        JobError: The file does not parse, is damaged, its external data leaves its folder, the
            checker refuses it, its inputs do not match the job's, or its constants are too big.
    """
    return check_onnx_source(job, path)


def _build_from_factory(job: ConversionJob) -> torch.nn.Module:
    assert job.model.factory is not None
    return build_module(job, job.model.factory, job.model.kwargs, "model.factory")


def build_module(
    job: ConversionJob, spec: str, kwargs: Mapping[str, str | int | float | bool], key: str
) -> torch.nn.Module:
    """Call a job's "package.module:function" model factory.

    Args:
        job: The job (its python_path is searched first; its file is named in errors).
        spec: The factory's import spec.
        kwargs: Keyword arguments for the factory.
        key: The job key holding the spec, for error messages.

    Returns:
        The module the factory built.

    Raises:
        JobError: The factory cannot be imported, raises, or returns something else than a module.
    """
    factory = resolve_import(spec, job.python_path, origin=job.origin, key=key)
    if not callable(factory):
        raise JobError(job.origin, key, f"{spec!r} is not callable; expected a function returning an nn.Module")
    try:
        model = factory(**kwargs)
    except Exception as e:  # the factory is user code; report whatever it raised
        raise JobError(job.origin, key, f"the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise JobError(job.origin, key, f"the factory returned {type(model).__name__}; expected a torch.nn.Module")
    logger.info("built %s from %s", type(model).__name__, spec)
    return model


def _apply_weights(job: ConversionJob, model: torch.nn.Module, path: Path) -> None:
    key = "model.weights"
    state_dict = _read_state_dict(job, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise JobError(
            job.origin, key, f"{path.name} does not fit {type(model).__name__}: {str(e).strip().splitlines()[0]}"
        ) from e
    logger.info("loaded %d tensors from %s", len(state_dict), path.name)


def _read_state_dict(job: ConversionJob, path: Path) -> Mapping[str, torch.Tensor]:
    key = "model.weights"
    if path.suffix in _SAFETENSORS_SUFFIXES:
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise JobError(job.origin, key, f"cannot read {path.name} as safetensors: {e}") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise JobError(
            job.origin,
            key,
            f"{path.name} needs code to unpickle ({first_line(e)}); onnxforge loads checkpoints only with "
            f"torch.load(weights_only=True) and never falls back to unsafe loading; {_TO_SAFETENSORS}",
        ) from e
    except Exception as e:  # torch.load raises many types for corrupt files
        raise JobError(job.origin, key, f"cannot read {path.name} as a PyTorch checkpoint: {e}") from e
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise JobError(
            job.origin,
            key,
            f"{path.name} holds a {type(loaded).__name__}, not a state dict; expected {{name: tensor}} "
            "(or {'state_dict': {name: tensor}})",
        )
    return state_dict


def _load_exported_program(job: ConversionJob, path: Path) -> torch.export.ExportedProgram:
    key = "model.exported_program"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise JobError(job.origin, key, f"{path.name} is not a torch.export .pt2 archive: {e}") from e
    unsafe = [name for name in names if Path(name).name.startswith(_UNSAFE_PT2_PREFIXES)]
    if unsafe:
        raise JobError(
            job.origin,
            key,
            f"{path.name} holds pickled Python objects ({', '.join(unsafe[:3])}) that torch.export.load would "
            "unpickle with plain pickle; onnxforge refuses them. Re-export the model without custom objects",
        )
    try:
        with _weights_only_torch_load():
            program = torch.export.load(path)
    except pickle.UnpicklingError as e:
        raise JobError(
            job.origin,
            key,
            f"{path.name} needs code to unpickle ({first_line(e)}); onnxforge never loads it unsafely",
        ) from e
    except Exception as e:  # torch.export.load raises many types for bad archives
        raise JobError(job.origin, key, f"cannot load {path.name}: {type(e).__name__}: {first_line(e)}") from e
    logger.info("loaded ExportedProgram from %s", path.name)
    return program


@contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force every torch.load inside the block to weights_only=True (torch.export.load would
    otherwise retry a refused payload with weights_only=False)."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def check_forward_arity(model: torch.nn.Module, job: ConversionJob, key: str = "inputs") -> None:
    """The job's inputs are passed positionally: forward must accept exactly that many.

    Raises:
        JobError: (at `key`) forward takes fewer or more positional arguments.
    """
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
            key,
            f"the job lists {count} input(s) {[spec.name for spec in job.inputs]} but "
            f"{type(model).__name__}.forward takes {names}; list one [[inputs]] entry per forward argument, in order",
        )


def model_hashes(job: ConversionJob, source: SourceModel) -> dict[str, str]:
    """Hashes of the job's model: its files, and the weights it ran (``model_<role>``)."""
    hashes = {}
    for role in ("weights", "exported_program", "onnx"):
        path = getattr(job.model, role)
        if path is not None:
            hashes[f"model_{role}"] = sha256_file(path)
    if source.onnx_intake is not None:
        # The weights of an ONNX source with external data live in its data files.
        for data_file in source.onnx_intake.external_data:
            hashes[f"model_onnx_data:{data_file.location}"] = data_file.sha256
    if source.module is not None:
        hashes["model_state_dict"] = state_dict_sha256(source.module)
    return hashes


def input_hashes(job: ConversionJob, source: SourceModel) -> dict[str, str]:
    """Hashes of everything the conversion read: model files, the weights it ran, data files."""
    hashes = model_hashes(job, source)
    sections = {"calibration": job.calibration, "evaluation": job.evaluation}
    if job.distill is not None:
        sections |= {"distill_data": job.distill.data, "distill_validation": job.distill.validation}
    for section, data in sections.items():
        if data is not None and data.npz is not None:
            hashes[f"{section}_npz"] = sha256_file(data.npz)
    return hashes


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of the model's parameters and buffers, in name order (the weights the job converted)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
