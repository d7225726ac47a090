"""The hls4ml export in the report: where the project is, and its C simulation against the emulator and CPU QDQ."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from backends.fpga.hls.results import HlsBuild, IntegerComparison


class HlsSummary(BaseModel):
    """One target's hls4ml project (the hls stage's record and the report's section).

    Attributes:
        target: The fpga target whose accelerator partition was exported.
        model: The int8 model the partition comes from.
        project: The project folder, relative to the output folder.
        build: What was built, and the C simulation's comparisons.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    target: str
    model: str
    project: str
    build: HlsBuild

    def verdict(self) -> str:
        """One line: bit-exact or not against the emulator, the CPU QDQ step difference, the build time."""
        build = self.build
        against = (
            "bit-exact against the emulator"
            if build.bit_exact
            else f"{build.vs_emulator.mismatches} of {build.vs_emulator.values} values differ from the emulator"
        )
        return (
            f"hls4ml C simulation on {self.target} ({self.project}/): {against} on {build.samples} samples; "
            f"max {build.vs_cpu_qdq.max_difference} output steps from CPU QDQ; built in {build.build_seconds:.1f} s"
        )


def render_hls(summary: HlsSummary) -> list[str]:
    """The report's Markdown section of one hls4ml project."""
    build = summary.build
    rows = [
        _row("C simulation vs emulator", build.vs_emulator),
        _row("C simulation vs CPU QDQ", build.vs_cpu_qdq),
        _row("emulator vs CPU QDQ", build.emulator_vs_cpu_qdq),
    ]
    lines = [
        f"## hls4ml project for {summary.target} ({summary.project}/)",
        "",
        f"The accelerator partition of {summary.model} ({len(build.nodes)} nodes) as an hls4ml {build.backend} "
        f"project ({build.io_type}, part {build.part}); its C simulation on {build.samples} evaluation samples:",
        "",
        "| comparison | values | differing | max difference (output steps) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"{summary.verdict()}.",
        *[f"- {difference}" for difference in build.differences],
        "",
        f"Synthesise with Vitis HLS in {summary.project}/: `{build.synthesis_command}` (see its README.md).",
    ]
    return lines


def _row(label: str, comparison: IntegerComparison) -> str:
    return f"| {label} | {comparison.values} | {comparison.mismatches} | {comparison.max_difference} |"
