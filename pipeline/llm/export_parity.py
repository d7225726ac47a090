"""Export parity of a decoder with a KV cache: ONNX Runtime against PyTorch, logits and presents,
at (batch, sequence, past) sizes, the first step (past 0) and single-token steps included.

The past caches are realistic: PyTorch's presents after a random prefix of `past` tokens, fed to
both models. With more than one row, the last row is left-padded (as a batch of prompts of unequal
length is), so the graph is seen to honour ``attention_mask`` rather than a causal mask fixed at
export; padded positions hold values no real token reads and are not compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.errors import StageError, first_line
from pipeline.llm.export import DecoderWithCache
from pipeline.llm.export_records import SizeParity, TensorParity
from pipeline.llm.signature import DecoderSignature
from pipeline.threads import session_options

logger = logging.getLogger(__name__)

# (batch, sequence, past): prompts with no past, single-token decode steps, a chunk after a past.
DEFAULT_PARITY_SIZES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (2, 7, 0), (1, 1, 9), (3, 4, 5), (2, 1, 6))
# The stage whose errors these are (`pipeline.records.StageName.EXPORT`; not imported, so that the
# records module may import this package's records without a cycle).
_STAGE = "export"


@dataclass(frozen=True)
class ReferenceStep:
    """One parity size as PyTorch ran it: the step's feeds (after a random prefix), the whole
    attention mask and PyTorch's outputs by name."""

    size: tuple[int, int, int]
    feeds: dict[str, np.ndarray]
    mask: np.ndarray
    outputs: dict[str, np.ndarray]


def decoder_references(
    model: torch.nn.Module, signature: DecoderSignature, sizes: list[tuple[int, int, int]], seed: int = 0
) -> list[ReferenceStep]:
    """PyTorch's outputs at each (batch, sequence, past) size, on random tokens: all of PyTorch's
    part of the check, so that its model can be released before ONNX Runtime loads the export."""
    wrapper = DecoderWithCache(model, signature).eval()
    rng = np.random.default_rng(seed)
    steps = []
    for size in sizes:
        feeds, mask = step_feeds(wrapper, size, rng)
        steps.append(ReferenceStep(size=size, feeds=feeds, mask=mask, outputs=wrapper.run(feeds)))
    return steps


def check_decoder_parity(
    references: list[ReferenceStep], onnx_path: Path, signature: DecoderSignature, *, job: str
) -> list[SizeParity]:
    """Run the exported decoder on PyTorch's steps (`decoder_references`) and compare every output.

    Args:
        references: PyTorch's steps.
        onnx_path: The exported .onnx file.
        signature: Its signature.
        job: The job's name, for errors.

    Returns:
        One record per size, in order (judge them with `SizeParity.passed`).

    Raises:
        StageError: ONNX Runtime cannot load or run the file at a size.
    """
    try:
        session = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's errors have no common type
        raise StageError(_STAGE, job, f"ONNX Runtime cannot load the decoder: {first_line(e)}") from e
    results = []
    for step in references:
        result = _size_parity(step, session, signature, job)
        batch, sequence, past = step.size
        logger.info(
            "decoder parity at batch %d, sequence %d, past %d: max |error| %.3g, min cosine %.6f",
            batch,
            sequence,
            past,
            result.max_abs_error,
            result.min_cosine,
        )
        results.append(result)
    return results


def left_padding(batch: int, sequence: int, past: int) -> int:
    """Masked positions at the start of the last row: about half of it, leaving at least one real
    token in the prefix (or, with no past, in the step), so no step has a fully masked row."""
    if batch < 2:
        return 0
    return max(0, min((past + sequence) // 2, (past or sequence) - 1))


def step_feeds(
    wrapper: DecoderWithCache, size: tuple[int, int, int], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The feeds of a step at `size` after PyTorch ran a random prefix, and the whole mask."""
    batch, sequence, past = size
    signature = wrapper.signature
    mask = np.ones((batch, past + sequence), dtype=np.int64)
    mask[-1, : left_padding(batch, sequence, past)] = 0
    cache = None
    if past > 0:
        prefix = rng.integers(0, signature.vocab, (batch, past))
        cache = signature.next_past(wrapper.run(signature.step_feeds(prefix, mask[:, :past])))
    tokens = rng.integers(0, signature.vocab, (batch, sequence))
    return signature.step_feeds(tokens, mask, cache), mask


def _size_parity(
    step: ReferenceStep, session: ort.InferenceSession, signature: DecoderSignature, job: str
) -> SizeParity:
    batch, sequence, past = step.size
    reference, mask = step.outputs, step.mask
    try:
        produced = dict(zip(signature.output_names(), session.run(None, step.feeds), strict=True))
    except Exception as e:  # ONNX Runtime's errors have no common type
        raise StageError(
            _STAGE,
            job,
            f"ONNX Runtime failed on the decoder at batch {batch}, sequence {sequence}, past {past}: {first_line(e)}",
        ) from e
    attended = mask.astype(bool)
    new = attended[:, -sequence:]
    presents = [
        _tensor_parity(name, _positions(reference[name], attended), _positions(produced[name], attended))
        for name in signature.present_names()
    ]
    return SizeParity(
        batch=batch,
        sequence=sequence,
        past=past,
        left_padding=left_padding(batch, sequence, past),
        logits=_tensor_parity("logits", reference["logits"][new], produced["logits"][new]),
        presents=presents,
    )


def _positions(cache: np.ndarray, attended: np.ndarray) -> np.ndarray:
    """A [batch, heads, length, head_dim] cache at the attended (batch, length) positions."""
    return np.moveaxis(cache, 2, 1)[attended]


def _tensor_parity(name: str, reference: np.ndarray, candidate: np.ndarray) -> TensorParity:
    if reference.shape != candidate.shape:
        return TensorParity(name=name, elements=int(reference.size), max_abs_error=float("inf"), cosine=0.0)
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(got).all())
    error = float(np.max(np.abs(got - ref))) if finite and ref.size else (0.0 if finite else float("inf"))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    if not finite:
        cosine = 0.0
    elif norms == 0.0:
        cosine = 1.0 if not ref.any() and not got.any() else 0.0
    else:
        cosine = float(np.dot(ref, got) / norms)
    return TensorParity(name=name, elements=int(ref.size), max_abs_error=error, cosine=cosine)
