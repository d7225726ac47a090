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
        artifacts: Artifacts by stage name (paths relative to `output_dir`); a stage that wrote
            one model per group of targets has one entry per group, ``quantize.fpga``.
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

    def path(self, stage: str, target: str | None = None) -> Path:
        """The file a stage produced, e.g. ``result.path("quantize")`` for the int8 model, or
        ``result.path("quantize", "fpga")`` for the one a target runs when targets have their own.

        Raises:
            KeyError: The stage wrote no file (for that target), or one per target and none was named.
        """
        return self.output_dir / self.artifact(stage, target).path

    def artifact(self, stage: str, target: str | None = None) -> Artifact:
        """The artifact a stage produced (for `target`, when named); see `path`.

        Raises:
            KeyError: As for `path`.
        """
        if target is None:
            if stage not in self.artifacts:
                branches = sorted(key for key in self.artifacts if key.startswith(f"{stage}."))
                raise KeyError(f"{stage!r} wrote one artifact per group of targets ({branches}): name a target")
            return self.artifacts[stage]
        for key, artifact in self.artifacts.items():
            if (key == stage or key.startswith(f"{stage}.")) and artifact.serves(target):
                return artifact
        raise KeyError(f"no {stage!r} artifact for target {target!r}")
