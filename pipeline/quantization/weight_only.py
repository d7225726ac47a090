"""Weight-only quantization of a decoder's MatMul weights to int4 / int8, block-wise.

Weights become ONNX Runtime's ``MatMulNBits`` (com.microsoft; CPU, CUDA, DirectML, WebGPU run
it) or, for targets without that contrib op, a blocked ``DequantizeLinear`` (opset 21) feeding
the MatMul. Activations stay float. Methods:

- ``rtn``: round-to-nearest with ONNX Runtime's MLAS kernel, exactly what its
  ``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig`` writes (int4 and int8,
  symmetric or with zero points);
- ``hqq``: ONNX Runtime's HQQ (data-free: it fits each block's scale and fractional zero point
  to the weights), int4 with zero points only;
- ``gptq``: ours (`weight_only_gptq`: ORT 1.32's GPTQ propagates no error, so it equals RTN),
  data-aware, from the calibration text: each layer's rounding error is compensated on the
  weights not yet rounded, weighted by its input's ``X^T X``.

Embeddings (``GatherBlockQuantized``, or DequantizeLinear -> Gather) and the LM head (the MatMul
that produces the logits) are options, off by default. The model is read with onnx-ir, which
memory-maps external data: one weight at a time is materialised (`WeightOnlyQuantizer.write`).
The mixed-precision search that keeps the most damaging MatMuls wider is in
`weight_only_mixed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from pipeline.errors import JobError
from pipeline.onnx_io import (
    PROTOBUF_LIMIT_BYTES,
    discard_weights,
    initializer_bytes,
    model_bytes,
    release_weights,
    save_model,
)
from pipeline.quantization import weight_only_graph as graph
from pipeline.quantization.weight_only_blocks import BLOCK_SIZES, BlockCodes, hqq_codes, rtn_codes
from pipeline.quantization.weight_only_calibration import (
    ActivationMoments,
    ActivationReader,
    hessian_budget,
    hessian_groups,
)
from pipeline.quantization.weight_only_gptq import gptq_codes, hessian_factor

logger = logging.getLogger(__name__)

Method = Literal["rtn", "gptq", "hqq"]
Format = Literal["matmulnbits", "qdq"]
METHODS: tuple[Method, ...] = ("rtn", "gptq", "hqq")
FORMATS: tuple[Format, ...] = ("matmulnbits", "qdq")
SETTINGS_SOURCE = "weight-only settings"
# GPTQ fits each layer's Hessian: with too few tokens per input channel it fits the calibration
# text. On a 27 M Llama (inputs up to 1536 wide) 1024 tokens left it below rtn (logit cosine
# 0.961 vs 0.967 held out), 8192 above (0.972).
GPTQ_TOKENS_PER_CHANNEL = 4
# The ONNX element type of each float weight dtype (for the calibration session's extra outputs).
_ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}


@dataclass(frozen=True)
class WeightOnlySettings:
    """How weights are quantized.

    Attributes:
        bits: 4 or 8.
        block_size: Input channels per scale (a power of two from 16 to 256). 32 by default: on
            the test decoders int4 RTN at 32 keeps logit cosine 0.2-0.3 points nearer float
            than at 128 for 3 % more bytes (a scale per 32 weights, not per 128); 128 is
            ONNX Runtime's default and a little faster.
        symmetric: No zero points (the implied 8 / 128); else a zero point per block.
        method: "rtn", "gptq" (needs calibration feeds) or "hqq".
        quantize_embeddings: Also quantize embedding tables (Gather) at `bits`, round-to-nearest.
        quantize_lm_head: Also quantize the LM head (the MatMul producing the logits).
        format: "matmulnbits" (ONNX Runtime's contrib op) or "qdq" (blocked DequantizeLinear).
        accuracy_level: MatMulNBits' compute type (0: unset, float; 4: int8 activations, faster
            on CPU, less exact). Ignored for "qdq".
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: Method = "rtn"
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    format: Format = "matmulnbits"
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        """Refuse settings ONNX Runtime cannot run.

        Raises:
            JobError: A value out of range or a combination without a kernel.
        """
        problems = {
            "bits": None if self.bits in (4, 8) else f"{self.bits}: 4 or 8",
            "block_size": None if self.block_size in BLOCK_SIZES else f"{self.block_size}: one of {BLOCK_SIZES}",
            "method": None if self.method in METHODS else f"{self.method!r}: one of {METHODS}",
            "format": None if self.format in FORMATS else f"{self.format!r}: one of {FORMATS}",
            "accuracy_level": None if 0 <= self.accuracy_level <= 4 else f"{self.accuracy_level}: 0 to 4",
        }
        if self.method == "hqq" and self.symmetric:
            problems["symmetric"] = "hqq fits a zero point per block: set symmetric = false"
        if self.method == "hqq" and self.format == "qdq":
            problems["format"] = (
                "hqq's fractional zero points do not survive DequantizeLinear's integer ones (rounded, int4 "
                "logit cosine fell from 0.934 to 0.894 on a test decoder, below rtn's 0.927): use rtn or gptq"
            )
        if self.method == "hqq" and self.bits == 8:
            problems["bits"] = "hqq's float zero points have no int8 MatMulNBits kernel on CPU: use rtn or gptq"
        for key, problem in problems.items():
            if problem is not None:
                raise JobError(SETTINGS_SOURCE, f"quantize.weight_only.{key}", problem)


@dataclass(frozen=True)
class WeightOnlyResult:
    """What a weight-only quantization wrote.

    Attributes:
        path: The model file.
        settings: How.
        quantized: MatMul node to its bits.
        kept: MatMul node left float, with why.
        embeddings: Gather node to its bits (empty unless embeddings are quantized).
        lm_head: The LM head's node (None: none found).
        seconds: Time taken, calibration included.
        bytes_before: Weight bytes of the float model.
        bytes_after: Weight bytes of the quantized model (packed).
        file_bytes: The written model file plus its external data.
        calibration_tokens: Tokens GPTQ's Hessians were measured on (0: no calibration used).
    """

    path: Path
    settings: WeightOnlySettings
    quantized: dict[str, int]
    kept: dict[str, str]
    embeddings: dict[str, int]
    lm_head: str | None
    seconds: float
    bytes_before: int
    bytes_after: int
    file_bytes: int
    calibration_tokens: int = 0


@dataclass
class _Timing:
    seconds: float = 0.0
    prepared: set[int] = field(default_factory=set)


def load_model(path: Path) -> ir.Model:
    """A model with onnx-ir (external data memory-mapped), its nodes named (`name_nodes`)."""
    model = ir.load(path)
    graph.name_nodes(model)
    return model


class WeightOnlyQuantizer:
    """Quantizes one model's weights, at one or more precisions, and writes a model for a plan.

    The codes of each weight at each precision are computed once and cached (a quarter of the
    float weight at int8, an eighth at int4), so that the mixed-precision search writes its
    candidates without quantizing again.

    Args:
        model_path: The float model.
        settings: How.
        calibration: Decoder feeds (first step, empty past: `DecoderSignature.step_feeds`);
            required by gptq, used by the activation-aware ranking. Read once into a list.
        keep: MatMul node names left float.
        logits: The output the LM head produces.

    Raises:
        JobError: gptq without calibration feeds, the QDQ format on a model below opset 18, or a
            model without a MatMul weight to quantize.
    """

    def __init__(
        self,
        model_path: Path,
        settings: WeightOnlySettings,
        calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
        keep: Set[str] = frozenset(),
        logits: str = "logits",
    ) -> None:
        start = time.perf_counter()
        self.model_path = model_path
        self.settings = settings
        self.feeds: list[Mapping[str, np.ndarray]] = list(calibration) if calibration is not None else []
        if settings.method == "gptq" and not self.feeds:
            raise JobError(model_path, "quantize.weight_only.method", "gptq needs calibration feeds (data.calibration)")
        self._model = load_model(model_path)
        problem = graph.qdq_opset_problem(self._model) if settings.format == "qdq" else None
        if problem is not None:
            raise JobError(model_path, "quantize.weight_only.format", problem)
        self.targets = graph.find_targets(self._model, logits)
        if not self.targets.matmuls:
            raise JobError(
                model_path,
                "quantize.weight_only",
                f"{model_path.name} has no MatMul with a constant 2-D float weight to quantize: torch's export "
                "feeds each Linear weight through a Transpose, which the simplify stage folds (keep "
                "simplify.enabled = true), or the model has no MatMul (drop [quantize.weight_only])",
            )
        self.kept = self._kept(keep)
        self._codes: dict[tuple[str, int], BlockCodes] = {}
        self._moments: ActivationMoments | None = None
        self.tokens = 0
        self._timing = _Timing(seconds=time.perf_counter() - start)

    def _kept(self, keep: Set[str]) -> dict[str, str]:
        kept = {name: "listed to stay float" for name in keep if any(t.node == name for t in self.targets.matmuls)}
        head = self.targets.lm_head
        if head is not None and not self.settings.quantize_lm_head and head not in kept:
            kept[head] = "the LM head (quantize_lm_head is off)"
        return kept

    @property
    def candidates(self) -> list[graph.MatMulTarget]:
        """The MatMuls to quantize, in graph order."""
        return [target for target in self.targets.matmuls if target.node not in self.kept]

    def default_plan(self) -> dict[str, int]:
        """Every candidate at the settings' bits."""
        return {target.node: self.settings.bits for target in self.candidates}

    def prepare(self, bits: Iterable[int]) -> None:
        """Quantize every candidate at each of `bits` (GPTQ: one set of calibration passes for all)."""
        start = time.perf_counter()
        wanted = sorted(set(bits) - self._timing.prepared - {0})
        if wanted and self.settings.method == "gptq":
            self._prepare_gptq(wanted)
        else:
            for width in wanted:
                for target in self.candidates:
                    self.codes(target.node, width)
        self._timing.prepared.update(wanted)
        self._timing.seconds += time.perf_counter() - start

    def weight(self, node: str) -> np.ndarray:
        """One MatMul's float weight [K, N] (memory-mapped when in external data)."""
        return graph.weight_array(self._model, self.targets.matmul(node).weight)

    def codes(self, node: str, bits: int) -> BlockCodes:
        """The codes of one MatMul's weight at `bits` (cached)."""
        key = (node, bits)
        if key not in self._codes:
            if self.settings.method == "gptq":
                self.prepare([bits])
                return self._codes[key]
            weight = self.weight(node)
            if self.settings.method == "hqq" and bits == 4:
                self._codes[key] = hqq_codes(weight, bits, self.settings.block_size)
            else:
                self._codes[key] = rtn_codes(weight, bits, self.settings.block_size, self.settings.symmetric)
            del weight
            # Its pages leave resident memory (read again from the file if another width wants it):
            # otherwise quantizing reads the whole float model into memory beside the codes.
            release_weights(self._model, [self.targets.matmul(node).weight])
        return self._codes[key]

    def _prepare_gptq(self, bits: list[int]) -> None:
        activations: dict[str, list[graph.MatMulTarget]] = {}
        for target in self.candidates:
            activations.setdefault(target.activation, []).append(target)
        reader = self._reader(activations)
        widths = {name: targets[0].rows for name, targets in activations.items()}
        groups = hessian_groups(widths, hessian_budget(initializer_bytes(self._model)))
        logger.info("gptq: %d activations in %d calibration pass(es)", len(widths), len(groups))
        for index, group in enumerate(groups):
            hessians, self.tokens = reader.hessians(group, self.feeds)
            if index == 0:
                _warn_few_tokens(self.tokens, max(widths.values()))
            for name in group:
                factor = hessian_factor(hessians.pop(name))
                for target in activations[name]:
                    weight = graph.weight_array(self._model, target.weight)
                    for width in bits:
                        codes = gptq_codes(weight, factor, width, self.settings.block_size, self.settings.symmetric)
                        self._codes[(target.node, width)] = codes
                    del weight
                    release_weights(self._model, [target.weight])
                logger.debug("gptq: %s (%d MatMuls)", name, len(activations[name]))

    def _reader(self, activations: Mapping[str, list[graph.MatMulTarget]]) -> ActivationReader:
        types = {}
        for name, targets in activations.items():
            dtype = np.dtype(graph.weight_array(self._model, targets[0].weight).dtype)
            types[name] = _ELEMENT_TYPES.get(dtype, 1)
        return ActivationReader(self.model_path, types)

    def moments(self) -> ActivationMoments:
        """Per-channel ``E[x^2]`` of every candidate's input on the calibration feeds (measured once).

        Raises:
            JobError: No calibration feeds.
        """
        if self._moments is None:
            if not self.feeds:
                raise JobError(self.model_path, "data.calibration", "activation statistics need calibration feeds")
            activations: dict[str, list[graph.MatMulTarget]] = {}
            for target in self.targets.matmuls:
                activations.setdefault(target.activation, []).append(target)
            self._moments = self._reader(activations).moments(list(activations), self.feeds)
        return self._moments

    def write(self, out_path: Path, plan: Mapping[str, int], external_data_threshold_bytes: int) -> WeightOnlyResult:
        """Write the model with each planned MatMul at its bits (0 or absent: float).

        Args:
            out_path: The .onnx file to write (external data beside it, ``<name>.data``, when
                the weights exceed the threshold).
            plan: MatMul node to bits (nodes kept float by `keep` or the LM head option stay float).
            external_data_threshold_bytes: Weight bytes above which external data is written.
        """
        start = time.perf_counter()
        self.prepare(set(plan.values()))
        model = load_model(self.model_path)
        before = initializer_bytes(model)
        nodes = {node.name or "": node for node in model.graph}
        quantized = {t.node: plan[t.node] for t in self.candidates if plan.get(t.node, 0)}
        for group in self._rewrite_groups(quantized):
            codes = [self.codes(name, quantized[name]) for name in group]
            self._rewrite_matmuls(model, [nodes[name] for name in group], codes)
        embeddings = self._rewrite_embeddings(model, nodes)
        if self.settings.format == "qdq":
            graph.declare_qdq_opset(model)
        after = initializer_bytes(model)
        if after <= min(external_data_threshold_bytes, PROTOBUF_LIMIT_BYTES - 1):
            # saved inline: onnx-ir would keep a memory-mapped weight as a reference to the
            # source's data file, relative, so broken anywhere but the source's folder
            model = ir.external_data.load_to_model(model)
        save_model(model, out_path, external_data_threshold_bytes)
        discard_weights(model)  # written: its maps of the float model's weights close now
        kept = {
            t.node: self.kept.get(t.node, "kept at higher precision")
            for t in self.targets.matmuls
            if t.node not in quantized
        }
        files = model_bytes(out_path)
        seconds = self._timing.seconds + time.perf_counter() - start
        logger.info(
            "weight-only %s int%d: %d MatMuls quantized, %d kept float; weights %.1f -> %.1f MB in %.1f s",
            self.settings.method,
            self.settings.bits,
            len(quantized),
            len(kept),
            before / 1e6,
            after / 1e6,
            seconds,
        )
        return WeightOnlyResult(
            out_path,
            self.settings,
            quantized,
            kept,
            embeddings,
            self.targets.lm_head,
            round(seconds, 3),
            before,
            after,
            files,
            self.tokens,
        )

    def _rewrite_groups(self, quantized: Mapping[str, int]) -> list[list[str]]:
        """The quantized MatMuls in graph order, those of one activation at one precision together
        (``MatMulNBits`` runs them as one: `graph.to_joined_matmul_nbits`); QDQ keeps each alone."""
        groups: dict[tuple[str, int], list[str]] = {}
        alone = self.settings.format == "qdq"
        for target in self.candidates:
            if target.node in quantized:
                key = (target.node, 0) if alone else (target.activation, quantized[target.node])
                groups.setdefault(key, []).append(target.node)
        return list(groups.values())

    def _rewrite_matmuls(self, model: ir.Model, nodes: list[ir.Node], codes: list[BlockCodes]) -> None:
        if self.settings.format == "qdq":
            graph.to_qdq_matmul(model, nodes[0], codes[0])
        elif len(nodes) == 1:
            graph.to_matmul_nbits_node(model, nodes[0], codes[0], self.settings.accuracy_level)
        else:
            graph.to_joined_matmul_nbits(model, nodes, codes, self.settings.accuracy_level)

    def _rewrite_embeddings(self, model: ir.Model, nodes: Mapping[str, ir.Node]) -> dict[str, int]:
        if not self.settings.quantize_embeddings:
            return {}
        done: dict[str, int] = {}
        for target in self.targets.embeddings:
            table = graph.weight_array(model, target.table)
            codes = rtn_codes(
                np.ascontiguousarray(table.T), self.settings.bits, self.settings.block_size, self.settings.symmetric
            )
            if self.settings.format == "qdq":
                graph.to_qdq_gather(model, nodes[target.node], codes)
            else:
                graph.to_gather_block_quantized(model, nodes[target.node], codes)
            done[target.node] = self.settings.bits
        return done


def _warn_few_tokens(tokens: int, width: int) -> None:
    if tokens < GPTQ_TOKENS_PER_CHANNEL * width:
        logger.warning(
            "gptq: %d calibration tokens for inputs %d wide (fewer than %d per channel): its Hessians fit "
            "the calibration text, and the model may come out no better than rtn; give more text",
            tokens,
            width,
            GPTQ_TOKENS_PER_CHANNEL,
        )


def quantize_weight_only(
    model_path: Path,
    out_path: Path,
    settings: WeightOnlySettings,
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    keep: Set[str] = frozenset(),
    external_data_threshold_bytes: int = 2**30,
) -> WeightOnlyResult:
    """Quantize every MatMul weight of a model (LM head and embeddings per `settings`).

    Args:
        model_path: The float model (external data is memory-mapped, not loaded).
        out_path: Where to write the quantized model.
        settings: Bits, block size, method, format.
        calibration: Decoder feeds; required by gptq.
        keep: MatMul node names left float.
        external_data_threshold_bytes: Weight bytes above which external data is written.

    Raises:
        JobError: Settings without a kernel, gptq without feeds, QDQ on a model below opset 18.
    """
    quantizer = WeightOnlyQuantizer(model_path, settings, calibration, keep)
    return quantizer.write(out_path, quantizer.default_plan(), external_data_threshold_bytes)
