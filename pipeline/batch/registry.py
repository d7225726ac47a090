"""Find executors by name: built-ins as lazy "module:Class" strings (Ray is imported only when asked for)."""

from __future__ import annotations

import importlib

from pipeline.batch.base import BatchSettings, Executor
from pipeline.errors import BackendError

# Name -> the IsolatingExecutor subclass that runs it; a new executor is one line here.
EXECUTORS: dict[str, str] = {
    "local": "pipeline.batch.local:LocalExecutor",
    "ray": "pipeline.batch.ray_executor:RayExecutor",
}


def make_executor(settings: BatchSettings) -> Executor:
    """The executor named by `settings.executor`, with these settings.

    Raises:
        BackendError: An unknown name, or the executor cannot be used here (Ray not installed).
    """
    name = settings.executor
    target = EXECUTORS.get(name)
    if target is None:
        known = ", ".join(EXECUTORS)
        hint = " or ".join(f"--executor {known_name}" for known_name in EXECUTORS)
        raise BackendError(name, f"unknown executor; available: {known}", f"use {hint}")
    module_name, _, class_name = target.partition(":")
    executor: Executor = getattr(importlib.import_module(module_name), class_name)(settings)
    return executor
