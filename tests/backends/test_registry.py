"""Tests of the backend registry: built-ins, unknown names, and plugins from the entry-point group.

Plugins are installed for real: each test writes a minimal distribution (a module plus a
``.dist-info`` folder with ``entry_points.txt``) into ``tmp_path`` and puts that folder on
``sys.path``, so ``importlib.metadata.entry_points`` finds it exactly as it would find an
installed package.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import backends
import backends.errors
import backends.threads
import pipeline
import pipeline.errors
import pipeline.threads
from backends.cpu import CpuBackend
from backends.errors import BackendError, UnknownBackendError

PLUGIN_MODULES = ("acme_backend", "acme_broken_backend", "acme_missing_backend")


def install_distribution(
    site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "0.1"
) -> None:
    """Write a distribution into `site`: its modules and a dist-info declaring backend entry points."""
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\n{lines}")


ACME_SOURCE = """
    from backends.ort import OrtBackend
    from backends.cpu import CpuBackend


    class AcmeBackend(OrtBackend):
        name = "acme"
        execution_providers = ("CPUExecutionProvider",)
        capabilities = CpuBackend.capabilities
        install_hint = "pip install acme-backend"
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path that distributions can be installed into; plugin modules are unloaded after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


@pytest.fixture
def acme(site: Path) -> Path:
    """The acme_backend distribution, registering backend "acme"."""
    install_distribution(site, "acme_backend", {"acme": "acme_backend:AcmeBackend"}, {"acme_backend": ACME_SOURCE})
    importlib.invalidate_caches()
    return site


def write_identity_model(path: Path) -> Path:
    """y = Identity(x), x: [batch, 2] float32."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_get_backend_cpu() -> None:
    backend = backends.get_backend("cpu")

    assert isinstance(backend, CpuBackend)
    assert backend.name == "cpu"
    assert backend.availability().ok


def test_unknown_backend_lists_registered_names() -> None:
    with pytest.raises(BackendError) as caught:
        backends.get_backend("no-such-backend")

    error = caught.value
    assert error.backend == "no-such-backend"
    assert "unknown backend" in error.reason
    assert "registered: " in error.reason
    registered = error.reason.split("registered: ", 1)[1].split(", ")
    assert {"cpu", "cuda"} <= set(registered)
    assert registered == sorted(registered)


def test_list_backends_shows_builtins_sorted() -> None:
    entries = backends.list_backends()

    names = [entry.name for entry in entries]
    assert names == sorted(names)
    cpu = next(entry for entry in entries if entry.name == "cpu")
    assert cpu.origin == "builtin"
    assert cpu.target == "backends.cpu:CpuBackend"
    assert isinstance(cpu.backend, CpuBackend)


def test_plugin_from_entry_point_is_listed_and_usable(acme: Path, tmp_path: Path) -> None:
    entries = {entry.name: entry for entry in backends.list_backends()}

    assert "acme" in entries
    entry = entries["acme"]
    assert entry.origin == "acme_backend"
    assert entry.target == "acme_backend:AcmeBackend"
    assert entry.availability.ok
    assert isinstance(entry.backend, backends.Backend)

    backend = backends.get_backend("acme")
    assert type(backend).__module__ == "acme_backend"
    assert backend.name == "acme"
    x = np.array([[1.0, -2.0], [3.5, 0.0]], dtype=np.float32)
    with backend.open(write_identity_model(tmp_path / "identity.onnx")) as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], x)

    with pytest.raises(BackendError) as caught:
        backends.get_backend("no-such-backend")
    assert "acme" in caught.value.reason.split("registered: ", 1)[1].split(", ")


def test_plugin_that_fails_to_import_is_unavailable(site: Path) -> None:
    install_distribution(
        site,
        "acme_missing_backend",
        {"missing": "acme_missing_backend:Nope", "noclass": "acme_backend_helpers_missing:Backend"},
        {"acme_missing_backend": "VALUE = 1\n"},
    )
    importlib.invalidate_caches()

    entries = {entry.name: entry for entry in backends.list_backends()}

    for name in ("missing", "noclass"):
        entry = entries[name]
        assert entry.origin == "acme_missing_backend"
        assert entry.backend is None
        assert not entry.availability.ok
        assert "cannot load" in entry.availability.reason
        assert entry.availability.hint
        with pytest.raises(BackendError) as caught:
            backends.get_backend(name)
        assert caught.value.backend == name
        assert entry.target in caught.value.reason
    assert "AttributeError" in entries["missing"].availability.reason
    assert "ModuleNotFoundError" in entries["noclass"].availability.reason
    # A broken plugin does not hide the working backends.
    assert entries["cpu"].availability.ok


def test_plugin_that_is_not_a_backend_is_rejected(site: Path) -> None:
    install_distribution(
        site,
        "acme_missing_backend",
        {"notabackend": "acme_missing_backend:NotABackend"},
        {"acme_missing_backend": "class NotABackend:\n    name = 'notabackend'\n"},
    )
    importlib.invalidate_caches()

    entry = next(entry for entry in backends.list_backends() if entry.name == "notabackend")
    assert entry.backend is None
    assert "does not implement the Backend protocol" in entry.availability.reason
    with pytest.raises(BackendError, match="does not implement the Backend protocol"):
        backends.get_backend("notabackend")


def test_plugin_cannot_shadow_a_builtin(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    install_distribution(
        site,
        "acme_backend",
        {"cpu": "acme_backend:AcmeBackend"},
        {"acme_backend": ACME_SOURCE},
    )
    importlib.invalidate_caches()

    with caplog.at_level("WARNING", logger="backends.registry"):
        entry = next(entry for entry in backends.list_backends() if entry.name == "cpu")

    assert entry.origin == "builtin"
    assert isinstance(backends.get_backend("cpu"), CpuBackend)
    assert "shadowed by the built-in" in caplog.text
    assert "acme_backend" not in sys.modules  # the shadowed plugin is never imported


def test_plugin_raising_at_import_is_unavailable_not_fatal(site: Path) -> None:
    install_distribution(
        site,
        "acme_broken_backend",
        {"broken": "acme_broken_backend:Backend"},
        {"acme_broken_backend": "raise RuntimeError('no licence server')\n"},
    )
    importlib.invalidate_caches()

    entries = {entry.name: entry for entry in backends.list_backends()}

    assert not entries["broken"].availability.ok
    assert "no licence server" in entries["broken"].availability.reason


def test_backends_imports_first_in_a_fresh_interpreter() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", "import backends.ort"], capture_output=True, text=True, timeout=120, check=False
    )

    assert completed.returncode == 0, completed.stderr


def test_backends_imports_nothing_from_pipeline() -> None:
    code = (
        "import sys, backends, backends.resolve, backends.cuda, backends.fpga, backends.threads\n"
        "backends.list_backends()\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'pipeline'))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_pipeline_re_exports_the_backend_errors_and_thread_helpers() -> None:
    for name in ("ExitCode", "OnnxforgeError", "BackendError", "UnknownBackendError", "BackendOptionError"):
        assert getattr(pipeline.errors, name) is getattr(backends.errors, name)
    assert issubclass(pipeline.errors.JobError, backends.errors.OnnxforgeError)
    assert pipeline.BackendError is backends.errors.BackendError
    for name in ("THREADS_ENV", "job_threads", "cpu_threads", "session_options"):
        assert getattr(pipeline.threads, name) is getattr(backends.threads, name)


def test_an_unknown_backend_is_a_typed_backend_error() -> None:
    with pytest.raises(UnknownBackendError, match="unknown backend; registered: .*cpu") as caught:
        backends.get_backend("nosuch")

    assert isinstance(caught.value, BackendError)
    assert caught.value.backend == "nosuch"
