"""Execution targets for converted models: the Backend protocol, built-ins and the plugin registry."""

from backends.base import Availability, Backend, Capabilities, QuantizationConstraints, Session
from backends.registry import ENTRY_POINT_GROUP, BackendEntry, get_backend, list_backends

__all__ = [
    "ENTRY_POINT_GROUP",
    "Availability",
    "Backend",
    "BackendEntry",
    "Capabilities",
    "QuantizationConstraints",
    "Session",
    "get_backend",
    "list_backends",
]
