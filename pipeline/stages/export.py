"""Export stage: the model to an fp32 ONNX file, checked against PyTorch before anything else runs."""

from __future__ import annotations

import logging
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from pipeline.artifacts import Artifact
from pipeline.errors import StageError, first_line
from pipeline.feeds import feeds_digest
from pipeline.intake import ModelSubject, adopt_onnx_source, check_model_file
from pipeline.job import ConversionJob, InputSpec
from pipeline.llm.job import is_causal_lm
from pipeline.onnx_io import load_graph_only, model_artifact, save_model
from pipeline.outputs import named_outputs, torch_inputs
from pipeline.records import DistillRecord, ExportRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import NoPreconditions, StageContext
from pipeline.stages.distill import pytorch_model, pytorch_program
from pipeline.stages.source_weights import job_input_hashes, release_source_module
from pipeline.threads import session_options

logger = logging.getLogger(__name__)
# torch.onnx's op registry logs "torchvision is not installed. Skipping torchvision::nms" (four lines,
# through torch's own handler) on a process's first export: nothing about the user's model. Unless the
# caller chose a level for that logger (the CLI's -v does), only its errors are shown.
_TORCH_REGISTRATION = logging.getLogger("torch.onnx._internal.exporter._registration")
if _TORCH_REGISTRATION.level == logging.NOTSET:
    _TORCH_REGISTRATION.setLevel(logging.ERROR)

FP32_MODEL = "model.fp32.onnx"
# Op names as torch's exporters print them: aten::upsample_bicubic2d, aten.foo.default, ...
_OP_PATTERN = re.compile(r"\baten(?:::|\.)[A-Za-z_]\w*(?:\.\w+)?")


class ExportStage(NoPreconditions):
    """Export the job's model (or adopt its ONNX file), keep named dims dynamic, check the result."""

    name = StageName.EXPORT

    def enabled(self, job: ConversionJob) -> bool:
        """Export always runs (for an ONNX-file source it adopts and checks the file)."""
        return True

    def key(self, ctx: StageContext) -> str | None:
        """The model source (and the distilled student), the inputs and export settings, the example batch."""
        job = ctx.job
        return content_key(
            self.name,
            {
                "source": job_input_hashes(ctx),
                "model": job.model.model_dump(mode="json"),
                "inputs": [spec.model_dump(mode="json") for spec in job.inputs],
                "export": job.export.model_dump(mode="json"),
                "example": feeds_digest(ctx.example_batch().feeds),
                "student": student.sha256 if (student := ctx.artifact_with(DistillRecord)) is not None else None,
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Export, save (external data for big models), check, and describe the artifact."""
        job = ctx.job
        target = ctx.workdir / FP32_MODEL
        if is_causal_lm(job):
            return self._export_causal_lm(ctx, target)
        scratch = ctx.workdir / ".export-scratch"
        seconds: dict[str, float] = {}
        clock = time.perf_counter()
        try:
            failures: dict[str, str] = {}
            reference: list[tuple[str, torch.Tensor]] = []
            if ctx.source.onnx_file is not None:
                # Weights read from the checked data files, saved under this stage's own names.
                model, exporter = adopt_onnx_source(job, ctx.source.onnx_file), "none (ONNX file given)"
            else:
                example = torch_inputs(ctx.example_batch().feeds)
                reference = self._reference_outputs(ctx, example)
                model, exporter, failures = self._export(ctx, example, [name for name, _ in reference], scratch)
            if job.export.ir_version is not None:
                model.ir_version = job.export.ir_version
            seconds["export"], clock = time.perf_counter() - clock, time.perf_counter()
            external = save_model(
                model, target, job.export.external_data_threshold_bytes, verify=lambda path: self._check_file(path, ctx)
            )
            seconds["save_and_check"], clock = time.perf_counter() - clock, time.perf_counter()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if reference:
            self._check_against_pytorch(target, ctx, reference)
        seconds["pytorch_check"] = time.perf_counter() - clock
        proto = load_graph_only(target)
        return model_artifact(
            self.name,
            target,
            None,
            ExportRecord(
                exporter=exporter,
                fallback_reason=failures.get("dynamo", ""),
                opset=_default_opset(proto),
                ir_version=proto.ir_version,
                external_data=external,
                nodes=len(proto.graph.node),
                inputs=[value.name for value in proto.graph.input],
                outputs=[value.name for value in proto.graph.output],
                seconds={phase: round(value, 4) for phase, value in seconds.items()},
            ),
        )

    def _export_causal_lm(self, ctx: StageContext, target: Path) -> Artifact:
        """The decoder with its KV cache; a large PyTorch model is released before ONNX Runtime
        loads the export for its check (validation builds it again)."""
        from pipeline.llm.export_stage import check_exported_decoder, export_causal_lm

        module = pytorch_model(ctx)
        assert module is not None  # preflight: a causal LM comes from a factory
        exported = export_causal_lm(ctx.job, module, target, lambda path: self._check_file(path, ctx))
        del module  # the last reference here: the release below can free it
        release_source_module(ctx)
        return check_exported_decoder(ctx.job, exported)

    def _reference_outputs(
        self, ctx: StageContext, example: tuple[torch.Tensor, ...]
    ) -> list[tuple[str, torch.Tensor]]:
        """PyTorch's outputs on the example, named by the job or by their structure."""
        model = pytorch_model(ctx)
        assert model is not None
        with torch.inference_mode():
            try:
                outputs = named_outputs(model(*example))
            except Exception as e:  # the model is user code
                raise StageError(self.name, ctx.job.name, f"the model failed on the example inputs: {e}") from e
        names = ctx.job.model.output_names or [name for name, _ in outputs]
        if len(names) != len(outputs):
            raise StageError(
                self.name,
                ctx.job.name,
                f"model.output_names lists {len(names)} name(s) {names} but the model returns "
                f"{len(outputs)} output(s) {[name for name, _ in outputs]}",
            )
        return [(name, tensor) for name, (_, tensor) in zip(names, outputs, strict=True)]

    def _export(
        self, ctx: StageContext, example: tuple[torch.Tensor, ...], output_names: list[str], scratch: Path
    ) -> tuple[ir.Model, str, dict[str, str]]:
        """Run the exporters in the job's order; return the model, who made it and who failed why."""
        job = ctx.job
        order = ["dynamo", "torchscript"] if job.export.exporter == "auto" else [job.export.exporter]
        failures: dict[str, str] = {}
        for exporter in order:
            try:
                return _EXPORTERS[exporter](ctx, example, output_names, scratch), exporter, failures
            except Exception as e:  # exporters fail in many ways; all are recorded
                failures[exporter] = _describe_failure(e)
                logger.warning("%s exporter failed on %s: %s", exporter, job.name, failures[exporter])
                if exporter == order[-1]:
                    causes = "; ".join(f"{name}: {cause}" for name, cause in failures.items())
                    raise StageError(self.name, job.name, f"every exporter failed ({causes})") from e
        raise AssertionError("unreachable: the loop returns or raises")

    def _check_file(self, path: Path, ctx: StageContext) -> None:
        """Model intake on the saved file before it is moved into place: the ONNX checker, the inputs
        against the job's (named dims still symbolic), tensors, constants (`pipeline.intake`).

        Raises:
            JobError: The model fails a check; named as the user's file or source, never `path`.
        """
        check_model_file(ctx.job, _subject(path, ctx))

    def _check_against_pytorch(self, path: Path, ctx: StageContext, reference: list[tuple[str, torch.Tensor]]) -> None:
        """Output names, order and shapes of the saved model against PyTorch on the example."""
        job = ctx.job
        session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        expected = [name for name, _ in reference]
        if names != expected:
            raise StageError(self.name, job.name, f"the ONNX outputs are {names}; PyTorch's are {expected}")
        produced = session.run(None, ctx.example_batch().feeds)
        for (name, tensor), array in zip(reference, produced, strict=True):
            if tuple(tensor.shape) != np.shape(array):
                raise StageError(
                    self.name,
                    job.name,
                    f"output {name!r} has shape {list(np.shape(array))} in ONNX but {list(tensor.shape)} in PyTorch",
                )


def _subject(path: Path, ctx: StageContext) -> ModelSubject:
    """The saved file, named in errors as what the user gave: their ONNX file, or the exported source."""
    job = ctx.job
    if ctx.source.onnx_file is not None:
        return ModelSubject.onnx_source(ctx.source.onnx_file, read_from=path)
    if ctx.artifact_with(DistillRecord) is not None and job.distill is not None:
        return ModelSubject.exported(path, f"the distilled student {job.distill.student}", "distill.student")
    if job.model.exported_program is not None:
        return ModelSubject.exported(path, str(job.model.exported_program), "model.exported_program")
    return ModelSubject.exported(path, str(job.model.factory), "model.factory")


def torch_dynamic_shapes(inputs: list[InputSpec]) -> tuple[dict[int, torch.export.Dim], ...]:
    """One torch.export Dim per dim name, shared by every input that names it."""
    dims: dict[str, torch.export.Dim] = {}
    return tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in spec.dynamic_axes.items()}
        for spec in inputs
    )


def _export_dynamo(
    ctx: StageContext, example: tuple[torch.Tensor, ...], output_names: list[str], scratch: Path
) -> ir.Model:
    job = ctx.job
    program = pytorch_program(ctx)
    exported: torch.nn.Module | torch.export.ExportedProgram | None = program or pytorch_model(ctx)
    assert exported is not None
    # optimize=False: simplification is the simplify stage's job, so each step stays measurable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            exported,
            example,
            dynamo=True,
            input_names=[spec.name for spec in job.inputs],
            output_names=output_names,
            dynamic_shapes=None if program is not None else torch_dynamic_shapes(job.inputs),
            opset_version=job.export.opset_for(decoder=False),
            optimize=False,
            verbose=False,
        )
    assert onnx_program is not None
    return onnx_program.model


def _export_torchscript(
    ctx: StageContext, example: tuple[torch.Tensor, ...], output_names: list[str], scratch: Path
) -> ir.Model:
    job = ctx.job
    model = pytorch_model(ctx)
    assert model is not None
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / FP32_MODEL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=[spec.name for spec in job.inputs],
            output_names=output_names,
            dynamic_axes={spec.name: spec.dynamic_axes for spec in job.inputs if spec.dynamic_axes},
            opset_version=job.export.opset_for(decoder=False),
        )
    return ir.load(path)  # lazy: weights are read from scratch when saved, before scratch goes


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _describe_failure(error: BaseException) -> str:
    """One line: the exception, plus the first aten op named anywhere in its chain."""
    texts = []
    current: BaseException | None = error
    while current is not None:
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    match = _OP_PATTERN.search("\n".join(texts))
    op = f" (failing op: {match.group(0)})" if match else ""
    return f"{type(error).__name__}: {first_line(error)}{op}"


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)
