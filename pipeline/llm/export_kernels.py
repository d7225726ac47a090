"""What a decoder layer exports as at opset 23: attention as one ``Attention`` op and RMS norms as
``RMSNormalization``, instead of the dozens of plain ops `transformers`' eager code traces to.

torch.onnx writes ``aten.scaled_dot_product_attention`` as opset 23's ``Attention`` (grouped-query
heads included, ``enable_gqa``) and ``aten.rms_norm`` as ``RMSNormalization``. During the export
(`export_kernels`) the model's attention runs through `_cached_sdpa`, registered with
`transformers`' attention interface, and each RMS-norm module whose forward computes what
``torch.nn.functional.rms_norm`` does (checked on a probe input, module by module) runs through it;
both are restored afterwards, so PyTorch's references stay the model's own code and the export
parity check proves the swap. Its mask (`_causal_padding_mask`, registered with the mask interface
under the same name) is transformers' causal + padding mask built from two position ranges. Attention
features SDPA does not take (soft caps, attention sinks, position biases, sliding windows) make
`_cached_sdpa` refuse on a PyTorch probe step, and the model's own attention is then traced
(`KernelSwap.kept_because` says why).

`pipeline.llm.decoder_fusions` then folds each layer's rotary embedding and cache growth into the
``Attention`` node (in the simplify stage).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import first_line
from pipeline.llm.decoder_fusions import ATTENTION_OPSET

logger = logging.getLogger(__name__)

# The attention implementation's name in transformers' registries while a decoder is exported.
ATTENTION_NAME = "onnxforge_sdpa"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")
# The probe's agreement needed to run a module's norm as F.rms_norm (float32 rounding only).
_NORM_TOLERANCE = 1e-5


class UnsupportedAttention(RuntimeError):
    """The model's attention uses a feature the SDPA export does not carry (raised on the probe
    step and caught by `export_kernels`: it never leaves this module)."""


def _cached_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on SDPA with grouped-query heads (no repeat_kv)."""
    present = sorted(name for name in _UNSUPPORTED if kwargs.get(name) is not None)
    if present:
        raise UnsupportedAttention(f"{type(module).__name__} passes {', '.join(present)}")
    causal = attention_mask is None and query.shape[2] > 1 and (is_causal if is_causal is not None else True)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


def _causal_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' SDPA mask (``masking_utils.sdpa_mask``: True where a query may read a key) for
    the causal pattern with padding, as a comparison of two position ranges and a slice of the
    padding mask: a dozen ops a step where sdpa_mask's index broadcasting traces to some thirty
    (a GatherND of the padding mask among them). Any other pattern goes to sdpa_mask itself."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is not causal_mask_function or local_size is not None:
        pattern = mask_function or causal_mask_function
        return sdpa_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset,
            kv_offset,
            mask_function=pattern,
            attention_mask=attention_mask,
            local_size=local_size,
            **kwargs,
        )
    queries = torch.arange(q_length) + q_offset
    keys = torch.arange(kv_length) + kv_offset
    mask = keys[None, :] <= queries[:, None]  # [query, key]: SDPA and Attention broadcast it
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        mask = mask & padding[:, None, None, kv_offset : kv_offset + kv_length].bool()  # [batch, 1, query, key]
    return mask


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _cached_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, _causal_padding_mask)


def _rms_norm_forward(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    assert isinstance(weight, torch.Tensor)
    return F.rms_norm(hidden, (hidden.shape[-1],), weight, _epsilon(self))


def _epsilon(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _computes_rms_norm(module: torch.nn.Module) -> bool:
    """The module is an RMS norm with a [hidden] scale whose output matches F.rms_norm's on a probe."""
    weight = getattr(module, "weight", None)
    epsilon = _epsilon(module)
    if "RMSNorm" not in type(module).__name__ or not isinstance(weight, torch.Tensor) or epsilon is None:
        return False
    if weight.dim() != 1 or weight.dtype != torch.float32:
        return False
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        try:
            own = module(probe)
        except Exception:  # noqa: BLE001 - a norm that will not take [batch, sequence, hidden] is not swapped
            return False
        fused = F.rms_norm(probe, (weight.shape[0],), weight, epsilon)
    return (
        isinstance(own, torch.Tensor)
        and own.shape == fused.shape
        and bool(torch.allclose(own, fused, rtol=_NORM_TOLERANCE, atol=_NORM_TOLERANCE))
    )


@dataclass(frozen=True)
class KernelSwap:
    """What ran swapped while the decoder was traced.

    Attributes:
        attention: The attention ran as SDPA (an ``Attention`` op in the graph).
        norms: RMS-norm modules that ran as F.rms_norm (``RMSNormalization`` ops).
        kept_because: Why the model's own attention was kept ("" when swapped).
    """

    attention: bool = False
    norms: int = 0
    kept_because: str = ""

    def describe(self) -> str:
        """One line for the export record."""
        attention = "attention as one Attention op" if self.attention else f"own attention ({self.kept_because})"
        return f"{attention}; {self.norms} RMS norms as RMSNormalization"


@contextlib.contextmanager
def export_kernels(model: torch.nn.Module, opset: int, probe: Callable[[], object]) -> Iterator[KernelSwap]:
    """Run `model`'s attention as SDPA and its RMS norms as F.rms_norm while the block runs, at
    opset >= 23 (below, nothing changes), and restore them after it.

    Args:
        model: A `transformers` causal LM.
        opset: The export's opset.
        probe: One PyTorch step of the model, run once swapped: if its attention passes a feature
            SDPA does not take, or fails on SDPA, the attention is restored before the block runs.

    Yields:
        What is swapped.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    set_attention = getattr(model, "set_attn_implementation", None)
    if opset < ATTENTION_OPSET or previous is None or set_attention is None:
        reason = (
            f"opset {opset} < {ATTENTION_OPSET}" if opset < ATTENTION_OPSET else "no transformers attention interface"
        )
        yield KernelSwap(kept_because=reason)
        return
    _register()
    norms = [module for module in model.modules() if _computes_rms_norm(module)]
    for module in norms:
        module.forward = types.MethodType(_rms_norm_forward, module)  # type: ignore[method-assign]
    swap = KernelSwap(attention=True, norms=len(norms))
    try:
        try:
            set_attention(ATTENTION_NAME)
            with torch.inference_mode():
                probe()
        except UnsupportedAttention as e:
            set_attention(previous)
            swap = KernelSwap(norms=len(norms), kept_because=str(e))
            logger.info("decoder export: the model's own attention kept (%s)", e)
        except Exception as e:  # noqa: BLE001 - it runs with its own attention (checked before): keep that
            set_attention(previous)
            swap = KernelSwap(norms=len(norms), kept_because=f"SDPA failed on it: {first_line(e)}")
            logger.warning("decoder export: the model's own attention kept (SDPA failed: %s)", e)
        yield swap
    finally:
        for module in norms:
            del module.forward
        set_attention(previous)
