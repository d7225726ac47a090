"""The export stage's path for a causal LM: the decoder with its KV cache, checked against PyTorch
at several (batch, sequence, past) sizes before the next stage sees it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.artifacts import Artifact
from pipeline.errors import StageError
from pipeline.job import ConversionJob
from pipeline.llm.export import ExportResult, export_decoder
from pipeline.llm.export_parity import DEFAULT_PARITY_SIZES, ReferenceStep, check_decoder_parity, decoder_references
from pipeline.llm.signature import DecoderSignature
from pipeline.onnx_io import load_graph_only, model_artifact
from pipeline.records import ExportRecord, StageName

# The trace's example: sizes >= 2, all different (torch.export specialises 0 / 1 and merges equal sizes).
EXAMPLE_BATCH, EXAMPLE_SEQUENCE = 2, 3


@dataclass(frozen=True)
class ExportedDecoder:
    """A written decoder export and PyTorch's outputs at the parity sizes, still to be checked."""

    result: ExportResult
    signature: DecoderSignature
    references: list[ReferenceStep]


def export_causal_lm(
    job: ConversionJob, model: torch.nn.Module, target: Path, verify: Callable[[Path], None]
) -> ExportedDecoder:
    """Export `model` with its KV cache to `target` and run PyTorch at the parity sizes; nothing
    after this needs the PyTorch model (`check_exported_decoder` runs ONNX Runtime).

    Raises:
        JobError: The model is not a decoder the export takes.
        StageError: The exporter failed.
    """
    signature = DecoderSignature.from_config(model.config)
    result = export_decoder(
        model,
        signature,
        EXAMPLE_BATCH,
        EXAMPLE_SEQUENCE,
        target,
        job.export.external_data_threshold_bytes,
        job=job.name,
        opset=job.export.opset_for(decoder=True),
        ir_version=job.export.ir_version,
        verify=verify,
    )
    clock = time.perf_counter()
    references = decoder_references(model, signature, list(DEFAULT_PARITY_SIZES))
    seconds = {**result.seconds, "decoder_parity": time.perf_counter() - clock}
    return ExportedDecoder(result=replace(result, seconds=seconds), signature=signature, references=references)


def check_exported_decoder(job: ConversionJob, exported: ExportedDecoder) -> Artifact:
    """Check the export against PyTorch's outputs at every parity size, and describe it.

    Raises:
        StageError: ONNX Runtime and PyTorch disagree at some size, or ONNX Runtime fails.
    """
    result = exported.result
    clock = time.perf_counter()
    parity = check_decoder_parity(exported.references, result.path, exported.signature, job=job.name)
    failed = [size for size in parity if not size.passed()]
    if failed:
        sizes = ", ".join(
            f"(batch {p.batch}, sequence {p.sequence}, past {p.past}): max error {p.max_abs_error:.3g}, "
            f"cosine {p.min_cosine:.6f}"
            for p in failed
        )
        raise StageError(StageName.EXPORT, job.name, f"the KV-cache export disagrees with PyTorch at {sizes}")
    proto = load_graph_only(result.path)
    seconds = dict(result.seconds)
    seconds["decoder_parity"] += time.perf_counter() - clock
    record = ExportRecord(
        exporter="dynamo",
        opset=result.opset,
        ir_version=proto.ir_version,
        external_data=result.external_data,
        nodes=len(proto.graph.node),
        inputs=result.inputs,
        outputs=result.outputs,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        decoder_parity=parity,
        decoder_kernels=result.kernels.describe(),
        decoder_max_positions=exported.signature.max_positions,
    )
    return model_artifact(StageName.EXPORT, result.path, None, record)
