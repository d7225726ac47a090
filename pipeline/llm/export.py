"""Decoder export with a KV cache: a `transformers` causal LM to an fp32 ONNX graph with the
`DecoderSignature` inputs and outputs, batch, sequence and past length dynamic.

The graph is traced from `DecoderWithCache`, a wrapper taking flat tensors (the signature's inputs,
in order) and returning flat tensors (logits, then every layer's present key and value). Inside it
the past tensors are rebuilt into the model's `DynamicCache` and the returned cache is flattened,
so torch.export sees tensors only: no cache class crosses the graph's boundary and none needs a
pytree registration.

Worked around:
- torch.export specialises sizes 0 and 1 and "duck-sizes" equal example sizes into one symbol, so
  the example uses sizes >= 2 that all differ (batch, sequence, past, past + sequence); the first
  step (past length 0) and single-token steps are checked afterwards in ONNX Runtime.
- ``attention_mask`` has its own dim (``total_sequence``): torch.export's derived dims cannot say
  "past + sequence" of two dims. torch names the presents' length ``past_sequence + sequence``
  (or the other way round); the saved graph names it ``total_sequence``, as the mask's.
- transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` (and the output
  field with it): the wrapper passes whichever the model's ``forward`` takes.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from pipeline.errors import JobError, StageError, first_line
from pipeline.job.defaults import DECODER_OPSET
from pipeline.llm.export_kernels import KernelSwap, export_kernels
from pipeline.llm.signature import DecoderSignature
from pipeline.onnx_io import save_model
from pipeline.records import StageName

logger = logging.getLogger(__name__)

BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"
# The key of a model-source problem in a job; the stage's JobError names it.
_MODEL_KEY = "model.factory"


@dataclass(frozen=True)
class ExampleSizes:
    """The sizes the graph was traced at (all >= 2 and all different, so none is specialised).

    Attributes:
        batch: Rows.
        sequence: New tokens per row.
        past: Cached tokens per row.
    """

    batch: int
    sequence: int
    past: int

    @classmethod
    def distinct(cls, batch: int, sequence: int) -> ExampleSizes:
        """Sizes near the requested ones that torch.export keeps symbolic: >= 2 and pairwise distinct,
        past + sequence included."""
        batch = max(2, batch)
        sequence = max(2, sequence)
        if sequence == batch:
            sequence += 1
        past = 2
        while len({batch, sequence, past, past + sequence}) < 4:
            past += 1
        return cls(batch=batch, sequence=sequence, past=past)


@dataclass(frozen=True)
class ExportResult:
    """What `export_decoder` wrote.

    Attributes:
        path: The .onnx file.
        external_data: Weights are in ``<path>.data`` beside it.
        opset: Default-domain opset of the graph.
        inputs: Graph input names (the signature's, in order).
        outputs: Graph output names (the signature's, in order).
        example: The sizes the graph was traced at.
        kernels: What ran as SDPA / F.rms_norm while it was traced (`export_kernels`).
        seconds: Time per phase (``export``, ``save``).
    """

    path: Path
    external_data: bool
    opset: int
    inputs: list[str]
    outputs: list[str]
    example: ExampleSizes
    kernels: KernelSwap = field(default_factory=KernelSwap)
    seconds: dict[str, float] = field(default_factory=dict)


class DecoderWithCache(torch.nn.Module):
    """A causal LM as flat tensors in, flat tensors out, for tracing.

    Inputs, in `DecoderSignature.input_names` order: ``input_ids``, ``attention_mask``,
    ``position_ids`` (when the signature has it), then ``past_key_values.{i}.key`` / ``.value``.
    Outputs: ``logits``, then ``present.{i}.key`` / ``.value``.

    Args:
        model: A `transformers` causal LM (``forward`` takes a cache and ``use_cache``).
        signature: The decoder's cache geometry.
    """

    def __init__(self, model: torch.nn.Module, signature: DecoderSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature
        self._cache_argument = cache_argument(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One step: the new tokens against the past caches; the logits and the grown caches."""
        from transformers import DynamicCache

        fixed = 3 if self.signature.position_ids else 2
        past = inputs[fixed:]
        if len(past) != 2 * self.signature.layers:
            raise ValueError(f"expected {2 * self.signature.layers} past tensors, got {len(past)}")
        pairs = list(zip(past[0::2], past[1::2], strict=True))
        cache = DynamicCache(ddp_cache_data=pairs, config=getattr(self.model, "config", None))
        arguments: dict[str, Any] = {
            "input_ids": inputs[0],
            "attention_mask": inputs[1],
            self._cache_argument: cache,
            "use_cache": True,
            "return_dict": True,
        }
        if self.signature.position_ids:
            arguments["position_ids"] = inputs[2]
        output = self.model(**arguments)
        returned = getattr(output, "cache", None)
        if returned is None:
            returned = output.past_key_values
        flat = [output.logits]
        for layer in returned.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """PyTorch's outputs on numpy feeds named as the ONNX inputs, named as the ONNX outputs."""
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.signature.input_names()]
        with torch.inference_mode():
            outputs = self(*inputs)
        return {name: tensor.numpy() for name, tensor in zip(self.signature.output_names(), outputs, strict=True)}


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's ``forward`` takes its cache as (``cache`` from transformers 5.24,
    ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def input_shapes(signature: DecoderSignature) -> dict[str, list[int | str]]:
    """Every graph input's shape, dynamic dims by name (for the job's ``[[inputs]]``)."""
    shapes: dict[str, list[int | str]] = {
        "input_ids": [BATCH, SEQUENCE],
        "attention_mask": [BATCH, TOTAL_SEQUENCE],
    }
    if signature.position_ids:
        shapes["position_ids"] = [BATCH, SEQUENCE]
    for name in signature.past_names():
        shapes[name] = [BATCH, signature.kv_heads, PAST_SEQUENCE, signature.head_dim]
    return shapes


def dynamic_shapes(signature: DecoderSignature) -> tuple[tuple[dict[int, torch.export.Dim], ...]]:
    """torch.export dims for `DecoderWithCache`'s inputs (one group: its ``*inputs``)."""
    dims: dict[str, torch.export.Dim] = {}
    return (
        tuple(
            {
                axis: dims.setdefault(dim, torch.export.Dim(dim))
                for axis, dim in enumerate(shape)
                if isinstance(dim, str)
            }
            for shape in input_shapes(signature).values()
        ),
    )


def example_inputs(signature: DecoderSignature, sizes: ExampleSizes, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tokens, a full mask, positions after the past, and random past caches at `sizes`."""
    generator = torch.Generator().manual_seed(seed)
    batch, sequence, past = sizes.batch, sizes.sequence, sizes.past
    tensors = [
        torch.randint(0, signature.vocab, (batch, sequence), generator=generator),
        torch.ones(batch, past + sequence, dtype=torch.int64),
    ]
    if signature.position_ids:
        tensors.append((torch.arange(sequence) + past).expand(batch, sequence).contiguous())
    shape = (batch, signature.kv_heads, past, signature.head_dim)
    tensors += [torch.randn(shape, generator=generator) for _ in signature.past_names()]
    return tuple(tensors)


def check_decoder_model(model: torch.nn.Module, signature: DecoderSignature, job: str) -> None:
    """What the export needs of the model, said before the slow trace.

    Raises:
        JobError: The model is not a float32 `transformers` causal LM with full-attention layers
            (or lacks ``position_ids`` the signature has).
    """
    import transformers

    def refuse(problem: str) -> None:
        raise JobError(job, _MODEL_KEY, problem)

    if int(transformers.__version__.split(".")[0]) < 5:
        refuse(f"the KV-cache export needs transformers >= 5 (installed: {transformers.__version__})")
    config = getattr(model, "config", None)
    if config is None:
        refuse(f"{type(model).__name__} has no `config`: the KV-cache export takes a transformers causal LM")
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" not in parameters or not {"cache", "past_key_values"} & set(parameters):
        refuse(f"{type(model).__name__}.forward takes no cache (`cache` / `past_key_values` and `use_cache`)")
    if signature.position_ids and "position_ids" not in parameters:
        refuse(f"{type(model).__name__}.forward takes no position_ids; build the signature with position_ids=False")
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if dtypes != {torch.float32}:
        refuse(f"the model's weights are {sorted(map(str, dtypes))}: load it in float32 (torch_dtype=torch.float32)")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        refuse(
            f"layer types {sorted(layer_types)}: the KV-cache export supports full-attention layers only "
            "(no sliding-window or hybrid caches yet); switch sliding windows off in the config"
        )


def _check_geometry(
    wrapper: DecoderWithCache, example: tuple[torch.Tensor, ...], sizes: ExampleSizes, job: str
) -> None:
    """PyTorch's outputs on the example have the signature's shapes (else the signature is wrong)."""
    signature = wrapper.signature
    try:
        with torch.inference_mode():
            outputs = wrapper(*example)
    except Exception as e:  # the model is user code; a wrong signature fails inside it
        raise JobError(
            job,
            _MODEL_KEY,
            f"the model failed on caches shaped by the signature {signature} ({first_line(e)}): "
            "build it with DecoderSignature.from_config(model.config)",
        ) from e
    expected: list[tuple[int, ...]] = [(sizes.batch, sizes.sequence, signature.vocab)]
    expected += [(sizes.batch, signature.kv_heads, sizes.past + sizes.sequence, signature.head_dim)] * (
        2 * signature.layers
    )
    actual = [tuple(tensor.shape) for tensor in outputs]
    if actual != expected:
        raise JobError(
            job,
            _MODEL_KEY,
            f"the model's outputs have shapes {actual} but the signature {signature} expects {expected}: "
            "build it with DecoderSignature.from_config(model.config)",
        )


def _trace(wrapper: DecoderWithCache, example: tuple[torch.Tensor, ...], opset: int, job: str) -> ir.Model:
    """torch.onnx's dynamo export of the wrapper, unoptimised (simplify is a later stage)."""
    signature = wrapper.signature
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                example,
                dynamo=True,
                input_names=signature.input_names(),
                output_names=signature.output_names(),
                dynamic_shapes=dynamic_shapes(signature),
                opset_version=opset,
                optimize=False,
                verbose=False,
            )
    except Exception as e:  # the exporter fails in many ways on user models; all are one error
        raise StageError(StageName.EXPORT, job, f"the dynamo export of the decoder failed: {first_line(e)}") from e
    assert program is not None
    return program.model


def _check_graph(model: ir.Model, signature: DecoderSignature, job: str) -> None:
    """The graph's inputs and outputs are the signature's, each dynamic dim still symbolic."""
    inputs = [value.name for value in model.graph.inputs]
    outputs = [value.name for value in model.graph.outputs]
    if inputs != signature.input_names() or outputs != signature.output_names():
        raise StageError(StageName.EXPORT, job, f"the exported graph has inputs {inputs} and outputs {outputs}")
    expected = input_shapes(signature)
    for value in model.graph.inputs:
        name = str(value.name)
        actual = [dim if isinstance(dim, int) else str(dim) for dim in (value.shape or [])]
        if actual != expected[name]:
            raise StageError(
                StageName.EXPORT,
                job,
                f"input {name} came out {actual}, not {expected[name]}: torch.export fixed a dynamic dim",
            )
    for value in model.graph.outputs:
        dims = list(value.shape or [])
        axes = (0, 1) if value.name == "logits" else (0, 2)
        if len(dims) < 3 or any(isinstance(dims[axis], int) for axis in axes):
            raise StageError(StageName.EXPORT, job, f"output {value.name} came out {dims}: a dynamic dim was fixed")


def _name_output_dims(model: ir.Model, signature: DecoderSignature) -> None:
    """Name the outputs' dims as the inputs': torch writes a present's length as a sum whose order
    follows its symbols' creation (``past_sequence + sequence`` or ``sequence + past_sequence``);
    it is the attention mask's ``total_sequence``."""
    presents = set(signature.present_names())
    for value in model.graph.outputs:
        dims = list(value.shape or [])
        if value.name == "logits":
            dims[:2] = [ir.SymbolicDim(BATCH), ir.SymbolicDim(SEQUENCE)]
        elif value.name in presents:
            dims[0], dims[2] = ir.SymbolicDim(BATCH), ir.SymbolicDim(TOTAL_SEQUENCE)
        value.shape = ir.Shape(dims)


def export_decoder(
    model: torch.nn.Module,
    signature: DecoderSignature,
    example_batch: int,
    example_sequence: int,
    path: Path,
    external_data_threshold_bytes: int,
    *,
    job: str,
    opset: int = DECODER_OPSET,
    ir_version: int | None = None,
    verify: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Export a causal LM with a KV cache to `path` (fp32, the dynamo exporter, unoptimised).

    Args:
        model: A float32 `transformers` causal LM (put in eval mode).
        signature: Its cache geometry, `DecoderSignature.from_config(model.config)`.
        example_batch: Rows of the trace's example (raised to 2 if smaller).
        example_sequence: New tokens of the trace's example (raised to 2, or past the batch).
        path: The .onnx file to write.
        external_data_threshold_bytes: Weight bytes above which they go to ``<path>.data``.
        job: The job's name, for errors.
        opset: ONNX opset of the graph (from 23 the attention and RMS norms export as single ops).
        ir_version: The file's IR version (None: the exporter's).
        verify: Called on the written file before it is moved into place (`pipeline.onnx_io.save_model`).

    Returns:
        What was written.

    Raises:
        JobError: The model is not one the export takes (`check_decoder_model`), or the signature
            does not match its outputs.
        StageError: The exporter failed, or fixed a dim that must be dynamic.
    """
    check_decoder_model(model, signature, job)
    clock = time.perf_counter()
    wrapper = DecoderWithCache(model, signature).eval()
    sizes = ExampleSizes.distinct(example_batch, example_sequence)
    example = example_inputs(signature, sizes)
    _check_geometry(wrapper, example, sizes, job)
    logger.info("exporting the decoder with a KV cache at %s", sizes)
    with export_kernels(model, opset, probe=lambda: wrapper(*example)) as kernels:
        onnx_model = _trace(wrapper, example, opset, job)
    _check_graph(onnx_model, signature, job)
    _name_output_dims(onnx_model, signature)
    if ir_version is not None:
        onnx_model.ir_version = ir_version
    exported, clock = time.perf_counter() - clock, time.perf_counter()
    external = save_model(onnx_model, path, external_data_threshold_bytes, verify=verify)
    return ExportResult(
        path=path,
        external_data=external,
        opset=onnx_model.opset_imports.get("", opset),
        inputs=signature.input_names(),
        outputs=signature.output_names(),
        example=sizes,
        kernels=kernels,
        seconds={"export": round(exported, 4), "save": round(time.perf_counter() - clock, 4)},
    )
