"""A PyTorch model's inputs and outputs: feeds as positional tensors; outputs as a flat, named list
(tensors, tuples, lists, dicts and nestings of them).

Output names follow the structure, so they are stable across runs and documented:

- a single tensor is ``output``;
- a tuple or list at the top is ``output_0``, ``output_1``, ...;
- a dict gives its keys; nested containers join with ``.``: ``{"logits": t, "aux": (a, b)}``
  gives ``logits``, ``aux.0``, ``aux.1``, and ``((a, b), c)`` gives ``output_0.0``,
  ``output_0.1``, ``output_1``.

The order is the order torch.export flattens outputs in (pytree order: sequence order, dict
insertion order), which is the ONNX graph's output order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def named_outputs(value: object) -> list[tuple[str, torch.Tensor]]:
    """Flatten a model's output into (name, tensor) pairs in export order.

    Raises:
        TypeError: A leaf is not a tensor (None, a number, a custom object).
    """
    if isinstance(value, torch.Tensor):
        return [("output", value)]
    if isinstance(value, (list, tuple)):
        return [pair for index, item in enumerate(value) for pair in _walk(item, f"output_{index}")]
    return list(_walk(value, ""))


def flatten_outputs(value: object) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors, in export order."""
    return [tensor for _, tensor in named_outputs(value)]


def _walk(value: object, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{prefix}.{index}" if prefix else str(index))
    else:
        where = prefix or "the output"
        raise TypeError(f"{where} is a {type(value).__name__}; onnxforge exports tensors, tuples, lists and dicts")


def classifier_index(shapes: list[tuple[int, ...]]) -> int | None:
    """Index of the first output shaped ``[samples, classes]`` (the one top-1 accuracy reads), if any."""
    for index, shape in enumerate(shapes):
        if len(shape) == 2 and shape[1] > 1:
            return index
    return None


def torch_inputs(feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Feeds as the positional tensors ``forward`` takes (feeds are in input order)."""
    return tuple(torch.from_numpy(array) for array in feeds.values())


def run_torch(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a PyTorch model on one batch; its outputs as arrays, in export order."""
    with torch.inference_mode():
        outputs = flatten_outputs(model(*torch_inputs(feeds)))
    return [tensor.detach().cpu().numpy() for tensor in outputs]
