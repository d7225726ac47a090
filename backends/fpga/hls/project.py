"""The QONNX partition converted to an hls4ml project, its C simulation compiled and run.

qonnx cleans the graph and makes it channels last (hls4ml's layout for convolutions; the first
input then takes NHWC data, every output keeps its layout), Gemm becomes MatMul + Add (hls4ml's
Dense). The types: each ``Quant`` is an ``ap_fixed<bits, bits - frac_bits, AP_RND_CONV, AP_SAT>``
(hls4ml merges a layer's output Quant into the layer's result type, so the result is rounded and
saturated once, as the emulator's requantization does); the input layer takes its input's type;
each Conv / Dense accumulator is the profile's accumulator width with the fraction bits of the
products (input + weight fraction bits), rounding as the profile does (it aligns the bias).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.errors import BackendError
from backends.fpga.hls.qonnx_export import QonnxPartition
from backends.fpga.hls.results import HlsLayer
from backends.fpga.profile import FpgaProfile

logger = logging.getLogger(__name__)

# hls4ml's rounding mode for the profile's rounding (the same table as the Quant nodes').
AP_ROUNDING = {"half_even": "RND_CONV", "floor": "TRN"}
_ACCUMULATING = ("Conv", "MatMul")
_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")


@dataclass(frozen=True)
class HlsSettings:
    """How the hls4ml project is generated.

    Attributes:
        backend: hls4ml backend (``Vitis``: a Vitis HLS project).
        io_type: ``io_stream`` (layers connected by FIFOs: what convolutional networks synthesise
            as) or ``io_parallel``.
        project_name: Name of the top function and of the project files.
        part: FPGA part (None: hls4ml's default for the backend).
        clock_period_ns: Target clock period.
    """

    backend: str = "Vitis"
    io_type: str = "io_stream"
    project_name: str = "myproject"
    part: str | None = None
    clock_period_ns: float = 5.0


@dataclass(frozen=True)
class Testbench:
    """Data the project's own test bench reads (``tb_data/``): inputs and the expected outputs.

    Attributes:
        inputs: The first input as the C simulation takes it (float, channels last).
        outputs: The first output as the emulator computed it (float).
    """

    inputs: np.ndarray
    outputs: np.ndarray


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """hls4ml and qonnx print their progress and warn: keep it off the console, in the debug log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        if buffer.getvalue():
            logger.debug("%s:\n%s", what, buffer.getvalue())
        for warning in caught:
            logger.debug("%s: %s", what, warning.message)


class HlsProject:
    """A compiled hls4ml project: its C simulation runs int8 tensors in, int8 tensors out.

    Attributes:
        folder: The project folder.
        settings: How it was generated.
        convert_seconds: Time to clean the QONNX model and write the project.
        compile_seconds: Time to compile the C simulation (g++).
    """

    def __init__(
        self, graph: Any, partition: QonnxPartition, folder: Path, settings: HlsSettings, seconds: tuple[float, float]
    ) -> None:
        self._graph = graph
        self._partition = partition
        self.folder = folder
        self.settings = settings
        self.convert_seconds, self.compile_seconds = seconds

    @property
    def part(self) -> str:
        """The FPGA part the project targets (hls4ml's default for the backend unless set)."""
        return str(self._graph.config.get_config_value("Part"))

    def simulate(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the C simulation on the partition's int8 inputs (int8 model layout, any batch).

        Returns:
            The partition's outputs as integers (int64), in the int8 model's layout.

        Raises:
            BackendError: An output is not on its int8 grid (a type the export did not set).
        """
        feeds = [
            _to_fixed(array, fixed.frac_bits, index == 0)
            for index, (array, fixed) in enumerate(zip(inputs, self._partition.inputs, strict=True))
        ]
        samples = len(inputs[0])
        with _quiet("hls4ml predict"):
            predicted = self._graph.predict(feeds[0] if len(feeds) == 1 else feeds)
        outputs = predicted if isinstance(predicted, list) else [predicted]
        results = []
        for value, fixed, info in zip(
            outputs, self._partition.outputs, self._partition.model.graph.output, strict=True
        ):
            shape = [samples, *(d.dim_value for d in info.type.tensor_type.shape.dim[1:])]
            scaled = np.asarray(value, dtype=np.float64).reshape(shape) * 2.0**fixed.frac_bits
            integers = np.rint(scaled)
            if not np.array_equal(integers, scaled):
                raise BackendError("fpga", f"the C simulation's output {fixed.tensor} is not on its int8 grid")
            results.append(integers.astype(np.int64))
        return results

    def layers(self) -> list[HlsLayer]:
        """Every layer of the project with its C++ types."""
        found = []
        for layer in self._graph.get_layers():
            types = {name: _cpp_type(variable.precision) for name, variable in layer.types.items()}
            found.append(HlsLayer(name=layer.name, kind=layer.class_name, types=dict(sorted(types.items()))))
        return found


def build_project(
    partition: QonnxPartition,
    folder: Path,
    profile: FpgaProfile,
    settings: HlsSettings,
    testbench: Testbench | None = None,
) -> HlsProject:
    """Convert the QONNX partition with hls4ml into `folder` and compile its C simulation.

    Raises:
        BackendError: qonnx or hls4ml cannot convert the partition, or g++ cannot compile it.
    """
    start = time.perf_counter()
    cleaned = _run("prepare the QONNX model (qonnx cleanup, channels last)", lambda: _clean(partition.model))
    with tempfile.TemporaryDirectory(prefix="onnxforge-hls-tb-") as scratch:
        extra = _testbench_files(testbench, Path(scratch))
        graph = _run("convert the partition", lambda: _convert(cleaned, folder, profile, settings, extra))
        converted = time.perf_counter()
        _run("compile the C simulation (g++)", graph.compile)
    seconds = (round(converted - start, 3), round(time.perf_counter() - converted, 3))
    logger.info("hls4ml project %s: converted in %.1f s, compiled in %.1f s", folder, *seconds)
    return HlsProject(graph, partition, folder, settings, seconds)


def _run(step: str, action: Callable[[], Any]) -> Any:
    """One hls4ml / qonnx step, its output in the debug log and its failure a `BackendError`."""
    try:
        with _quiet(step):
            return action()
    except (BackendError, OSError):
        raise  # a refused write (disk full, permissions) is the runner's StorageError
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackendError(
            "fpga",
            f"hls4ml export: could not {step}: {type(e).__name__}: {detail}",
            "run with -v for hls4ml's output; set hls = false for this target to convert without the export",
        ) from e


def _clean(model: onnx.ModelProto) -> Any:
    """The QONNX model as hls4ml reads it: cleaned, channels last, Gemm as MatMul + Add."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    wrapped = cleanup_model(ModelWrapper(model))
    wrapped = wrapped.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True))
    wrapped = wrapped.transform(GemmToMatMul())
    return cleanup_model(wrapped)


def _testbench_files(testbench: Testbench | None, scratch: Path) -> dict[str, str]:
    """hls4ml's test-bench arguments: .npy files it copies into the project's tb_data/ as .dat files."""
    if testbench is None:
        return {}
    np.save(scratch / "tb_input.npy", testbench.inputs)
    np.save(scratch / "tb_output.npy", testbench.outputs)
    return {"input_data_tb": str(scratch / "tb_input.npy"), "output_data_tb": str(scratch / "tb_output.npy")}


def _convert(cleaned: Any, folder: Path, profile: FpgaProfile, settings: HlsSettings, extra: dict[str, str]) -> Any:
    """hls4ml's model of the cleaned QONNX graph, with the types the export derives from the scales."""
    import hls4ml

    config = hls4ml.utils.config.config_from_onnx_model(cleaned, granularity="name", backend=settings.backend)
    layers = config["LayerName"]
    for name, fixed_type in _input_types(cleaned).items():
        layers[name]["Precision"]["result"] = fixed_type
    for name, fixed_type in _accumulator_types(cleaned, profile).items():
        layers[name]["Precision"]["accum"] = fixed_type
    options: dict[str, Any] = {"part": settings.part} if settings.part else {}
    return hls4ml.converters.convert_from_onnx_model(
        cleaned,
        output_dir=str(folder),
        project_name=settings.project_name,
        backend=settings.backend,
        io_type=settings.io_type,
        clock_period=settings.clock_period_ns,
        hls_config=config,
        **options,
        **extra,
    )


def _input_types(cleaned: Any) -> dict[str, str]:
    """Each graph input's layer type: the type of the Quant that reads it (int8, or int16)."""
    types = {}
    initializers = {init.name for init in cleaned.graph.initializer}
    for value in cleaned.graph.input:
        if value.name in initializers:
            continue
        quant = next((n for n in cleaned.find_consumers(value.name) or [] if n.op_type == "Quant"), None)
        frac_bits = _frac_bits(cleaned, quant) if quant is not None else None
        if quant is not None and frac_bits is not None:
            width = int(np.asarray(cleaned.get_initializer(quant.input[3])).reshape(()))
            types[_layer_name(value.name)] = fixed_type(width, frac_bits, "RND_CONV", "SAT")
    return types


def _accumulator_types(cleaned: Any, profile: FpgaProfile) -> dict[str, str]:
    """Each Conv / MatMul layer's accumulator: the profile's width, the products' fraction bits."""
    width = profile.arithmetic.accumulator_bits
    rounding = AP_ROUNDING[profile.arithmetic.rounding]
    types = {}
    for node in cleaned.graph.node:
        if node.op_type not in _ACCUMULATING:
            continue
        fractions = [_frac_bits(cleaned, _quant_behind(cleaned, name)) for name in node.input[:2]]
        if None not in fractions:
            types[_layer_name(node.name)] = fixed_type(
                width, sum(f for f in fractions if f is not None), rounding, "WRAP"
            )
    return types


def fixed_type(width: int, frac_bits: int, rounding: str, saturation: str) -> str:
    """hls4ml's spelling of a signed fixed-point type: ``fixed<width, integer bits, rounding, saturation>``."""
    return f"fixed<{width},{width - frac_bits},{rounding},{saturation}>"


def _quant_behind(cleaned: Any, tensor: str) -> Any:
    """The Quant node a tensor comes from, through layout-only nodes (None: no Quant)."""
    producer = cleaned.find_producer(tensor)
    while producer is not None and producer.op_type in _LAYOUT_OPS:
        producer = cleaned.find_producer(producer.input[0])
    return producer if producer is not None and producer.op_type == "Quant" else None


def _frac_bits(cleaned: Any, quant: Any) -> int | None:
    """Fraction bits of a Quant node's power-of-two scale."""
    if quant is None:
        return None
    scale = cleaned.get_initializer(quant.input[1])
    if scale is None or np.asarray(scale).size != 1:
        return None
    mantissa, exponent = np.frexp(float(np.asarray(scale).reshape(())))
    return int(1 - exponent) if mantissa == 0.5 else None


def _layer_name(name: str) -> str:
    """hls4ml's layer name for an ONNX node or input name (its reader replaces dots)."""
    return name.replace(".", "_")


def _to_fixed(array: np.ndarray, frac_bits: int, channels_last: bool) -> np.ndarray:
    """int8 values as the real numbers they stand for, channels last for the first input (qonnx made it so)."""
    values = array.astype(np.float64) * 2.0**-frac_bits
    if channels_last and values.ndim > 2:
        values = np.moveaxis(values, 1, -1)
    return np.ascontiguousarray(values)


def _cpp_type(precision: Any) -> str:
    definition = getattr(precision, "definition_cpp", None)
    return str(definition()) if callable(definition) else str(precision)
