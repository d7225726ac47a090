"""Find backends by name: built-ins as lazy "module:Class" strings, then the entry-point group."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from backends.base import Availability, Backend
from backends.errors import BackendError, UnknownBackendError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxforge.backends"

# Imported only when asked for, so listing backends never pays for (or fails on) all of them.
BUILTIN_BACKENDS: dict[str, str] = {
    "cpu": "backends.cpu:CpuBackend",
    "cuda": "backends.cuda:CudaBackend",
    "fpga": "backends.fpga:FpgaBackend",
}


@dataclass(frozen=True)
class BackendEntry:
    """A registry row: where a backend comes from and whether it runs here.

    Attributes:
        name: Registry name.
        origin: "builtin" or the distribution that registered it.
        target: The "module:Class" it loads from.
        backend: The loaded backend, or None when it failed to import.
        availability: Whether it can run here, with reason and hint.
    """

    name: str
    origin: str
    target: str
    backend: Backend | None
    availability: Availability


def _targets() -> dict[str, tuple[str, str]]:
    """Name to (target, origin); built-ins win over plugins of the same name."""
    found: dict[str, tuple[str, str]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        distribution = point.dist.name if point.dist else "unknown distribution"
        found[point.name] = (point.value, distribution)
    for name, target in BUILTIN_BACKENDS.items():
        if name in found:
            logger.warning("plugin backend %r from %s is shadowed by the built-in", name, found[name][1])
        found[name] = (target, "builtin")
    return found


def _load(name: str, target: str) -> Backend:
    module_name, _, class_name = target.partition(":")
    try:
        backend = getattr(importlib.import_module(module_name), class_name)()
    except Exception as e:  # a plugin may fail to import or construct in any way
        raise BackendError(
            name,
            f"cannot load {target} ({type(e).__name__}: {e})",
            "install the package that provides this backend, or fix its entry point",
        ) from e
    if not isinstance(backend, Backend):
        raise BackendError(name, f"{target} does not implement the Backend protocol")
    return backend


def get_backend(name: str) -> Backend:
    """Return the backend registered under `name`.

    Raises:
        UnknownBackendError: No backend is registered under `name`.
        BackendError: It cannot be imported or constructed.
    """
    targets = _targets()
    if name not in targets:
        raise UnknownBackendError(name, f"unknown backend; registered: {', '.join(sorted(targets))}")
    return _load(name, targets[name][0])


def list_backends() -> list[BackendEntry]:
    """Every registered backend with its availability; never raises for a broken plugin."""
    entries = []
    for name, (target, origin) in sorted(_targets().items()):
        backend: Backend | None = None
        try:
            backend = _load(name, target)
            availability = backend.availability()
        except BackendError as e:
            availability = Availability(ok=False, reason=e.reason, hint=e.hint)
        except Exception as e:  # noqa: BLE001 - a plugin's availability() must not break the listing
            availability = Availability(ok=False, reason=f"availability() raised {type(e).__name__}: {e}")
        entries.append(BackendEntry(name, origin, target, backend, availability))
    return entries
