"""What the hls4ml export built and measured, as typed results (the job's record and report embed them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IntegerComparison(_Result):
    """One run's int8 outputs against another's, value by value; one int8 step is one output step.

    Attributes:
        values: Integer values compared.
        mismatches: Values that differ.
        max_difference: Largest difference, in output steps (0: bit for bit equal).
    """

    values: int = 0
    mismatches: int = 0
    max_difference: int = 0

    @property
    def exact(self) -> bool:
        """Every value compared is equal."""
        return self.mismatches == 0


class HlsLayer(_Result):
    """One layer of the hls4ml project.

    Attributes:
        name: The layer's name in the project.
        kind: hls4ml's layer class (Conv2D, Dense, Activation, Pooling2D, ...).
        types: Its C++ types by role (result, weight, bias, accum), e.g. ``ap_fixed<8,3,AP_RND_CONV,AP_SAT>``.
    """

    name: str
    kind: str
    types: dict[str, str]


class HlsBuild(_Result):
    """An hls4ml project of the accelerator partition, and its C simulation against the emulator and CPU QDQ.

    Attributes:
        backend: hls4ml backend the project is for (``Vitis``).
        io_type: ``io_stream`` or ``io_parallel``.
        part: FPGA part the project targets.
        clock_period_ns: Target clock period.
        project_name: The top function's name.
        qonnx_model: The QONNX model's file name inside the project folder.
        nodes: The int8 model's accelerator nodes in the project, in order.
        inputs: The int8 tensors the project reads, as ``name (frac bits)``.
        outputs: The int8 tensors it writes, as ``name (frac bits)``.
        samples: Evaluation samples simulated.
        vs_emulator: C simulation against the emulator (bit-exact expected).
        vs_cpu_qdq: C simulation against ONNX Runtime's CPU QDQ run of the same int8 model.
        emulator_vs_cpu_qdq: The emulator against CPU QDQ (what the on-target parity measures).
        emulator_saturations: Accumulations the emulator saturated, per node.
        differences: Every difference between the C simulation and the emulator, explained
            (empty when bit-exact).
        layers: The project's layers with their C++ types.
        seconds: Time per step: export (QONNX), convert (qonnx + hls4ml), compile (g++), simulate.
        synthesis_command: How to synthesise the project with Vitis HLS (run in the project folder).
    """

    backend: str
    io_type: str
    part: str
    clock_period_ns: float
    project_name: str
    qonnx_model: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    samples: int
    vs_emulator: IntegerComparison
    vs_cpu_qdq: IntegerComparison
    emulator_vs_cpu_qdq: IntegerComparison
    emulator_saturations: dict[str, int] = {}
    differences: list[str] = []
    layers: list[HlsLayer] = []
    seconds: dict[str, float] = {}
    synthesis_command: str

    @property
    def bit_exact(self) -> bool:
        """The C simulation matched the emulator on every value."""
        return self.vs_emulator.exact

    @property
    def build_seconds(self) -> float:
        """Export, conversion and compilation together (the simulation not included)."""
        return round(sum(value for step, value in self.seconds.items() if step != "simulate"), 3)
