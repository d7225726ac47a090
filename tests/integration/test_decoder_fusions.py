"""A causal LM's RMSNorms fused into ONNX Runtime's contrib operators (`pipeline.llm.fusions`) by the
simplify stage: for a cpu target, checked against PyTorch by the job's validation; not for an fpga one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import pytest

import pipeline
from backends.registry import get_backend
from pipeline.llm.fusions import FUSED_OPS, fuse_decoder, fusions_apply
from pipeline.records import SimplifyRecord, WeightOnlyRecord
from tests.integration.test_causal_lm_job import decoder_job


def fused_nodes(path: Path) -> Counter[str]:
    """The fused norm nodes of a saved model, by op type."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node if node.op_type in FUSED_OPS)


def test_fusions_apply_only_to_a_causal_lm_whose_every_target_runs_contrib_ops() -> None:
    cpu, cuda, fpga = (get_backend(name).capabilities.contrib_ops for name in ("cpu", "cuda", "fpga"))

    assert (cpu, cuda, fpga) == (True, True, False)
    assert fusions_apply(True, [cpu]) and fusions_apply(True, [cpu, cuda])
    assert not fusions_apply(True, [cpu, fpga]) and not fusions_apply(True, [])
    assert not fusions_apply(False, [cpu])


@pytest.mark.slow
def test_the_fused_graph_keeps_every_projection_for_weight_only_quantization(tmp_path: Path) -> None:
    from pipeline.llm.export import export_decoder
    from pipeline.llm.signature import DecoderSignature
    from pipeline.quantization.weight_only_graph import find_targets, name_nodes
    from tests.integration.tiny_decoder import build

    model = build(layers=1)
    signature = DecoderSignature.from_config(model.config)
    export_decoder(model, signature, 2, 3, tmp_path / "model.onnx", 2**30, job="fusions")
    graph = ir.load(tmp_path / "model.onnx")
    onnxscript.optimizer.optimize(graph)
    name_nodes(graph)
    before = find_targets(graph)

    fused = fuse_decoder(graph, "fusions")

    # One layer: the input and post-attention norms (the second takes the residual Add) and the final norm.
    assert fused == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
    after = find_targets(graph)
    assert [t.weight for t in after.matmuls] == [t.weight for t in before.matmuls] and after.lm_head
    assert not any(node.op_type in {"Pow", "ReduceMean", "Reciprocal"} for node in graph.graph)


@pytest.mark.slow
def test_a_cpu_decoder_job_runs_fused_norms_within_the_fp32_policy(
    write_job: Callable[[dict[str, Any]], Path],
) -> None:
    """Exported, fused, validated against PyTorch (fp32 policy, generation parity) and quantized to int4."""
    quantize = {"weight_only": {"bits": 4, "block_size": 32}, "mixed_precision": False}
    generation = {**decoder_job()["parity"]["generation"], "min_token_agreement": 0.0}
    job = decoder_job(quantize=quantize, parity={"generation": generation, "int8": {"min_cosine": 0.9}})

    result = pipeline.convert(pipeline.load_job(write_job(job)))

    record = result.artifact("simplify").record_as(SimplifyRecord)
    assert record.fused_ops == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    assert fused_nodes(result.output_dir / "model.simplified.onnx") == record.fused_ops
    simplify = [c for c in result.report.comparisons if c.stage == "simplify"]
    assert simplify and all(c.passed for c in simplify)
    assert result.report.verdict == "pass"
    weight_only = result.artifact("quantize").record_as(WeightOnlyRecord)
    assert len(weight_only.quantized) == 14  # 7 projections a layer; the LM head kept float
    generation_report = result.report.generation
    assert generation_report is not None
    fused = [m for m in generation_report.models if m.model == "model.simplified.onnx"]
    assert fused and fused[0].agreement is not None and fused[0].agreement.token_agreement == 1.0


@pytest.mark.slow
def test_an_fpga_target_keeps_the_plain_norms(write_job: Callable[[dict[str, Any]], Path]) -> None:
    job = decoder_job(targets=[{"backend": "cpu"}, {"backend": "fpga"}], parity={})

    result = pipeline.convert(pipeline.load_job(write_job(job)))

    assert result.artifact("simplify").record_as(SimplifyRecord).fused_ops == {}
    assert not fused_nodes(result.output_dir / "model.simplified.onnx")
