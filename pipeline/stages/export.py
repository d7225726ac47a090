"""Export stage: the PyTorch model to an fp32 ONNX file, dynamo first, TorchScript as a fallback."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import onnx
import torch

from pipeline.artifacts import Artifact, sha256_file, write_with
from pipeline.errors import StageError
from pipeline.job import ConversionJob, InputSpec
from pipeline.stages.base import StageContext, flatten_outputs, torch_inputs

logger = logging.getLogger(__name__)

FP32_MODEL = "model.fp32.onnx"


class ExportStage:
    """Export the job's model with the exporter the job asks for, keeping named dims dynamic."""

    name = "export"

    def enabled(self, job: ConversionJob) -> bool:
        """Export always runs."""
        return True

    def run(self, ctx: StageContext) -> Artifact:
        """Export, check the saved file and its dynamic axes, and describe the artifact."""
        job = ctx.job
        example = torch_inputs(ctx.example_batch().feeds)
        output_names = self._output_names(ctx, example)
        target = ctx.workdir / FP32_MODEL
        order = ["dynamo", "torchscript"] if job.export.exporter == "auto" else [job.export.exporter]
        failures: dict[str, str] = {}
        for exporter in order:
            try:
                write_with(target, partial(_EXPORTERS[exporter], ctx.model, example, output_names, job))
            except Exception as e:  # noqa: BLE001 - exporters fail in many ways; all are recorded
                failures[exporter] = f"{type(e).__name__}: {_first_line(e)}"
                logger.warning("%s exporter failed on %s: %s", exporter, job.name, failures[exporter])
                if exporter == order[-1]:
                    causes = "; ".join(f"{name}: {cause}" for name, cause in failures.items())
                    raise StageError(self.name, job.name, f"every exporter failed ({causes})") from e
                continue
            break
        proto = self._checked(target, job)
        return Artifact(
            stage=self.name,
            path=FP32_MODEL,
            sha256=sha256_file(target),
            metadata={
                "exporter": exporter,
                "fallback_reason": failures.get("dynamo", ""),
                "opset": job.export.opset,
                "nodes": len(proto.graph.node),
                "inputs": [i.name for i in proto.graph.input],
                "outputs": [o.name for o in proto.graph.output],
            },
        )

    def _output_names(self, ctx: StageContext, example: tuple[torch.Tensor, ...]) -> list[str]:
        """The job's output names, or output_0..n; their count must match the model's outputs."""
        with torch.inference_mode():
            count = len(flatten_outputs(ctx.model(*example)))
        names = ctx.job.model.output_names or [f"output_{i}" for i in range(count)]
        if len(names) != count:
            raise StageError(
                self.name,
                ctx.job.name,
                f"model.output_names lists {len(names)} name(s) {names} but the model returns {count} output(s)",
            )
        return names

    def _checked(self, path: Path, job: ConversionJob) -> onnx.ModelProto:
        """Run the ONNX checker on the saved file and verify every named dim stayed symbolic."""
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise StageError(self.name, job.name, f"the exported model fails the ONNX checker: {_first_line(e)}") from e
        proto = onnx.load(str(path), load_external_data=False)
        graph_inputs = {value.name: value for value in proto.graph.input}
        for spec in job.inputs:
            _check_dynamic_axes(spec, graph_inputs.get(spec.name), job.name, self.name)
        return proto


def _check_dynamic_axes(spec: InputSpec, value: onnx.ValueInfoProto | None, job: str, stage: str) -> None:
    if value is None:
        raise StageError(stage, job, f"input {spec.name!r} is missing from the exported graph")
    dims = value.type.tensor_type.shape.dim
    for axis, name in spec.dynamic_axes.items():
        if axis >= len(dims) or not dims[axis].HasField("dim_param"):
            fixed = dims[axis].dim_value if axis < len(dims) else "absent"
            raise StageError(
                stage,
                job,
                f"input {spec.name!r} axis {axis} ({name!r}) should be dynamic but the exporter fixed it to {fixed}",
            )


def _dynamic_shapes(inputs: list[InputSpec]) -> tuple[dict[int, torch.export.Dim], ...]:
    """One torch.export Dim per dim name, shared by every input that names it."""
    dims: dict[str, torch.export.Dim] = {}
    return tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in spec.dynamic_axes.items()}
        for spec in inputs
    )


def _export_dynamo(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], output_names: list[str], job: ConversionJob, path: Path
) -> None:
    # optimize=False: simplification is the simplify stage's job, so each step stays measurable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=[spec.name for spec in job.inputs],
            output_names=output_names,
            dynamic_shapes=_dynamic_shapes(job.inputs),
            opset_version=job.export.opset,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)


def _export_torchscript(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], output_names: list[str], job: ConversionJob, path: Path
) -> None:
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
            opset_version=job.export.opset,
        )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
