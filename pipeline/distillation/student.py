"""The student model: built from the job's factory (seeded), checked against the teacher, measured."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import safetensors.torch
import torch

from pipeline.errors import JobError
from pipeline.feeds import Batch
from pipeline.job import ConversionJob
from pipeline.model_source import build_module, check_forward_arity
from pipeline.outputs import flatten_outputs, torch_inputs

KEY = "distill.student"


def build_student(job: ConversionJob) -> torch.nn.Module:
    """A freshly initialised student, its initial weights drawn from the job's distillation seed.

    Raises:
        JobError: The factory is missing, fails, returns no module, or its forward does not take
            the job's inputs.
    """
    options = job.distill
    assert options is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        student = build_module(job, options.student, options.student_kwargs, KEY)
    check_forward_arity(student, job, KEY)
    return student


def check_student(
    job: ConversionJob, teacher: torch.nn.Module, student: torch.nn.Module, batch: Batch
) -> list[tuple[int, ...]]:
    """The student must return as many outputs as the teacher, of the same shapes, on a real batch.

    Returns:
        The output shapes (the teacher's, and so the student's).

    Raises:
        JobError: The student fails on the batch, or its outputs differ from the teacher's in number
            or shape.
    """
    inputs = torch_inputs(batch.feeds)
    with torch.no_grad():
        expected = [tuple(t.shape) for t in flatten_outputs(teacher.eval()(*inputs))]
        try:
            produced = [tuple(t.shape) for t in flatten_outputs(student.eval()(*inputs))]
        except Exception as e:  # the student is user code
            raise JobError(job.origin, KEY, f"the student failed on a training batch: {type(e).__name__}: {e}") from e
    if produced != expected:
        raise JobError(
            job.origin,
            KEY,
            f"the student returns outputs of shapes {produced} but the teacher {expected}; a student must "
            "return the teacher's outputs (same number and shapes) to learn from them",
        )
    return expected


def load_student(job: ConversionJob, weights: Path) -> torch.nn.Module:
    """The distilled student: the factory's model with the weights the distill stage wrote, in eval mode."""
    student = build_student(job)
    student.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    return student.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Parameter elements of a model."""
    return sum(parameter.numel() for parameter in model.parameters())


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict (parameters and buffers)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def latency_ms(model: torch.nn.Module, batch: Batch, repeats: int = 20) -> float:
    """Median wall time of one forward pass on `batch`, in milliseconds (after two warm-up passes)."""
    inputs = torch_inputs(batch.feeds)
    times = []
    with torch.inference_mode():
        for index in range(repeats + 2):
            start = time.perf_counter()
            model(*inputs)
            if index >= 2:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
