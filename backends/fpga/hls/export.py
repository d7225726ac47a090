"""One int8 model's accelerator partition to a compiled hls4ml project, checked on evaluation data."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from backends.errors import BackendError
from backends.fpga.hls.compare import PartitionRuns, Tally, boundary_tensors
from backends.fpga.hls.project import HlsProject, HlsSettings, Testbench, build_project
from backends.fpga.hls.qonnx_export import QonnxPartition, accelerator_segment, boundary, export_qonnx
from backends.fpga.hls.readme import VITIS_COMMAND, build_options_tcl, render_readme
from backends.fpga.hls.results import HlsBuild, IntegerComparison
from backends.fpga.hls.toolchain import require_toolchain
from backends.fpga.partition import partition
from backends.fpga.profile import FpgaProfile

logger = logging.getLogger(__name__)

QONNX_FILE = "model.qonnx.onnx"
README = "README.md"
# Samples of the first batch written for the project's own test bench (tb_data/).
TESTBENCH_SAMPLES = 100

Feeds = Mapping[str, np.ndarray]
Progress = Callable[[int, int, str], None]


def export_hls_project(
    model_path: Path,
    profile: FpgaProfile,
    folder: Path,
    batches: Iterable[Feeds],
    target: str = "fpga",
    settings: HlsSettings | None = None,
    progress: Progress | None = None,
) -> HlsBuild:
    """Write the model's accelerator partition as an hls4ml project in `folder`, compile its C
    simulation and compare it with the emulator and CPU QDQ on `batches` (the first one also
    fixes the partition's shapes and fills the project's test bench).

    Raises:
        BackendError: hls4ml, qonnx or g++ is missing; the partition cannot be exported; hls4ml
            or g++ fails on it.
    """
    require_toolchain(target)
    settings = settings or HlsSettings()
    report = progress or (lambda done, total, detail: None)
    start = time.perf_counter()
    model = _load(model_path)
    plan = partition(model, profile)
    segment = accelerator_segment(plan)
    runs = PartitionRuns(model, plan, segment, profile)
    inputs, outputs = boundary(model, plan, segment)
    names = [fixed.tensor for fixed in (*inputs, *outputs)]
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise BackendError(target, "the hls4ml export needs evaluation data to compare its C simulation on")
    example = dict(zip(names, runs.boundary(first, names), strict=True))
    exported = export_qonnx(model, plan, profile.arithmetic.rounding, {n: v.shape for n, v in example.items()})
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(exported.model, str(folder / QONNX_FILE))
    exported_at = time.perf_counter()
    report(1, 3, "convert and compile with hls4ml")
    testbench = _testbench(runs, exported, example)
    runs.emulator.saturated.clear()  # counted again when the first batch is simulated
    project = build_project(exported, folder, profile, settings, testbench)
    (folder / "build_opt.tcl").write_text(build_options_tcl())
    report(2, 3, "C simulation")
    clock = time.perf_counter()
    samples, tallies = _simulate(runs, exported, project, [first], iterator)
    seconds = {
        "export": round(exported_at - start, 3),
        "convert": project.convert_seconds,
        "compile": project.compile_seconds,
        "simulate": round(time.perf_counter() - clock, 3),
    }
    build = _build(exported, project, samples, tallies, runs.emulator.saturated, seconds, profile)
    (folder / README).write_text(render_readme(build, target, profile))
    report(3, 3, "done")
    logger.info(
        "hls4ml C simulation of %s: %d of %d values differ from the emulator", target, *_counts(build.vs_emulator)
    )
    return build


def _load(model_path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(model_path))
    except Exception as e:  # protobuf and IO errors both mean "cannot load"
        raise BackendError("fpga", f"cannot load {model_path.name}: {type(e).__name__}: {e}") from e


def _testbench(runs: PartitionRuns, exported: QonnxPartition, example: Mapping[str, np.ndarray]) -> Testbench | None:
    """The first samples of the first batch and the emulator's outputs for them (one input and one output only)."""
    if len(exported.inputs) != 1 or len(exported.outputs) != 1:
        return None
    (source,), (result,) = exported.inputs, exported.outputs
    integers = example[source.tensor][:TESTBENCH_SAMPLES]
    (emulated,) = runs.emulate(exported, [integers])
    values = integers.astype(np.float64) * 2.0**-source.frac_bits
    if values.ndim > 2:
        values = np.moveaxis(values, 1, -1)
    return Testbench(inputs=np.ascontiguousarray(values), outputs=emulated.astype(np.float64) * 2.0**-result.frac_bits)


def _simulate(
    runs: PartitionRuns,
    exported: QonnxPartition,
    project: HlsProject,
    head: list[Feeds],
    rest: Iterable[Feeds],
) -> tuple[int, dict[str, Tally]]:
    """Every batch through CPU QDQ (the boundary), the emulator and the C simulation."""
    names = boundary_tensors(exported)
    count = len(exported.inputs)
    tallies = {key: Tally() for key in ("vs_emulator", "vs_cpu_qdq", "emulator_vs_cpu_qdq")}
    samples = 0
    for feeds in [*head, *rest]:
        values = runs.boundary(feeds, names)
        inputs, cpu = values[:count], values[count:]
        emulated = runs.emulate(exported, inputs)
        simulated = project.simulate(inputs)
        tallies["vs_emulator"].update(simulated, emulated)
        tallies["vs_cpu_qdq"].update(simulated, cpu)
        tallies["emulator_vs_cpu_qdq"].update(emulated, cpu)
        samples += len(inputs[0])
    return samples, tallies


def _build(
    exported: QonnxPartition,
    project: HlsProject,
    samples: int,
    tallies: dict[str, Tally],
    saturated: dict[str, int],
    seconds: dict[str, float],
    profile: FpgaProfile,
) -> HlsBuild:
    vs_emulator = tallies["vs_emulator"].result()
    return HlsBuild(
        backend=project.settings.backend,
        io_type=project.settings.io_type,
        part=project.part,
        clock_period_ns=project.settings.clock_period_ns,
        project_name=project.settings.project_name,
        qonnx_model=QONNX_FILE,
        nodes=list(exported.nodes),
        inputs=[f"{fixed.tensor} ({fixed.frac_bits})" for fixed in exported.inputs],
        outputs=[f"{fixed.tensor} ({fixed.frac_bits})" for fixed in exported.outputs],
        samples=samples,
        vs_emulator=vs_emulator,
        vs_cpu_qdq=tallies["vs_cpu_qdq"].result(),
        emulator_vs_cpu_qdq=tallies["emulator_vs_cpu_qdq"].result(),
        emulator_saturations=dict(saturated),
        differences=explain(vs_emulator, saturated, profile),
        layers=project.layers(),
        seconds=seconds,
        synthesis_command=VITIS_COMMAND,
    )


def explain(vs_emulator: IntegerComparison, saturated: Mapping[str, int], profile: FpgaProfile) -> list[str]:
    """Why the C simulation differs from the emulator, where it does (empty when bit-exact)."""
    if vs_emulator.exact:
        return []
    bits = profile.arithmetic.accumulator_bits
    if saturated:
        where = ", ".join(f"{node}: {count}" for node, count in sorted(saturated.items()))
        return [
            f"{sum(saturated.values())} accumulations overflowed the profile's {bits}-bit accumulator ({where}): "
            "the emulator saturates them, the project's accumulator wraps (AP_WRAP); the outputs computed from "
            "them differ, and every later value that reads them"
        ]
    return [
        f"{vs_emulator.mismatches} values differ (by up to {vs_emulator.max_difference} steps) with no accumulator "
        "overflow in the emulator: the types do not explain it (see README.md's layers); this is a bug in the export "
        "or in hls4ml"
    ]


def _counts(comparison: IntegerComparison) -> tuple[int, int]:
    return comparison.mismatches, comparison.values
