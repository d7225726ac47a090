"""Mixed precision for weight-only quantization: keep the most damaging MatMuls wider (int8 or float)
until the logits meet a policy, as the static int8 search does (`mixed_precision.search`:
nothing wider first, then doubling, then bisection along a ranking).

Judging: the quantized model's logits against the float model's on calibration batches held
out from calibration (every fourth, `judge.is_held_out`), per real token (``attention_mask``):
mean cosine, mean KL divergence ``KL(float || quantized)`` in nats, and top-1 agreement.

Ranking, two ways (`rank_layers`):

- ``damage`` (default): each MatMul quantized alone, the rest float, judged on the first
  held-out batch: 1 - cosine of the logits. One model written and run per MatMul: it measures
  how far a layer's error travels, which the proxy cannot.
- ``proxy``: the layer's own relative output error, ``sum_k E[x_k^2] |dW_k|^2 / sum_k E[x_k^2]
  |W_k|^2`` (weight error weighted by its input channel's activation energy, AWQ-style), from
  one calibration pass; for models where a model per MatMul costs too much.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from pipeline.errors import JobError, StageError
from pipeline.onnx_io import external_data_name
from pipeline.quantization.judge import JUDGE_MARGIN, is_held_out
from pipeline.quantization.mixed_precision import Candidate, Probe, SearchResult, rank_by_damage, search
from pipeline.quantization.weight_only import WeightOnlyQuantizer, WeightOnlyResult, WeightOnlySettings
from pipeline.threads import session_options

logger = logging.getLogger(__name__)

Ranking = Literal["damage", "proxy"]
# ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations
# (accuracy level 4) unless told otherwise: the judge runs what the file says.
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}


@dataclass(frozen=True)
class LogitPolicy:
    """What the quantized model's logits must keep of the float model's, per real token.

    Attributes:
        min_cosine: Mean cosine at least this.
        max_kl: Mean ``KL(float || quantized)`` in nats at most this (None: not checked).
        min_top1: Share of tokens with the same argmax at least this (None: not checked).
    """

    min_cosine: float = 0.99
    max_kl: float | None = None
    min_top1: float | None = None

    def tightened(self, margin: float = JUDGE_MARGIN) -> LogitPolicy:
        """Each limit moved `margin` of its distance toward perfect (what the search aims at:
        a few held-out batches estimate the evaluation figures with sampling error)."""
        return LogitPolicy(
            min_cosine=1.0 - (1.0 - margin) * (1.0 - self.min_cosine),
            max_kl=None if self.max_kl is None else (1.0 - margin) * self.max_kl,
            min_top1=None if self.min_top1 is None else 1.0 - (1.0 - margin) * (1.0 - self.min_top1),
        )


@dataclass(frozen=True)
class LogitFigures:
    """Logits of a model against the float model's.

    Attributes:
        cosine: Mean per-token cosine.
        kl: Mean per-token ``KL(float || quantized)``, nats.
        top1: Share of tokens whose argmax agrees.
        tokens: Tokens compared.
    """

    cosine: float
    kl: float
    top1: float
    tokens: int

    def meets(self, policy: LogitPolicy) -> bool:
        """Whether every check of the policy passes."""
        return (
            self.cosine >= policy.min_cosine
            and (policy.max_kl is None or self.kl <= policy.max_kl)
            and (policy.min_top1 is None or self.top1 >= policy.min_top1)
        )

    def summary(self) -> str:
        """One line: cosine, KL, top-1."""
        return f"cosine {self.cosine:.5f}, KL {self.kl:.2e}, top-1 {self.top1:.4f} ({self.tokens} tokens)"


class LogitJudge:
    """Compares models' logits with a reference model's on fixed feeds.

    Args:
        reference: The float model.
        feeds: Decoder feeds (first step).
        output: The logits output's name.
        config: Session config entries for both models (`EXACT_QDQ` by default).
    """

    def __init__(
        self,
        reference: Path,
        feeds: Sequence[Mapping[str, np.ndarray]],
        output: str = "logits",
        config: Mapping[str, str] = EXACT_QDQ,
    ) -> None:
        self._feeds = list(feeds)
        self._output = output
        self._config = dict(config)
        self._references = self._run(reference, len(self._feeds))

    def figures(self, model: Path, batches: int | None = None) -> LogitFigures:
        """The model's figures on the first `batches` feeds (None: all)."""
        count = len(self._feeds) if batches is None else batches
        outputs = self._run(model, count)
        rows = [
            _token_figures(reference, output, _mask(feed, reference))
            for reference, output, feed in zip(self._references[:count], outputs, self._feeds[:count], strict=True)
        ]
        tokens = sum(row[3] for row in rows)
        weights = [row[3] / max(tokens, 1) for row in rows]
        cosine, kl, top1 = (float(sum(row[i] * w for row, w in zip(rows, weights, strict=True))) for i in range(3))
        return LogitFigures(cosine, kl, top1, tokens)

    def _run(self, model: Path, count: int) -> list[np.ndarray]:
        options = session_options()
        for key, value in self._config.items():
            options.add_session_config_entry(key, value)
        try:
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            names = {item.name for item in session.get_inputs()}
            return [
                session.run([self._output], {k: v for k, v in feed.items() if k in names})[0]
                for feed in self._feeds[:count]
            ]
        except Exception as e:  # ONNX Runtime raises its own types
            raise StageError("quantize", "", f"cannot run {model.name} to judge its logits: {e}") from e


def _mask(feed: Mapping[str, np.ndarray], logits: np.ndarray) -> np.ndarray:
    mask = feed.get("attention_mask")
    if mask is not None and mask.shape == logits.shape[:2]:
        return mask.reshape(-1) > 0
    return np.ones(int(np.prod(logits.shape[:-1])), dtype=bool)


def _token_figures(reference: np.ndarray, output: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, int]:
    a = reference.reshape(-1, reference.shape[-1])[mask].astype(np.float64)
    b = output.reshape(-1, output.shape[-1])[mask].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)
    log_p, log_q = _log_softmax(a), _log_softmax(b)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    top1 = np.argmax(a, axis=1) == np.argmax(b, axis=1)
    return float(cosine.mean()), float(kl.mean()), float(top1.mean()), int(mask.sum())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def relative_output_error(quantizer: WeightOnlyQuantizer, node: str, bits: int) -> float:
    """``sum_k E[x_k^2] |dW_k|^2 / sum_k E[x_k^2] |W_k|^2`` of one MatMul at `bits` (the proxy)."""
    target = quantizer.targets.matmul(node)
    energy = quantizer.moments().second_moments[target.activation]
    weight = quantizer.weight(node).astype(np.float32)
    error = weight - quantizer.codes(node, bits).dequantize()
    signal = float(energy @ np.sum(weight.astype(np.float64) ** 2, axis=1))
    return float(energy @ np.sum(error.astype(np.float64) ** 2, axis=1)) / max(signal, 1e-30)


def rank_layers(
    quantizer: WeightOnlyQuantizer,
    how: Ranking,
    judge: LogitJudge | None = None,
    bits: int | None = None,
    scratch: Path | None = None,
    external_data_threshold_bytes: int = 2**30,
) -> list[Candidate]:
    """Candidates most damaging first.

    Args:
        quantizer: The model's quantizer (its calibration feeds give the proxy).
        how: "damage" (each MatMul alone, judged: needs `judge` and `scratch`) or "proxy".
        judge: Judges the logits (damage: on its first batch).
        bits: The precision whose damage is ranked (None: the settings' bits).
        scratch: A folder for the one-MatMul models.
        external_data_threshold_bytes: Weight bytes above which those models use external data.

    Returns:
        `Candidate`s with ``sqnr_db`` the proxy's ``-10 log10(error)`` and ``damage`` the
        measured 1 - cosine (damage) or the proxy's error (proxy).
    """
    width = bits or quantizer.settings.bits
    proxy = {target.node: relative_output_error(quantizer, target.node, width) for target in quantizer.candidates}
    candidates = [
        Candidate(t.node, "MatMul", -10.0 * math.log10(max(proxy[t.node], 1e-30)), t.activation, proxy[t.node])
        for t in quantizer.candidates
    ]
    if how == "proxy":
        return sorted(candidates, key=lambda c: (-(c.damage or 0.0), c.node))
    if judge is None or scratch is None:
        raise StageError("quantize", "", "the damage ranking needs a judge and a scratch folder")

    def damage(node: str) -> float:
        path = quantizer.write(scratch / "alone.onnx", {node: width}, external_data_threshold_bytes).path
        cosine = judge.figures(path, batches=1).cosine
        discard(path)
        return 1.0 - cosine

    return rank_by_damage(candidates, damage)


@dataclass(frozen=True)
class MixedWeightOnlyResult:
    """The mixed-precision outcome.

    Attributes:
        result: The written model (its `quantized` maps each MatMul to its bits).
        wider: MatMuls the search moved to `fallback_bits` (0: float), with why.
        fallback_bits: 8 or 0 (float).
        ranking: How candidates were ranked.
        damage: Node to its ranking score, for the nodes moved wider.
        probes: Every evaluation of the search.
        met: Whether the policy, tightened by `JUDGE_MARGIN`, was met on the held-out batches.
        figures: The written model's logits on the held-out batches.
        judged_on: What it was judged on.
    """

    result: WeightOnlyResult
    wider: dict[str, str]
    fallback_bits: int
    ranking: Ranking
    damage: dict[str, float] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    met: bool = False
    figures: LogitFigures | None = None
    judged_on: str = ""


def split_feeds(
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> tuple[list[Mapping[str, np.ndarray]], list[Mapping[str, np.ndarray]], str]:
    """(calibrate on, judge on, what was judged) as the static search splits: every fourth held out."""
    held = [feed for index, feed in enumerate(feeds) if is_held_out(index)]
    if not held:
        return list(feeds), list(feeds), f"the {len(feeds)} calibration batch(es), also calibrated on"
    calibrate = [feed for index, feed in enumerate(feeds) if not is_held_out(index)]
    return calibrate, held, f"{len(held)} held-out calibration batches of {len(feeds)}, not calibrated on"


@dataclass(frozen=True)
class MixedSettings:
    """How the mixed-precision search runs.

    Attributes:
        policy: What the logits must keep (the search aims `JUDGE_MARGIN` inside it, as the
            static search does).
        fallback_bits: Precision of the MatMuls moved: 8, or 0 for float.
        ranking: "damage" or "proxy" (`rank_layers`).
        max_share: At most this share of the candidates moved.
    """

    policy: LogitPolicy = field(default_factory=LogitPolicy)
    fallback_bits: int = 8
    ranking: Ranking = "damage"
    max_share: float = 1.0


def quantize_weight_only_mixed(
    model_path: Path,
    out_path: Path,
    settings: WeightOnlySettings,
    calibration: Iterable[Mapping[str, np.ndarray]],
    mixed: MixedSettings,
    keep: Set[str] = frozenset(),
    external_data_threshold_bytes: int = 2**30,
) -> MixedWeightOnlyResult:
    """Quantize at `settings.bits`, moving the most damaging MatMuls wider until the policy holds.

    Args:
        model_path: The float model.
        out_path: Where the chosen model is written.
        settings: The base quantization.
        calibration: Decoder feeds; every fourth batch (with at least four) judges, the rest calibrate.
        mixed: The policy, the fallback precision, the ranking.
        keep: MatMuls left float regardless.
        external_data_threshold_bytes: Weight bytes above which external data is written.

    Raises:
        JobError: A fallback not wider than the base bits, or no calibration feeds.
    """
    if mixed.fallback_bits not in (0, 8) or mixed.fallback_bits == settings.bits:
        problem = f"{mixed.fallback_bits}: 8 (above int4) or 0 (float)"
        raise JobError(model_path, "quantize.weight_only.fallback_bits", problem)
    feeds = list(calibration)
    if not feeds:
        raise JobError(model_path, "data.calibration", "mixed precision judges on calibration feeds: none given")
    calibrate, held, judged_on = split_feeds(feeds)
    quantizer = WeightOnlyQuantizer(model_path, settings, calibrate, keep)
    quantizer.prepare([settings.bits, mixed.fallback_bits])
    judge = LogitJudge(model_path, held)
    with tempfile.TemporaryDirectory(prefix="weight_only_", dir=out_path.parent) as folder:
        found = _search(quantizer, judge, mixed, Path(folder), external_data_threshold_bytes)
    wider_nodes = list(found.kept_float)
    plan = _plan(quantizer, wider_nodes, mixed.fallback_bits)
    result = quantizer.write(out_path, plan, external_data_threshold_bytes)
    figures = judge.figures(out_path)
    what = "float" if mixed.fallback_bits == 0 else f"int{mixed.fallback_bits}"
    why = "needed to meet the logit policy" if found.met else "the closest the allowed share got to the policy"
    wider = {node: f"mixed precision rank {i + 1}, kept {what}: {why}" for i, node in enumerate(wider_nodes)}
    if not found.met:
        logger.warning("weight-only mixed precision: the policy was not met (%s)", figures.summary())
    return MixedWeightOnlyResult(
        result, wider, mixed.fallback_bits, mixed.ranking, found.damage, found.probes, found.met, figures, judged_on
    )


def _search(
    quantizer: WeightOnlyQuantizer, judge: LogitJudge, mixed: MixedSettings, scratch: Path, threshold: int
) -> SearchResult:
    aim = mixed.policy.tightened()

    def evaluate(nodes: list[str]) -> tuple[bool, str]:
        path = quantizer.write(scratch / "probe.onnx", _plan(quantizer, nodes, mixed.fallback_bits), threshold).path
        figures = judge.figures(path)
        discard(path)
        return figures.meets(aim), figures.summary()

    def rank() -> list[Candidate]:
        return rank_layers(quantizer, mixed.ranking, judge, scratch=scratch, external_data_threshold_bytes=threshold)

    return search(rank, evaluate, mixed.max_share)


def discard(path: Path) -> None:
    """Remove a scratch model and its external data (the search writes one model per probe)."""
    for file in (path, path.parent / external_data_name(path)):
        file.unlink(missing_ok=True)


def _plan(quantizer: WeightOnlyQuantizer, wider: Iterable[str], fallback_bits: int) -> dict[str, int]:
    plan = quantizer.default_plan()
    for node in wider:
        plan[node] = fallback_bits
    return plan
