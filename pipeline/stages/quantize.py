"""Quantize stage: static int8 QDQ with ONNX Runtime's quantizer, calibrated on the job's data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from pipeline.artifacts import Artifact, staged_files
from pipeline.errors import JobError, StageError
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, QuantizeOptions
from pipeline.onnx_io import load_graph_only, model_artifact
from pipeline.stages.base import StageContext, Target

logger = logging.getLogger(__name__)

INT8_MODEL = "model.int8.onnx"

_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax}


class FeedReader(CalibrationDataReader):
    """Hands ONNX Runtime's calibrator one batch at a time from a `FeedSource`."""

    def __init__(self, source: FeedSource) -> None:
        self._source = source
        self._batches: Iterator[dict] = (batch.feeds for batch in source)
        self.batches_read = 0

    def get_next(self) -> dict | None:
        """The next batch of feeds, or None when the data is exhausted."""
        feeds = next(self._batches, None)
        if feeds is not None:
            self.batches_read += 1
        return feeds

    def rewind(self) -> None:
        """Start over (ORT calls this when it reads the data more than once)."""
        self._batches = (batch.feeds for batch in self._source)


class QuantizeStage:
    """Quantize weights and activations to int8 (QDQ), ranges from calibration data."""

    name = "quantize"

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.quantize.enabled

    def run(self, ctx: StageContext) -> Artifact:
        """Quantize the newest model and write it as model.int8.onnx."""
        job = ctx.job
        assert ctx.calibration is not None  # the job model requires calibration data when enabled
        options = job.quantize
        activation_type = resolve_activation_type(job, ctx.targets)
        symmetric = options.activation_symmetric or any(
            t.backend.capabilities.quantization.symmetric_activations for t in ctx.targets
        )
        parent = ctx.latest_model()
        source = ctx.workdir / parent.path
        reader = FeedReader(ctx.calibration)
        target = ctx.workdir / INT8_MODEL
        # ORT names external data after its output file: write under the final name, move in whole.
        external = bool(parent.external_data)
        try:
            with staged_files(target) as path:
                _quantize(source, path, reader, options, activation_type, symmetric, external)
        except JobError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types
            raise StageError(self.name, job.name, f"ONNX Runtime's quantizer failed: {type(e).__name__}: {e}") from e
        counts = _qdq_counts(target)
        logger.info("quantize %s: %s", job.name, counts)
        return model_artifact(
            self.name,
            target,
            parent,
            {
                "format": "QDQ",
                "calibration_method": options.calibration_method,
                "calibration_batches": reader.batches_read,
                "activation_type": activation_type,
                "activation_symmetric": symmetric,
                "weight_type": options.weight_type,
                "per_channel": options.per_channel,
                "op_types": options.op_types or "onnxruntime defaults",
                "excluded_nodes": list(options.exclude_nodes),
                **counts,
            },
        )


def resolve_activation_type(job: ConversionJob, targets: list[Target]) -> str:
    """The job's activation type, checked against (or, when unset, chosen for) every target.

    Raises:
        JobError: A target cannot run the activation type the job asks for.
    """
    accepted = [(t.name, t.backend.capabilities.quantization.activation_types) for t in targets]
    requested = job.quantize.activation_type
    if requested is None:
        return "uint8" if all("uint8" in types for _, types in accepted) else "int8"
    for name, types in accepted:
        if requested not in types:
            raise JobError(
                job.origin,
                "quantize.activation_type",
                f"target {name!r} runs int8 activations as {list(types)}, not {requested}",
            )
    return requested


def _quantize(
    source: Path,
    output: Path,
    reader: FeedReader,
    options: QuantizeOptions,
    activation_type: str,
    symmetric: bool,
    external_data: bool,
) -> None:
    quantize_static(
        model_input=source,
        model_output=output,
        calibration_data_reader=reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=options.op_types,
        per_channel=options.per_channel,
        activation_type=_QUANT_TYPES[activation_type],
        weight_type=_QUANT_TYPES[options.weight_type],
        nodes_to_exclude=options.exclude_nodes or None,
        calibrate_method=_CALIBRATION_METHODS[options.calibration_method],
        use_external_data_format=external_data,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )


def _qdq_counts(path: Path) -> dict[str, int]:
    graph = load_graph_only(path).graph
    ops = [node.op_type for node in graph.node]
    return {
        "nodes": len(ops),
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
    }
