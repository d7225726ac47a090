"""What a conversion returns: its artifacts, parity report, timings and manifest."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline.artifacts import Artifact
from pipeline.parity.report import ParityReport


class ConversionResult(BaseModel):
    """The outcome of one conversion job.

    Attributes:
        job: The job name.
        output_dir: The published output folder.
        artifacts: Artifacts by stage name (paths relative to `output_dir`).
        report: The parity report.
        manifest_path: The manifest, written last.
        timings: Seconds per stage.
    """

    model_config = ConfigDict(frozen=True)

    job: str
    output_dir: Path
    artifacts: dict[str, Artifact]
    report: ParityReport
    manifest_path: Path
    timings: dict[str, float]

    @property
    def passed(self) -> bool:
        """Every parity gate passed."""
        return self.report.verdict == "pass"

    def path(self, stage: str) -> Path:
        """The file a stage produced, e.g. ``result.path("quantize")`` for the int8 model."""
        return self.output_dir / self.artifacts[stage].path
