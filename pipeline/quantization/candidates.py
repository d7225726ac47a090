"""The candidate models the per-target search builds from one calibration.

Each builder returns a `Built`: the quantized model and what it left float or dynamic. Static
candidates go through ONNX Runtime's QDQ quantizer with our ranges (`pipeline.quantization.qdq`);
dynamic ones through ONNX Runtime's dynamic quantizer (activation ranges measured at run time,
weights int8 per channel), for targets that run its kernels.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from pipeline.calibration.collector import CalibrationStats
from pipeline.errors import StageError, first_line
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, Int8Policy
from pipeline.quantization.judge import PolicyJudge
from pipeline.quantization.mixed_precision import COMPUTE_OPS, Candidate, rank_by_damage, rank_candidates, search
from pipeline.quantization.qdq import QdqSettings, quantize_qdq
from pipeline.quantization.recipe import Recipe
from pipeline.quantization.wide import int16_candidates
from pipeline.records import CalibrationRecord, IrregularTensor, ProbeRecord, StageName

logger = logging.getLogger(__name__)

# Op types ONNX Runtime's dynamic quantizer takes with a constant weight (its IntegerOps registry
# has no Gemm: a Gemm stays float there, so it is not offered).
DYNAMIC_OPS = ("MatMul",)


@dataclass(frozen=True)
class Calibrated:
    """The float model with inferred shapes, its recipe, and its measured activation ranges."""

    model: onnx.ModelProto
    recipe: Recipe
    stats: CalibrationStats
    ranges: dict[str, tuple[float, float]]
    cache_hit: bool
    seconds: float

    def record(self, method: str, data: FeedSource | None) -> CalibrationRecord:
        """The calibration as the manifest records it (with the samples `data` dropped for NaN / inf)."""
        return CalibrationRecord(
            method=method,
            batches=self.stats.batches,
            samples=self.stats.samples,
            tensors=len(self.stats.tensors),
            seconds=round(self.seconds, 3),
            cache_hit=self.cache_hit,
            irregular_tensors={
                name: IrregularTensor(nonfinite=h.nonfinite, huge=h.huge)
                for name, h in self.stats.tensors.items()
                if h.nonfinite or h.huge
            },
            dropped_samples=(data.dropped_samples or 0) if data is not None else 0,
        )


@dataclass(frozen=True)
class Built:
    """A candidate model and how it was made.

    Attributes:
        model: The quantized model.
        settings: The QDQ settings of its static part.
        kept_float: Nodes left float, with why.
        dynamic: Nodes quantized dynamically.
        probes: The mixed-precision probes that led to it.
        damage: Measured damage of the nodes the mixed-precision search kept float.
        met: Whether the mixed-precision search met the policy (None: it did not run).
        precision: "int8", or "fp32" for the float model itself.
        int16: Activations quantized to 16 bits (targets with int16 activations), worst in int8 first.
    """

    model: onnx.ModelProto
    settings: QdqSettings
    kept_float: dict[str, str]
    dynamic: list[str] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    damage: dict[str, float] = field(default_factory=dict)
    met: bool | None = None
    precision: str = "int8"
    int16: list[str] = field(default_factory=list)

    def float_compute_nodes(self) -> int:
        """Compute nodes (Conv, MatMul, Gemm) that run in float: neither fed by two dequantized
        inputs nor replaced by a dynamic int8 kernel."""
        graph = self.model.graph
        dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        return sum(
            node.op_type in COMPUTE_OPS and not all(name in dequantized for name in node.input[:2])
            for node in graph.node
        )


class CandidateBuilder:
    """Builds a branch's candidate models from one calibration.

    Args:
        job: The job (its quantize options and int8 policy).
        calibrated: The float model, its recipe and ranges.
        kept: Nodes every candidate keeps float (the job's exclusions, irregular tensors).
        judge: Judges candidates on held-out data (the mixed-precision search uses it).
    """

    def __init__(self, job: ConversionJob, calibrated: Calibrated, kept: dict[str, str], judge: PolicyJudge) -> None:
        self.job = job
        self.calibrated = calibrated
        self.kept = kept
        self.judge = judge
        self._rankings: dict[str, list[Candidate]] = {}

    def static(
        self,
        settings: QdqSettings,
        kept: dict[str, str] | None = None,
        only: list[str] | None = None,
        wide: frozenset[str] = frozenset(),
    ) -> onnx.ModelProto:
        """The QDQ model with every quantizable node int8 except `kept` (or only the nodes `only`),
        the activations `wide` in int16.

        Raises:
            StageError: ONNX Runtime's QDQ quantizer failed.
        """
        recipe = self.calibrated.recipe
        try:
            return quantize_qdq(
                self.calibrated.model,
                self.calibrated.ranges,
                settings,
                recipe.op_types,
                list(self.kept if kept is None else kept),
                only,
                recipe.quantize_outputs,
                wide,
            )
        except Exception as e:  # ORT's quantizer raises many types
            detail = f"ONNX Runtime's QDQ quantizer failed: {type(e).__name__}: {first_line(e)}"
            raise StageError(StageName.QUANTIZE, self.job.name, detail) from e

    def static_mixed(self, settings: QdqSettings, int16: bool = False) -> Built:
        """Full static int8; when it misses the policy (and the job allows it), the fewest
        activations in int16 that meet it (when the target runs them: `pipeline.quantization.wide`),
        then the fewest damaging nodes kept float (`pipeline.quantization.mixed_precision`)."""
        if not self._mixed_allowed():
            return Built(self.static(settings), settings, dict(self.kept))
        wide: frozenset[str] = frozenset()
        probes: list[ProbeRecord] = []
        if int16:
            found, probes = self._int16_search(settings)
            if found is not None:
                return Built(
                    self.static(settings, wide=found),
                    settings,
                    dict(self.kept),
                    [],
                    probes,
                    {},
                    True,
                    int16=sorted(found),
                )
            wide = frozenset(c.node for c in int16_candidates(self.calibrated.stats.tensors, self.calibrated.ranges))

        def evaluate(extra_float: list[str]) -> tuple[bool, str]:
            return self.judge(self.static(settings, {**self.kept, **dict.fromkeys(extra_float, "")}, wide=wide))

        result = search(lambda: self.ranking(settings), evaluate, self.job.quantize.max_float_share)
        self._warn_unmet(result.met, "int8")
        probes += [
            ProbeRecord(kept_float=p.kept_float, passed=p.passed, summary=p.summary, int16=len(wide))
            for p in result.probes
        ]
        kept = {**self.kept, **result.kept_float}
        model = self.static(settings, kept, wide=wide)
        return Built(model, settings, kept, [], probes, result.damage, result.met, int16=sorted(wide))

    def _int16_search(self, settings: QdqSettings) -> tuple[frozenset[str] | None, list[ProbeRecord]]:
        """The shortest prefix of the int16 ranking that meets the policy (None: not even all of it)."""
        ranked = int16_candidates(self.calibrated.stats.tensors, self.calibrated.ranges)

        def evaluate(tensors: list[str]) -> tuple[bool, str]:
            return self.judge(self.static(settings, wide=frozenset(tensors)))

        result = search(lambda: ranked, evaluate)
        probes = [
            ProbeRecord(kept_float=0, passed=p.passed, summary=p.summary, int16=p.kept_float) for p in result.probes
        ]
        return (frozenset(result.kept_float) if result.met else None), probes

    def dynamic_mixed(self, settings: QdqSettings) -> Built | None:
        """Every MatMul with a constant weight quantized dynamically, the rest float; when that
        misses the policy, the fewest damaging of them kept float (ranked as for static int8).
        None: the model has no such node."""
        nodes = self._dynamic_nodes()
        if not nodes:
            return None

        def build(extra_float: list[str]) -> tuple[onnx.ModelProto, list[str]]:
            return self.dynamic_built(self.calibrated.model, settings, [n for n in nodes if n not in extra_float])

        if not self._mixed_allowed():
            model, dynamic = build([])
            return Built(model, settings, dict(self.kept), dynamic) if dynamic else None
        result = search(
            lambda: [c for c in self.ranking(settings) if c.node in nodes],
            lambda extra_float: self.judge(build(extra_float)[0]),
            self.job.quantize.max_float_share,
        )
        self._warn_unmet(result.met, "dynamic int8")
        probes = [ProbeRecord(kept_float=p.kept_float, passed=p.passed, summary=p.summary) for p in result.probes]
        model, dynamic = build(list(result.kept_float))
        if not dynamic:  # the dynamic quantizer left every MatMul float: no int8 candidate
            return None
        kept = {**self.kept, **result.kept_float}
        return Built(model, settings, kept, dynamic, probes, result.damage, result.met)

    def ranking(self, settings: QdqSettings) -> list[Candidate]:
        """The quantizable compute nodes, most damaging alone in static int8 first (measured once
        per settings, on the first held-out batch)."""
        key = repr(settings)
        if key not in self._rankings:
            calibrated = self.calibrated
            estimated = rank_candidates(
                calibrated.model,
                calibrated.stats.tensors,
                calibrated.ranges,
                calibrated.recipe.op_types,
                set(self.kept),
            )
            self._rankings[key] = rank_by_damage(
                estimated, lambda node: self.judge.damage(self.static(settings, only=[node]))
            )
        return self._rankings[key]

    def float_model(self, settings: QdqSettings) -> Built:
        """The float model itself, as the fp32 candidate."""
        return Built(self.calibrated.model, settings, {}, precision="fp32")

    def static_keeping(self, settings: QdqSettings, built: Built) -> Built:
        """Static int8 with `settings`, keeping float what `built` kept float (no new search)."""
        model = self.static(settings, built.kept_float, wide=frozenset(built.int16))
        return replace(built, model=model, settings=settings, probes=[], met=None)

    def float_to_dynamic(self, built: Built) -> Built | None:
        """`built` with the MatMul nodes it kept float quantized dynamically instead
        (None: it kept none)."""
        nodes = {node.name: node.op_type for node in self.calibrated.model.graph.node}
        # Only what the mixed-precision search kept float for accuracy, not the job's exclusions.
        movable = [name for name in built.damage if nodes.get(name) in DYNAMIC_OPS]
        if not movable:
            return None
        model, dynamic = self.dynamic_built(built.model, built.settings, movable)
        if not dynamic:
            return None
        kept = {name: why for name, why in built.kept_float.items() if name not in dynamic}
        return replace(built, model=model, kept_float=kept, dynamic=dynamic)

    def _dynamic_nodes(self) -> list[str]:
        """MatMul nodes with a constant weight, not kept float by the job or its data."""
        weights = {init.name for init in self.calibrated.model.graph.initializer}
        return [
            node.name
            for node in self.calibrated.model.graph.node
            if node.op_type in DYNAMIC_OPS and len(node.input) > 1 and node.input[1] in weights
            and node.name not in self.kept
        ]  # fmt: skip

    def _mixed_allowed(self) -> bool:
        return self.job.quantize.mixed_precision and has_checks(self.job.parity.int8)

    def _warn_unmet(self, met: bool, what: str) -> None:
        if not met:
            share = 100 * self.job.quantize.max_float_share
            logger.warning("%s: %s policy not met with up to %.0f%% of nodes float", self.job.name, what, share)

    def dynamic(self, model: onnx.ModelProto, settings: QdqSettings, nodes: list[str]) -> onnx.ModelProto:
        """`model` with `nodes` quantized by ONNX Runtime's dynamic quantizer (int8 weights, per
        channel where the settings are).

        Raises:
            StageError: ONNX Runtime's dynamic quantizer failed.
        """
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(prefix="onnxforge-dynamic-") as folder, _without_preprocess_hint():
            output = Path(folder) / "dynamic.onnx"
            try:
                quantize_dynamic(
                    model,
                    output,
                    op_types_to_quantize=list(DYNAMIC_OPS),
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=nodes,
                    extra_options={"MatMulConstBOnly": True},
                )
            except Exception as e:  # ORT's quantizer raises many types
                detail = f"ONNX Runtime's dynamic quantizer failed: {type(e).__name__}: {first_line(e)}"
                raise StageError(StageName.QUANTIZE, self.job.name, detail) from e
            return onnx.load(str(output))

    def dynamic_built(
        self, model: onnx.ModelProto, settings: QdqSettings, nodes: list[str]
    ) -> tuple[onnx.ModelProto, list[str]]:
        """`dynamic`, and the nodes it really quantized (the quantizer leaves some MatMuls float,
        e.g. where it cannot read a weight's shape): a MatMul of `nodes` still in the output stayed float."""
        quantized = self.dynamic(model, settings, nodes)
        still_float = {node.name for node in quantized.graph.node if node.op_type in DYNAMIC_OPS}
        return quantized, [name for name in nodes if name not in still_float]


class _PreprocessHint(logging.Filter):
    """Drops ONNX Runtime's "consider to run pre-processing" warning: the model it quantizes here
    already carries inferred shapes (`pipeline.quantization.shapes`), which is what that step adds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()


@contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    hint = _PreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def has_checks(policy: Int8Policy) -> bool:
    """Whether the int8 policy sets any limit (mixed precision has something to aim at)."""
    return any(
        value is not None
        for value in (policy.min_cosine, policy.min_snr_db, policy.min_top1_agreement, policy.max_accuracy_drop)
    )
