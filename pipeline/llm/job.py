"""A causal-LM job as the stages see it: the decoder's graph inputs and outputs (its KV cache
included) in place of the two the data carries, and data completed into decoder feeds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.errors import JobError
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, InputSpec
from pipeline.llm.signature import DecoderSignature
from pipeline.model_source import SourceModel

CAUSAL_LM = "causal-lm"
DATA_INPUTS = ("input_ids", "attention_mask")
_INTEGER_INPUTS = {"input_ids", "attention_mask", "position_ids"}


def is_causal_lm(job: ConversionJob) -> bool:
    """Whether the job converts a decoder with its KV cache."""
    return job.model.task == CAUSAL_LM


def decoder_signature(job: ConversionJob, source: SourceModel) -> DecoderSignature:
    """The decoder's signature from its `transformers` config.

    Raises:
        JobError: The source is not a PyTorch module with a causal-LM config, or the job's data
            inputs are not ``input_ids`` and ``attention_mask``.
    """
    names = [spec.name for spec in job.inputs]
    if tuple(names) != DATA_INPUTS:
        raise JobError(
            job.origin,
            "inputs",
            f"a causal-lm job's [[inputs]] are the data's: input_ids and attention_mask [batch, sequence], got {names}",
        )
    config = getattr(source.module, "config", None)
    if source.module is None or config is None:
        raise JobError(
            job.origin,
            "model.task",
            "causal-lm needs a transformers causal LM from model.factory (its config gives the KV cache's shape); "
            "an ONNX file or ExportedProgram source cannot be exported with a cache here",
        )
    try:
        return DecoderSignature.from_config(config)
    except (AttributeError, TypeError, ValueError) as e:
        raise JobError(job.origin, "model.factory", f"its config is not a causal LM's: {e}") from e


def decoder_job(job: ConversionJob, signature: DecoderSignature) -> ConversionJob:
    """The job with the decoder's graph inputs (its cache as float32 inputs) and output names."""
    from pipeline.llm.export import input_shapes

    inputs = [
        InputSpec(name=name, shape=shape, dtype="int64" if name in _INTEGER_INPUTS else "float32")
        for name, shape in input_shapes(signature).items()
    ]
    model = job.model.model_copy(update={"output_names": signature.output_names()})
    return job.model_copy(update={"inputs": inputs, "model": model})


def complete_feeds(signature: DecoderSignature) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A batch of the data (``input_ids``, ``attention_mask``) -> the decoder's first-step feeds."""

    def complete(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return signature.step_feeds(feeds["input_ids"], feeds["attention_mask"])

    return complete


def prepare_decoder_data(signature: DecoderSignature, *sources: FeedSource | None) -> None:
    """Complete every batch of the data sources into decoder feeds (position ids, empty caches)."""
    for source in sources:
        if source is not None:
            source.extend_feeds(complete_feeds(signature))


def without_padding(feeds: dict[str, np.ndarray], names: list[str], values: list[np.ndarray]) -> list[np.ndarray]:
    """A decoder's outputs with padded positions set to 0: what a model computes for a masked
    position means nothing, and two correct models may compute it differently.

    Args:
        feeds: The step's feeds (its ``attention_mask`` covers past and new tokens).
        names: The output names (``logits``, ``present.*``).
        values: The outputs, in `names` order.
    """
    mask = feeds["attention_mask"].astype(bool)
    cleaned = []
    for name, value in zip(names, values, strict=True):
        if name == "logits" and value.ndim == 3:
            value = np.where(mask[:, -value.shape[1] :, None], value, 0)
        elif name.startswith("present.") and value.ndim == 4:
            value = np.where(mask[:, None, -value.shape[2] :, None], value, 0)
        cleaned.append(value)
    return cleaned
