"""hls stage: the fpga target's accelerator partition as an hls4ml project (``hls/``), its C simulation
run on the evaluation data and compared with the emulator and CPU QDQ (target option ``hls = true``)."""

from __future__ import annotations

import logging
import shutil

from pydantic import ValidationError

from backends.fpga import FpgaOptions
from backends.fpga.hls import README, export_hls_project, require_toolchain
from backends.fpga.hls.qonnx_export import QUANT_ROUNDING, export_problem
from backends.fpga.profile import load_profile
from pipeline.artifacts import Artifact, sha256_file
from pipeline.errors import BackendError, JobError
from pipeline.job import ConversionJob
from pipeline.parity.hls import HlsSummary
from pipeline.records import HlsRecord, QuantizeRecord, StageName
from pipeline.stages.base import PreparedInputs, StageContext, Target

logger = logging.getLogger(__name__)

FPGA = "fpga"
HLS_FOLDER = "hls"


def hls_requested(job: ConversionJob) -> list[int]:
    """Indexes of the job's fpga targets with ``options.hls = true``."""
    found = []
    for index, spec in enumerate(job.targets):
        if spec.backend != FPGA:
            continue
        try:
            options = FpgaOptions.model_validate(spec.options)
        except ValidationError:
            continue  # preflight reports the bad option when it resolves the target
        if options.hls:
            found.append(index)
    return found


class HlsStage:
    """Export, build and simulate the hls4ml project of each fpga target that asks for it."""

    name = StageName.HLS

    def enabled(self, job: ConversionJob) -> bool:
        """Runs when an fpga target sets ``hls = true``."""
        return bool(hls_requested(job))

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """The job quantizes (the export takes the int8 model), the toolchain is here, and the
        profile's rounding has an hls4ml type.

        Raises:
            JobError: The job does not quantize.
            BackendError: hls4ml, qonnx or g++ is missing, or the profile rounds in a way hls4ml
                cannot express.
        """
        for index in hls_requested(job):
            key = f"targets[{index}].options.hls"
            if not job.quantize.enabled:
                problem = (
                    "the hls4ml export takes the fpga target's int8 model: set quantize.enabled = true, or hls = false"
                )
                raise JobError(job.origin, key, problem)
            require_toolchain(FPGA)
            options = FpgaOptions.model_validate(job.targets[index].options)
            rounding = load_profile(options.profile).arithmetic.rounding
            if rounding not in QUANT_ROUNDING:
                raise export_problem(
                    f"profile {options.profile} rounds requantization {rounding}; hls4ml's QONNX reader has types "
                    "only for half_even and floor"
                )

    def key(self, ctx: StageContext) -> str | None:
        """Never cached: the project is a folder (the stage cache keeps files), rebuilt on every run."""
        return None

    def run(self, ctx: StageContext) -> Artifact:
        """Write ``hls/`` for the fpga target: the QONNX model, the hls4ml project, its README."""
        (target,) = [ctx.targets[index] for index in hls_requested(ctx.job)]  # one fpga target per job
        summary = self._export(ctx, target)
        readme = ctx.workdir / summary.project / README
        logger.info("job %s: %s", ctx.job.name, summary.verdict())
        return Artifact(
            stage=self.name,
            path=f"{summary.project}/{README}",
            sha256=sha256_file(readme),
            targets=[target.name],
            record=HlsRecord(summary=summary),
        )

    def _export(self, ctx: StageContext, target: Target) -> HlsSummary:
        quantized = ctx.artifact_with(QuantizeRecord, target.name)
        if quantized is None or quantized.record_as(QuantizeRecord).shipped_precision == "fp32":
            raise BackendError(
                target.name,
                "hls = true, but the quantize search shipped the float model for this target: nothing runs on the "
                "accelerator to export",
                "let the target ship int8 only (targets.precisions = ['int8']), or set hls = false",
            )
        options = target.options if isinstance(target.options, FpgaOptions) else FpgaOptions()
        folder = ctx.workdir / HLS_FOLDER
        shutil.rmtree(folder, ignore_errors=True)  # the staging folder's own copy: built afresh
        build = export_hls_project(
            ctx.workdir / quantized.path,
            load_profile(options.profile),
            folder,
            (batch.feeds for batch in ctx.evaluation),
            target=target.name,
            progress=ctx.progress,
        )
        return HlsSummary(target=target.name, model=quantized.path, project=HLS_FOLDER, build=build)


def hls_summaries(ctx: StageContext) -> list[HlsSummary]:
    """The hls4ml projects of this run, for the report (empty: no target asked for one)."""
    return [
        artifact.record_as(HlsRecord).summary
        for artifact in ctx.artifacts.values()
        if isinstance(artifact.record, HlsRecord)
    ]
