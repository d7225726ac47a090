"""What calibration text tells weight-only quantization: the inputs the MatMuls see.

One ONNX Runtime session of the float model, with the MatMuls' activation inputs added as
outputs, runs the calibration feeds (full decoder feeds, first step: empty past). For each
activation it gathers, over the real tokens (``attention_mask`` 1 where the feeds have one):

- the second moment of every input channel, ``E[x_k^2]`` (the activation-aware error proxy);
- for GPTQ, ``H = X^T X / tokens`` (the Hessian of the layer's output error), a few activations at
  a time so that their float64 [K, K] matrices stay within a memory budget (one pass over the
  feeds per group).

The session reads external data from the model's own folder: the graph is loaded without its
weights, so Python never holds them; ONNX Runtime's session holds one copy while it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.errors import StageError
from pipeline.onnx_io import load_graph_only
from pipeline.threads import session_options

logger = logging.getLogger(__name__)

# float64 Hessians gathered in one pass over the calibration feeds: at most half the model's
# float weights (with ONNX Runtime's copy of the weights, the pass then holds 1.5 times them),
# within these bounds. A 1 B Llama's four activations of one layer are 3 x 2048^2 + 8192^2
# doubles, 0.6 GiB: three layers a pass.
HESSIAN_BUDGET_SHARE = 0.5
HESSIAN_BUDGET_BOUNDS = (2**24, 2**32)


@dataclass(frozen=True)
class ActivationMoments:
    """Per-channel second moments of activations.

    Attributes:
        tokens: Tokens they were measured on (padding excluded).
        second_moments: Activation name to ``E[x_k^2]``, float64 [K].
    """

    tokens: int
    second_moments: dict[str, np.ndarray]


class ActivationReader:
    """Runs the float model with chosen intermediate tensors as extra outputs.

    Args:
        model_path: The float model (its external data stays where it is).
        activations: Tensor names to expose, with their ONNX element type.
        stage: Stage name for errors.
    """

    def __init__(self, model_path: Path, activations: Mapping[str, int], stage: str = "quantize") -> None:
        self._stage = stage
        proto = load_graph_only(model_path)
        present = {output.name for output in proto.graph.output}
        for name, element_type in activations.items():
            if name not in present:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, element_type, None))
        options = session_options()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
        data = proto.SerializeToString()
        del proto
        try:
            self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own types
            raise StageError(stage, "", f"cannot open {model_path.name} to calibrate weight-only: {e}") from e
        self._inputs = [item.name for item in self._session.get_inputs()]

    def batches(self, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        """For each feed, each named activation as [tokens, K] float64 (padding rows dropped)."""
        for feed in feeds:
            run_feeds = {name: feed[name] for name in self._inputs if name in feed}
            try:
                outputs = self._session.run(list(names), run_feeds)
            except Exception as e:
                raise StageError(self._stage, "", f"weight-only calibration run failed: {e}") from e
            mask = _token_mask(feed)
            yield [_rows(output, mask) for output in outputs]

    def moments(self, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> ActivationMoments:
        """Second moments of every named activation, in one pass."""
        sums = {name: np.zeros(0) for name in names}
        tokens = 0
        for rows in self.batches(names, feeds):
            tokens += rows[0].shape[0] if rows else 0
            for name, block in zip(names, rows, strict=True):
                squares = np.einsum("tk,tk->k", block, block)
                sums[name] = squares if sums[name].size == 0 else sums[name] + squares
        return ActivationMoments(tokens, {name: total / max(tokens, 1) for name, total in sums.items()})

    def hessians(
        self, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], int]:
        """``X^T X / tokens`` (float64 [K, K]) of every named activation, in one pass, and the tokens."""
        sums: dict[str, np.ndarray] = {}
        tokens = 0
        for rows in self.batches(names, feeds):
            tokens += rows[0].shape[0] if rows else 0
            for name, block in zip(names, rows, strict=True):
                single = block.astype(np.float32)
                product = (single.T @ single).astype(np.float64)
                if name in sums:
                    sums[name] += product
                else:
                    sums[name] = product
        for total in sums.values():
            total /= max(tokens, 1)
        return sums, tokens


def hessian_budget(weight_bytes: int) -> int:
    """Bytes of Hessians one calibration pass may gather for a model of `weight_bytes`."""
    low, high = HESSIAN_BUDGET_BOUNDS
    return int(min(max(HESSIAN_BUDGET_SHARE * weight_bytes, low), high))


def hessian_groups(widths: Mapping[str, int], budget_bytes: int) -> list[list[str]]:
    """Activations in groups whose float64 Hessians fit the budget together (one pass per group)."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, width in widths.items():
        size = 8 * width * width
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def _token_mask(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    mask = feed.get("attention_mask")
    ids = feed.get("input_ids")
    if mask is None or ids is None or mask.shape != ids.shape:
        return None  # with a past, the mask also covers past tokens: keep every row
    return mask.reshape(-1) > 0


def _rows(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    rows = np.asarray(output, dtype=np.float64).reshape(-1, output.shape[-1])
    if mask is not None and mask.shape[0] == rows.shape[0]:
        return rows[mask]
    return rows
