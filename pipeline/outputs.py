"""A model's outputs as a flat, named list: tensors, tuples, lists, dicts and nestings of them.

Names follow the structure, so they are stable across runs and documented:

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
