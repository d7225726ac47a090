"""The peer side of ``benchmarks/llm.py``: onnxruntime-genai's model builder and runtime, and what both
sides' files are made of.

- `save_hf_folder`: a `transformers` causal LM and a tokenizer as the local Hugging Face folder the
  builder reads (it loads a tokenizer unconditionally, ``AutoTokenizer.from_pretrained``, and has no
  option to skip it; ``config_only`` is the opposite: config and tokenizer files without a model).
- `build_genai`: ``python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p int4 -e cpu``, its
  defaults untouched (`PEER_SETTINGS`), in a child process (the builder is a script that puts its
  own folder on ``sys.path``).
- `RuntimeDecoder`: onnxruntime-genai's runtime (``og.Model`` / ``og.Generator``) behind onnxforge's
  `pipeline.llm.generate.Decoder` protocol, so greedy decoding, agreement and perplexity run through
  onnxforge's own code; `runtime_runs` times it the way its users call it (``generate_next_token``).
- `model_bytes` and `op_types`: a model's size with its external data, and its op types as written
  and after ONNX Runtime's graph optimisations (what really runs).
"""

from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

BUILDER = "onnxruntime_genai.models.builder"

PEER_SETTINGS = "RTN (MLAS), symmetric, block 32, accuracy level 4, LM head int4, embeddings fp32, QKV fused"
"""What the builder does by default for ``-p int4 -e cpu`` (onnxruntime-genai 0.18,
``quantization/quant_config.py`` and ``builders/base.py``): ``block_size`` 32, ``is_symmetric`` true,
``accuracy_level`` 4 on the CPU EP, ``op_types_to_quantize`` MatMul only (the LM head is a MatMul and
``nodes_to_exclude`` is empty, so it is int4; the embedding Gather stays float unless the model ties
it to the LM head), ``algo_config`` "default" (``DefaultWeightOnlyQuantConfig``: MLAS
round-to-nearest, the kernel onnxforge's ``rtn`` calls too), fp32 inputs and outputs."""

PEER_WEIGHT_ONLY: dict[str, object] = {
    "bits": 4,
    "block_size": 32,
    "symmetric": True,
    "method": "rtn",
    "lm_head": True,
    "embeddings": False,
    "accuracy_level": 4,
    "format": "matmulnbits",
}
"""onnxforge's ``[quantize.weight_only]`` matching `PEER_SETTINGS` (mixed precision off)."""


def save_hf_folder(model: Any, tokenizer: Any, folder: Path) -> Path:
    """Save `model` and a tokenizer as a Hugging Face folder (config, safetensors, tokenizer files).

    Args:
        model: A `transformers` causal LM.
        tokenizer: A ``tokenizers.Tokenizer`` (wrapped as a fast tokenizer, end-of-text token id 0 as
            beginning, end and padding where the vocabulary has one).
        folder: Where to write.
    """
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    special = tokenizer.id_to_token(0)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special
    )
    wrapped.save_pretrained(folder)
    return folder


def numbered_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose tokens are ``t0`` ... ``t{vocab-1}``: only for the builder (it wants
    one) beside a model with random weights; nothing is tokenized with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def build_genai(hf_folder: Path, out: Path, precision: str = "int4") -> Path:
    """Run the model builder on a local folder for the CPU EP with its defaults.

    Args:
        hf_folder: The Hugging Face folder (`save_hf_folder`).
        out: The builder's output folder (``model.onnx``, ``model.onnx.data``, ``genai_config.json``).
        precision: The builder's ``-p``.

    Returns:
        The ONNX model's path.

    Raises:
        RuntimeError: The builder failed (its log is named).
    """
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", BUILDER, "-i", str(hf_folder), "-o", str(out), "-p", precision, "-e", "cpu",
               "-c", str(out.parent / "builder_cache")]  # fmt: skip
    log = out / "builder.log"
    logger.info("builder: %s (log %s)", " ".join(command[1:]), log)
    with log.open("w") as handle:
        finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"the model builder failed with exit code {finished.returncode}: see {log}")
    return out / "model.onnx"


def model_bytes(path: Path) -> int:
    """The model's size on disk: the graph file and every external-data file its tensors name."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def op_types(path: Path, optimized: bool) -> collections.Counter[str]:
    """Node count per op type: as written, or after ONNX Runtime's graph optimisations on the CPU EP
    (level "all", the sessions' default: ORT's own fusions included)."""
    if not optimized:
        return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory(prefix="onnxforge-llm-opt-") as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return collections.Counter(node.op_type for node in graph.node)


class RuntimeDecoder:
    """onnxruntime-genai's runtime as a `pipeline.llm.generate.Decoder`, one sequence at batch 1.

    Tokens are appended with ``append_tokens`` and the next token is onnxforge's argmax of the raw
    logits (``get_logits``), so it decodes exactly as `OnnxDecoder` does; `runtime_runs` times the
    runtime's own greedy loop instead.

    Args:
        folder: The builder's output folder (``genai_config.json``).
        max_length: The longest sequence a generator holds (the KV buffer the runtime allocates).
        threads: Intra-op threads of the runtime's ONNX Runtime session.
    """

    def __init__(self, folder: Path, max_length: int, threads: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(folder))
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        config.overlay(json.dumps(overlay))
        self._model = og.Model(config)
        self.max_length = max_length
        self.generator = self.new_generator(max_length)
        self._length = 0

    def new_generator(self, max_length: int) -> Any:
        """A greedy generator (top-k 1, no sampling) whose end-of-sequence token never ends a run
        (``min_length`` = ``max_length``), so every timed run takes the same number of steps."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False, top_k=1)
        return self._og.Generator(self._model, params)

    def _last(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits(), dtype=np.float32)[0, -1].copy()

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Start a new sequence with `prompt`; the next token's logits."""
        ids = np.asarray(prompt, dtype=np.int32).reshape(-1)
        self.generator.rewind_to(0)
        self.generator.append_tokens(ids)
        self._length = len(ids)
        return self._last()

    def step(self, token: int) -> np.ndarray:
        """Append one token; the next token's logits."""
        self.generator.append_tokens(np.array([token], dtype=np.int32))
        self._length += 1
        return self._last()

    def rewind(self, length: int) -> None:
        """Keep the sequence's first `length` tokens."""
        self.generator.rewind_to(length)
        self._length = length

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [tokens, vocab] of a whole sequence: a fresh generator fed one token at a time (the
        runtime returns the last position's logits only); the current sequence is left as it was."""
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1)
        generator = self.new_generator(len(ids) + 1)
        rows = []
        for token in ids:
            generator.append_tokens(np.array([token], dtype=np.int32))
            rows.append(np.asarray(generator.get_logits(), dtype=np.float32)[0, -1].copy())
        return np.stack(rows)


def runtime_runs(
    decoder: RuntimeDecoder, prompt: np.ndarray, new_tokens: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The runtime's prefill and decode as its users run them, for timing.

    Returns:
        (prefill, decode): prefill rewinds to nothing and appends the prompt (time to first token);
        decode rewinds to the prompt, appends its first greedy token and calls ``generate_next_token``
        `new_tokens` times: `new_tokens` model runs (the first call only selects from the logits
        ``append_tokens`` computed), each with the runtime's own greedy search.
    """
    ids = np.asarray(prompt, dtype=np.int32).reshape(-1)
    first = np.array([int(np.argmax(decoder.prefill(ids)))], dtype=np.int32)
    if len(ids) + new_tokens + 2 > decoder.max_length:
        raise ValueError(f"a generator of {decoder.max_length} tokens cannot hold {len(ids)} + {new_tokens}")
    generator = decoder.generator

    def prefill() -> None:
        generator.rewind_to(0)
        generator.append_tokens(ids)

    def decode() -> None:
        generator.rewind_to(len(ids))
        generator.append_tokens(first)
        for _ in range(new_tokens):
            generator.generate_next_token()

    return prefill, decode
