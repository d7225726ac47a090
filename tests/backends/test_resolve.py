"""Resolving a target: backend lookup, availability, option validation and ``key=value`` parsing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

import backends.resolve
from backends.base import Availability
from backends.cpu import CpuBackend
from backends.cuda import CudaBackend
from backends.errors import BackendError, BackendOptionError, BackendUnavailableError, UnknownBackendError
from backends.fpga import FpgaBackend, FpgaOptions
from backends.ort import SessionOptionsSpec
from backends.resolve import (
    ResolvedTarget,
    options_help,
    parse_options,
    resolve_target,
    resolve_target_from_pairs,
    validate_options,
)
from tests.backends.test_contract import W, write_tiny_model


class _Unplugged(CpuBackend):
    """A backend whose device is missing here."""

    name = "unplugged"

    def availability(self) -> Availability:
        return Availability(ok=False, reason="no device on this machine", hint="plug the device in")


def test_defaults_when_no_options_are_given() -> None:
    target = resolve_target("cpu")

    assert isinstance(target, ResolvedTarget)
    assert isinstance(target.backend, CpuBackend)
    assert target.name == "cpu"
    assert target.options == SessionOptionsSpec()
    assert resolve_target("cpu", {}).options == SessionOptionsSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.options = SessionOptionsSpec()  # type: ignore[misc]


def test_options_are_validated_into_the_backends_options_model() -> None:
    target = resolve_target("fpga", {"cost_dims": ["batch=2"], "intra_op_threads": 1})

    assert isinstance(target.backend, FpgaBackend)
    assert isinstance(target.options, FpgaOptions)
    assert target.options.dims == {"batch": 2}
    assert target.options.intra_op_threads == 1


def test_a_resolved_target_opens_models(tmp_path: Path) -> None:
    """What `onnxforge parity` needs: `resolve_target(name, {})` gives a backend and its options."""
    target = resolve_target("cpu", {})
    x = np.ones((2, 4), dtype=np.float32)

    with target.backend.open(write_tiny_model(tmp_path / "tiny.onnx"), target.options) as session:
        y = session.run({"x": x})["y"]

    np.testing.assert_allclose(y, np.maximum(x @ W + np.array([0.1, -0.2, 0.3]), 0.0), rtol=1e-5, atol=1e-6)


def test_unknown_backend() -> None:
    with pytest.raises(UnknownBackendError) as caught:
        resolve_target("nosuch")

    assert caught.value.backend == "nosuch"
    assert "unknown backend; registered: cpu, cuda, fpga" in str(caught.value)


def test_unavailable_backend_says_why_and_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends.resolve, "get_backend", lambda name: _Unplugged())

    with pytest.raises(BackendUnavailableError) as caught:
        resolve_target("unplugged", {"intra_op_threads": 1})

    assert isinstance(caught.value, BackendError)
    assert caught.value.backend == "unplugged"
    assert caught.value.reason == "no device on this machine"
    assert caught.value.hint == "plug the device in"


@pytest.mark.parametrize(
    ("backend", "options", "option", "phrases"),
    [
        ("cpu", {"graph_optimization_level": "turbo"}, "graph_optimization_level", ("'all'", "(got 'turbo')")),
        ("cpu", {"intra_op_threads": -1}, "intra_op_threads", ("greater than or equal to 0", "(got -1)")),
        ("cpu", {"bogus": 1}, "bogus", ("not one of the backend's options", "Extra inputs are not permitted")),
        ("fpga", {"profile": "nope"}, "profile", ("no built-in profile 'nope'; built-ins: dpu-int8",)),
        ("fpga", {"cost_dims": ["batch"]}, "cost_dims", ("'batch' is not name=positive integer",)),
    ],
)
def test_a_bad_option_names_the_option_and_the_problem(
    backend: str, options: dict[str, object], option: str, phrases: tuple[str, ...]
) -> None:
    with pytest.raises(BackendOptionError) as caught:
        resolve_target(backend, options)

    error = caught.value
    assert error.backend == backend
    assert error.option == option
    for phrase in phrases:
        assert phrase in error.problem, error.problem
    assert error.hint == options_help(resolve_target(backend).backend)
    assert str(error).startswith(f"backend {backend!r}: option {option!r}: {error.problem}; to fix: options: ")


def test_a_check_across_options_has_no_option_name() -> None:
    with pytest.raises(BackendOptionError) as caught:
        validate_options(CudaBackend(), {"trt_fp16_enable": True})

    assert caught.value.option == ""
    assert caught.value.problem == "trt_fp16_enable only apply with tensorrt = true"
    assert "backend 'cuda': options: trt_fp16_enable only apply" in str(caught.value)


def test_options_help_lists_every_option_sorted() -> None:
    assert options_help(CpuBackend()) == "options: graph_optimization_level, inter_op_threads, intra_op_threads"
    assert options_help(FpgaBackend()).startswith("options: cost_dims, execution, graph_optimization_level")


def test_key_value_pairs_collect_list_options() -> None:
    pairs = ["cost_dims=batch=4", "profile=dpu-int8", "cost_dims=sequence=8", "intra_op_threads=2"]

    values = parse_options(pairs, FpgaBackend())

    assert values == {"cost_dims": ["batch=4", "sequence=8"], "profile": "dpu-int8", "intra_op_threads": "2"}


@pytest.mark.parametrize("pair", ["profile", "=dpu-int8", ""])
def test_a_pair_that_is_not_key_value_is_a_bad_option(pair: str) -> None:
    with pytest.raises(BackendOptionError) as caught:
        parse_options(["intra_op_threads=1", pair], FpgaBackend())

    assert caught.value.option == pair
    assert caught.value.problem == "expected key=value"


def test_resolve_from_pairs_parses_then_validates() -> None:
    target = resolve_target_from_pairs("fpga", ["cost_dims=batch=4", "intra_op_threads=3"])

    assert isinstance(target.options, FpgaOptions)
    assert target.options.dims == {"batch": 4}
    assert target.options.intra_op_threads == 3  # the options model converts the string
    with pytest.raises(BackendOptionError, match="Extra inputs are not permitted"):
        resolve_target_from_pairs("fpga", ["bogus=1"])


def test_options_are_instances_of_the_options_model() -> None:
    for name in ("cpu", "fpga"):
        target = resolve_target(name)
        assert isinstance(target.options, BaseModel)
        assert isinstance(target.options, target.backend.options_model)
