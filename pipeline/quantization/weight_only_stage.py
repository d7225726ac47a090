"""The quantize stage's weight-only path: a language model's MatMul weights block-wise to 4 or 8 bits
(`pipeline.quantization.weight_only`), with mixed precision against the job's int8 policy on the
logits, written as ``model.int4.onnx`` / ``model.int8.onnx``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipeline.errors import JobError
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, WeightOnlyOptions
from pipeline.quantization.candidates import has_checks
from pipeline.quantization.weight_only import WeightOnlyResult, WeightOnlySettings, quantize_weight_only
from pipeline.quantization.weight_only_mixed import (
    LogitPolicy,
    MixedSettings,
    MixedWeightOnlyResult,
    quantize_weight_only_mixed,
)
from pipeline.records import WeightOnlyRecord

logger = logging.getLogger(__name__)

_FORMATS: dict[str, Literal["MatMulNBits", "QDQ blocked"]] = {"matmulnbits": "MatMulNBits", "qdq": "QDQ blocked"}


def weight_only_file(options: WeightOnlyOptions) -> str:
    """The quantized model's file name: ``model.int4.onnx`` or ``model.int8.onnx``."""
    return f"model.int{options.bits}.onnx"


def settings_of(options: WeightOnlyOptions, targets: list[str]) -> WeightOnlySettings:
    """The job's weight-only options as the quantizer's settings (`targets`: the job's backends)."""
    level = options.accuracy_level
    if level is None:  # int8 activations in MatMulNBits: about 2x the decode speed on CPU
        level = 4 if set(targets) == {"cpu"} else 0
    return WeightOnlySettings(
        bits=options.bits,
        block_size=options.block_size,
        symmetric=options.symmetric,
        method=options.method,
        quantize_embeddings=options.embeddings,
        quantize_lm_head=options.lm_head,
        format=options.format,
        accuracy_level=level,
    )


def quantize_weights(
    job: ConversionJob, source: Path, target: Path, calibration: FeedSource | None
) -> WeightOnlyRecord:
    """Quantize `source`'s weights into `target`; with mixed precision (the job's default) the most
    damaging MatMuls move to `fallback_bits` until the int8 policy's cosine holds on the logits of
    held-out calibration batches.

    Raises:
        JobError: Settings without a kernel, or gptq / mixed precision without calibration data.
    """
    options = job.quantize.weight_only
    assert options is not None
    settings = settings_of(options, [target.backend for target in job.targets])
    feeds = [batch.feeds for batch in calibration] if calibration is not None else []
    keep = set(job.quantize.exclude_nodes)
    threshold = job.export.external_data_threshold_bytes
    policy = job.parity.int8
    aims = (has_checks(policy) and policy.min_cosine is not None) or options.max_kl is not None
    if job.quantize.mixed_precision and aims:
        if not feeds:
            raise JobError(
                job.origin, "calibration", "weight-only mixed precision judges on calibration data: give some"
            )
        mixed = MixedSettings(
            policy=LogitPolicy(min_cosine=policy.min_cosine or 0.0, max_kl=options.max_kl),
            fallback_bits=options.fallback_bits,
            max_share=job.quantize.max_float_share,
        )
        found = quantize_weight_only_mixed(source, target, settings, feeds, mixed, keep, threshold)
        return _record(options, found.result, found)
    result = quantize_weight_only(source, target, settings, feeds or None, keep, threshold)
    return _record(options, result, None)


def _record(
    options: WeightOnlyOptions, result: WeightOnlyResult, mixed: MixedWeightOnlyResult | None
) -> WeightOnlyRecord:
    kept = dict(result.kept)
    if mixed is not None and mixed.fallback_bits == 0:
        kept.update(mixed.wider)
    return WeightOnlyRecord(
        format=_FORMATS[options.format],
        weight_bits=options.bits,
        block_size=options.block_size,
        symmetric=options.symmetric,
        method=options.method,
        quantized=dict(result.quantized),
        kept_float=kept,
        wider=dict(mixed.wider) if mixed is not None and mixed.fallback_bits else {},
        lm_head=result.lm_head,
        embeddings_quantized=sorted(result.embeddings),
        policy_met=mixed.met if mixed is not None else None,
        judged=mixed.figures.summary() if mixed is not None and mixed.figures is not None else None,
        bytes_before=result.bytes_before,
        bytes_after=result.bytes_after,
        seconds=round(result.seconds, 3),
    )
