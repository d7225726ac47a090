"""A `transformers` causal LM from a local folder, for ``model.factory``: a decoder saved with
``save_pretrained`` (``config.json`` and safetensors weights) converts without a Python file of its
own::

    [model]
    factory = "pipeline.llm.pretrained:causal_lm"
    kwargs = { path = "/models/llama-1b" }
    task = "causal-lm"

Nothing is downloaded: the folder must hold the config and the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def causal_lm(path: str, attn_implementation: str = "eager") -> torch.nn.Module:
    """The causal LM saved in `path`, in float32 and eval mode.

    Args:
        path: A folder written by ``save_pretrained`` (relative paths are taken from the working
            directory).
        attn_implementation: ``transformers``' attention: "eager" (explicit MatMul + Softmax, the
            plainest graph) or "sdpa" (one attention function, decomposed by the exporter).

    Returns:
        The model (``use_cache`` on).

    Raises:
        FileNotFoundError: `path` has no ``config.json``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model there with save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.config.use_cache = True
    return model.eval()
