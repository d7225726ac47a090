"""Greedy decoding, perplexity and decode speed of a causal LM, at batch 1.

Two decoders with one interface (`Decoder`): `OnnxDecoder` drives an exported decoder through its
KV cache (`DecoderSignature.step_feeds` / `next_past`: the prompt is prefilled with an empty past,
then one token per step), on any session with ``run(feeds) -> dict`` (an onnxforge backend
session, or an ONNX Runtime ``InferenceSession``, wrapped); `TorchDecoder` does the same with a
PyTorch `transformers` causal LM and its own cache. On top of either:

- `greedy`: the prompt's next `new_tokens` most likely tokens (argmax, ties to the lowest id,
  taken in NumPy for both decoders so they break ties alike; no stop at an end-of-sequence token)
  with the logits of every step.
- `forced_logits`: the logits of every step along a given token path (teacher-forced), from one
  run over the whole sequence without a cache.
- `perplexity`: exp of the mean next-token negative log-likelihood over held-out rows, each row
  one run without a cache (rows are independent chunks: no context carries from one to the next).
- `decode_speed`: time to first token (the prompt's prefill) and decode tokens / s over
  `new_tokens` decode steps after it, each the median of timed runs after warm-up
  (`pipeline.timing.measure_latency_ms`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel

from backends.errors import ExitCode, OnnxforgeError
from backends.ort import OrtSession
from pipeline.llm.signature import DecoderSignature
from pipeline.timing import DEFAULT_TIMING, TimingSettings, measure_latency_ms, significant

logger = logging.getLogger(__name__)

#: (prefill, decode): what `decode_speed` times (`speed_runs`).
SpeedRuns = tuple[Callable[[], object], Callable[[], None]]


class GenerationError(OnnxforgeError):
    """A decoder or the tokens given to it do not fit generation: a model without the signature's
    outputs, logits of the wrong shape, an empty prompt or a held-out row too short to predict."""

    exit_code = ExitCode.BAD_INPUT


class FeedRunner(Protocol):
    """What a decoder session must offer: one run of named feeds, every output by name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Run one batch."""
        ...


class Decoder(Protocol):
    """One sequence at batch 1: prefill a prompt, append tokens one by one, rewind."""

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Start a new sequence with `prompt` (1-D token ids); the next token's logits [vocab]."""
        ...

    def step(self, token: int) -> np.ndarray:
        """Append one token to the sequence; the next token's logits [vocab]."""
        ...

    def rewind(self, length: int) -> None:
        """Keep only the sequence's first `length` tokens (and their cache)."""
        ...

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [tokens, vocab] of a whole sequence in one run without a cache (the sequence
        state is left as it was)."""
        ...


@dataclass(frozen=True)
class Generation:
    """A greedy continuation of one prompt.

    Attributes:
        prompt: The prompt's token ids (int64, 1-D).
        tokens: The new tokens (int64, [new tokens]); ``tokens[i]`` is the argmax of ``logits[i]``.
        logits: Each step's next-token logits (float32, [new tokens, vocab]).
    """

    prompt: np.ndarray
    tokens: np.ndarray
    logits: np.ndarray


class Perplexity(BaseModel):
    """Perplexity on held-out rows.

    Attributes:
        value: exp(mean negative log-likelihood of each predicted token).
        nll: The mean negative log-likelihood, in nats per token.
        rows: Rows (independent chunks) scored.
        tokens: Tokens predicted (each row's length minus its first token).
    """

    value: float
    nll: float
    rows: int
    tokens: int


class DecodeSpeed(BaseModel):
    """Decode speed at batch 1 (medians of timed runs after warm-up; informational, noisy).

    Attributes:
        prompt_tokens: Length of the prompt timed.
        new_tokens: Decode steps timed after the prompt's prefill.
        ttft_ms: Time to first token: the prompt's prefill, in milliseconds.
        decode_ms_per_token: One decode step with the cache, in milliseconds.
        tokens_per_s: Decode throughput, tokens per second (1000 / decode_ms_per_token).
    """

    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    decode_ms_per_token: float
    tokens_per_s: float


def as_runner(session: FeedRunner | ort.InferenceSession) -> FeedRunner:
    """A session as a `FeedRunner`: an ONNX Runtime ``InferenceSession`` wrapped (its ``run`` takes
    output names first); anything with ``run(feeds) -> dict`` as it is."""
    if isinstance(session, ort.InferenceSession):
        return OrtSession(session)
    return session


def _prompt(prompt: np.ndarray) -> np.ndarray:
    ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise GenerationError("a prompt needs at least one token")
    return ids


def _session_past_dtype(runner: FeedRunner, signature: DecoderSignature) -> type[np.floating]:
    """The past caches' element type as the session declares it (`SessionBase.inputs`), else float32."""
    declared = {spec.name: spec.dtype for spec in getattr(runner, "inputs", [])}
    dtype = declared.get(signature.past_names()[0]) if signature.layers else None
    return dtype.type if dtype is not None and np.issubdtype(dtype, np.floating) else np.float32


class OnnxDecoder:
    """An exported decoder with a KV cache (the `DecoderSignature` contract), one sequence at batch 1.

    Args:
        session: The open model (`as_runner` wraps an ONNX Runtime session).
        signature: The model's cache geometry and input / output names.
        past_dtype: Element type of the past caches (None: the session's, where it says, else float32).
    """

    def __init__(
        self,
        session: FeedRunner | ort.InferenceSession,
        signature: DecoderSignature,
        past_dtype: type[np.floating] | None = None,
    ) -> None:
        self._runner = as_runner(session)
        self.signature = signature
        self._past_dtype = past_dtype or _session_past_dtype(self._runner, signature)
        self._past: dict[str, np.ndarray] = {}
        self._length = 0

    def _run(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
        batch, sequence = input_ids.shape
        before = 0 if past is None else next(iter(past.values())).shape[2]
        mask = np.ones((batch, before + sequence), dtype=np.int64)
        empty = self.signature.empty_past(batch, self._past_dtype) if past is None else past
        outputs = self._runner.run(self.signature.step_feeds(input_ids, mask, empty))
        logits = outputs.get("logits")
        if logits is None or logits.shape != (batch, sequence, self.signature.vocab):
            shape = None if logits is None else tuple(logits.shape)
            raise GenerationError(
                f"the decoder's logits are {shape}, expected {(batch, sequence, self.signature.vocab)}"
                " ([batch, sequence, vocab])"
            )
        return outputs

    def _advance(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None) -> np.ndarray:
        outputs = self._run(input_ids, past)
        try:
            self._past = self.signature.next_past(dict(outputs))
        except KeyError as e:
            raise GenerationError(f"the decoder has no output {e.args[0]!r} (the signature's present caches)") from e
        self._length = (0 if past is None else self._length) + input_ids.shape[1]
        return np.asarray(outputs["logits"][0, -1], dtype=np.float32)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Start a new sequence with `prompt` (past of length 0); the next token's logits."""
        return self._advance(_prompt(prompt)[None, :], None)

    def step(self, token: int) -> np.ndarray:
        """Append one token, with the cache; the next token's logits."""
        if not self._past:
            raise GenerationError("step before prefill: no sequence has been started")
        return self._advance(np.array([[token]], dtype=np.int64), self._past)

    def rewind(self, length: int) -> None:
        """Keep the first `length` tokens' caches."""
        if not 0 < length <= self._length:
            raise GenerationError(f"cannot rewind a sequence of {self._length} tokens to {length}")
        self._past = {name: np.ascontiguousarray(value[:, :, :length]) for name, value in self._past.items()}
        self._length = length

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [tokens, vocab] of a whole sequence, one run with an empty past."""
        outputs = self._run(_prompt(tokens)[None, :], None)
        return np.asarray(outputs["logits"][0], dtype=np.float32)


class TorchDecoder:
    """A PyTorch `transformers` causal LM with its own cache, one sequence at batch 1.

    Args:
        model: The model (put in eval mode); it runs under ``torch.inference_mode``.
    """

    def __init__(self, model: Any) -> None:
        import torch

        self._torch = torch
        self._model = model.eval()
        # transformers 5 names the cache argument `cache` (`past_key_values` is deprecated there).
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._cache: Any = None
        self._length = 0

    def _forward(self, tokens: np.ndarray, cache: Any, use_cache: bool) -> Any:
        torch = self._torch
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))[None, :]
        before = self._length if cache is not None else 0
        mask = torch.ones((1, before + ids.shape[1]), dtype=torch.int64)
        arguments = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache}
        if cache is not None:
            arguments[self._cache_argument] = cache
        with torch.inference_mode():
            return self._model(**arguments)

    def _advance(self, tokens: np.ndarray, cache: Any) -> np.ndarray:
        output = self._forward(tokens, cache, use_cache=True)
        found = output.get("cache")
        self._cache = found if found is not None else output.get("past_key_values")
        self._length = (self._length if cache is not None else 0) + len(tokens)
        return output.logits[0, -1].float().numpy()

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Start a new sequence with `prompt` (a fresh cache); the next token's logits."""
        return self._advance(_prompt(prompt), None)

    def step(self, token: int) -> np.ndarray:
        """Append one token, with the cache; the next token's logits."""
        if self._cache is None:
            raise GenerationError("step before prefill: no sequence has been started")
        return self._advance(np.array([token], dtype=np.int64), self._cache)

    def rewind(self, length: int) -> None:
        """Keep the first `length` tokens of the cache (a negative crop: the form transformers 4 and 5 share)."""
        if not 0 < length <= self._length:
            raise GenerationError(f"cannot rewind a sequence of {self._length} tokens to {length}")
        if length < self._length:
            self._cache.crop(length - self._length)
        self._length = length

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [tokens, vocab] of a whole sequence, one run without a cache."""
        return self._forward(_prompt(tokens), None, use_cache=False).logits[0].float().numpy()


def greedy(decoder: Decoder, prompt: np.ndarray, new_tokens: int) -> Generation:
    """The prompt's greedy continuation: prefill, then one token per step with the cache.

    Args:
        decoder: The model.
        prompt: Token ids (1-D).
        new_tokens: Tokens to generate (at least 1).
    """
    if new_tokens < 1:
        raise GenerationError(f"new_tokens must be at least 1, got {new_tokens}")
    ids = _prompt(prompt)
    steps = [decoder.prefill(ids)]
    tokens = [int(np.argmax(steps[0]))]
    while len(tokens) < new_tokens:
        steps.append(decoder.step(tokens[-1]))
        tokens.append(int(np.argmax(steps[-1])))
    return Generation(prompt=ids, tokens=np.array(tokens, dtype=np.int64), logits=np.stack(steps))


def forced_logits(decoder: Decoder, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each step's next-token logits [len(tokens), vocab] along a given path (teacher-forced):
    step i sees the prompt and ``tokens[:i]``. One run over the prompt and ``tokens[:-1]``."""
    ids = _prompt(prompt)
    path = np.concatenate([ids, np.asarray(tokens, dtype=np.int64)[:-1]])
    return decoder.logits(path)[len(ids) - 1 :]


def _row_nll(logits: np.ndarray, row: np.ndarray) -> float:
    """Summed negative log-likelihood of ``row[1:]`` under ``logits[:-1]`` (float64 log-softmax)."""
    scores = logits[:-1].astype(np.float64)
    top = scores.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    return float((log_norm - scores[np.arange(len(row) - 1), row[1:]]).sum())


def perplexity(decoder: Decoder, rows: Sequence[np.ndarray]) -> Perplexity:
    """Perplexity on held-out rows, each one run without a cache; every token after a row's first
    is predicted from the tokens before it in that row.

    Args:
        decoder: The model.
        rows: Token ids, one 1-D array per independent chunk (at least 2 tokens each).
    """
    if not rows:
        raise GenerationError("perplexity needs at least one held-out row")
    total, count = 0.0, 0
    for index, row in enumerate(rows):
        ids = _prompt(row)
        if ids.size < 2:
            raise GenerationError(f"held-out row {index} has {ids.size} token; perplexity needs at least 2")
        total += _row_nll(decoder.logits(ids), ids)
        count += ids.size - 1
    nll = total / count
    return Perplexity(value=significant(float(np.exp(nll)), 7), nll=significant(nll, 7), rows=len(rows), tokens=count)


def speed_runs(
    decoder: Decoder, prompt: np.ndarray, new_tokens: int
) -> tuple[Callable[[], object], Callable[[], None]]:
    """What decode speed times, as two callables: the prompt's prefill, and a rewind to the
    prefilled prompt followed by `new_tokens` greedy steps with the cache (the prompt is prefilled
    once here, for the first token)."""
    ids = _prompt(prompt)
    first = int(np.argmax(decoder.prefill(ids)))

    def decode() -> None:
        decoder.rewind(len(ids))
        token = first
        for _ in range(new_tokens):
            token = int(np.argmax(decoder.step(token)))

    return (lambda: decoder.prefill(ids)), decode


def decode_speed(
    decoder: Decoder, prompt: np.ndarray, new_tokens: int, settings: TimingSettings = DEFAULT_TIMING
) -> DecodeSpeed:
    """Time to first token and decode tokens / s at batch 1.

    TTFT is the prompt's prefill; a decode run rewinds to the prefilled prompt and takes
    `new_tokens` greedy steps with the cache. Each is the median of `settings.min_rounds` timed
    runs after `settings.warmup` untimed ones (`measure_latency_ms`).

    Args:
        decoder: The model.
        prompt: Token ids (1-D).
        new_tokens: Decode steps per timed run (at least 1).
        settings: How to time.
    """
    if new_tokens < 1:
        raise GenerationError(f"new_tokens must be at least 1, got {new_tokens}")
    ids = _prompt(prompt)
    prefill, decode = speed_runs(decoder, ids, new_tokens)
    ttft_ms = measure_latency_ms(prefill, settings)
    per_token = measure_latency_ms(decode, settings) / new_tokens
    speed = DecodeSpeed(
        prompt_tokens=len(ids),
        new_tokens=new_tokens,
        ttft_ms=ttft_ms,
        decode_ms_per_token=significant(per_token),
        tokens_per_s=significant(1000.0 / per_token),
    )
    logger.debug("decode speed: TTFT %.3g ms, %.4g tokens/s", speed.ttft_ms, speed.tokens_per_s)
    return speed
