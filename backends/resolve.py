"""Resolve a target: find a backend by name, check that it runs here, validate its options.

The one place that turns a backend name and an options mapping (a job's ``targets`` entry, the
CLI's ``--option key=value`` pairs, or nothing) into a backend and an instance of its
`options_model`, with typed errors the callers translate into their own terms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from backends.base import Backend
from backends.errors import BackendOptionError, BackendUnavailableError
from backends.registry import get_backend


@dataclass(frozen=True)
class ResolvedTarget:
    """A backend that runs on this machine, and options validated by its `options_model`.

    Attributes:
        backend: The backend, from the registry.
        options: An instance of ``backend.options_model``.
    """

    backend: Backend
    options: BaseModel

    @property
    def name(self) -> str:
        """The backend's registry name."""
        return self.backend.name


def resolve_target(name: str, options: Mapping[str, object] | None = None) -> ResolvedTarget:
    """Get the backend registered as `name`, check it is available and validate `options` for it.

    Args:
        name: The backend's registry name (``cpu``, ``cuda``, ``fpga``, a plugin's).
        options: Option values by name (None or empty: the backend's defaults).

    Returns:
        The backend with its validated options.

    Raises:
        UnknownBackendError: No backend is registered as `name`.
        BackendUnavailableError: It cannot run here (the reason and install hint are in the error).
        BackendOptionError: An option is unknown or has a bad value (the option name is in the error).
        BackendError: The backend cannot be imported or constructed.
    """
    backend = available_backend(name)
    return ResolvedTarget(backend, validate_options(backend, options or {}))


def resolve_target_from_pairs(name: str, pairs: Iterable[str]) -> ResolvedTarget:
    """`resolve_target` with options given as ``key=value`` strings (see `parse_options`).

    Raises:
        UnknownBackendError, BackendUnavailableError, BackendOptionError, BackendError: As
            `resolve_target`; BackendOptionError also for a pair that is not ``key=value``.
    """
    backend = available_backend(name)
    return ResolvedTarget(backend, validate_options(backend, parse_options(pairs, backend)))


def available_backend(name: str) -> Backend:
    """The backend registered as `name`, when it can run here.

    Raises:
        UnknownBackendError: No backend is registered as `name`.
        BackendUnavailableError: Its `availability()` is not ok.
        BackendError: It cannot be imported or constructed.
    """
    backend = get_backend(name)
    availability = backend.availability()
    if not availability.ok:
        raise BackendUnavailableError(name, availability.reason, availability.hint)
    return backend


def validate_options(backend: Backend, options: Mapping[str, object]) -> BaseModel:
    """`options` as an instance of the backend's `options_model`.

    Raises:
        BackendOptionError: The first option pydantic rejects, with what was expected.
    """
    try:
        return backend.options_model.model_validate(dict(options))
    except ValidationError as e:
        option, problem = describe_option_error(e.errors(include_url=False)[0])
        raise BackendOptionError(backend.name, option, problem, options_help(backend)) from e


def options_help(backend: Backend) -> str:
    """The options a backend accepts, for error messages: ``options: a, b, c``."""
    return "options: " + ", ".join(sorted(backend.options_model.model_fields))


def parse_options(pairs: Iterable[str], backend: Backend) -> dict[str, object]:
    """``key=value`` strings as an options mapping; a key whose option is a list collects every value.

    Values stay strings: the backend's `options_model` converts them when it validates.

    Raises:
        BackendOptionError: A pair is not ``key=value``.
    """
    fields = backend.options_model.model_fields
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BackendOptionError(backend.name, pair, "expected key=value", options_help(backend))
        field = fields.get(key)
        if field is not None and get_origin(field.annotation) is list:
            collected = values.setdefault(key, [])
            assert isinstance(collected, list)
            collected.append(value)
        else:
            values[key] = value
    return values


def describe_option_error(error: ErrorDetails) -> tuple[str, str]:
    """One pydantic error of an options model as (option name, what is wrong and what was expected).

    The option name is dotted for a nested option and empty for a check across options.
    """
    option = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return option, "not one of the backend's options (Extra inputs are not permitted)"
    if kind == "missing":
        return option, "required option is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return option, message
    return option, f"{message} (got {error['input']!r})"
