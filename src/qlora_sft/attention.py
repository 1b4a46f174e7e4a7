"""Variable-length attention for packed, padding-free batches.

With padding-free packing a micro batch is one row of several examples back to back, each with its own
positions (0, 1, ... per example). Attention must stay inside each example. transformers' `sdpa` path
does that by building a dense block-diagonal mask from the positions, which rules out SDPA's flash
kernel; `flash_attention_2` needs the flash-attn package. This module registers one more
implementation, `varlen`, that runs each example as its own causal sequence over the
`cu_seq_lens_q` boundaries TRL's padding-free collator already computes (on the CPU, so no
device-to-host sync per layer):

  * on CUDA: `torch.nn.attention.varlen.varlen_attn` (PyTorch's flash kernel, torch >= 2.10),
  * elsewhere (CPU tests): SDPA on each example in turn; the same boundaries, so the CPU tests
    check the logic that the GPU kernel runs on.

Batches with an attention mask (no packing) or a single sequence fall back to plain SDPA.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from typing import Any

import torch

log = logging.getLogger("qlora_sft")

NAME = "varlen"


@functools.cache
def varlen_kernel() -> Any:
    """torch's varlen flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_on_cuda() -> bool:
    return torch.cuda.is_available() and varlen_kernel() is not None


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`cu_seq_lens` and the longest example of a packed row, from per-example positions (a fallback
    for callers that pass positions only: it syncs with the device)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _is_packed(position_ids: torch.Tensor | None) -> bool:
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids.reshape(-1)[1:] == 0).any())


@functools.cache
def _parameters(kernel: Any) -> frozenset[str]:
    """The kernel's keyword names, read once (the kernel runs in every layer of every step)."""
    return frozenset(inspect.signature(kernel).parameters)


def _call_kernel(
    kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D), causal within each example. Adapts to the
    kernel's signature, which changed between torch releases (`is_causal` -> `window_size`, GQA)."""
    params = _parameters(kernel)
    kwargs: dict[str, Any] = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    default_scale = q.shape[-1] ** -0.5
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - default_scale) > 1e-12:
        q = q * (scale / default_scale)
    return kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _per_example_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same contract as the kernel, one example at a time (devices without the kernel)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    edges = cu.tolist()
    for s, e in itertools.pairwise(edges):
        if e <= s:
            continue
        seg = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scale
        )
        out[s:e] = seg.transpose(0, 1)
    return out


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B, Hq, T, D), key/value (B, Hkv, T, D) ->
    (B, T, Hq, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[0] != 1 or (cu is None and not _is_packed(position_ids)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if cu is None or max_len is None:
        cu, max_len = boundaries(position_ids)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    kernel = varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        cu = cu.to(device=q.device, dtype=torch.int32)
        if q.dtype not in (torch.float16, torch.bfloat16):
            # flash kernels take half precision only; a fp32 residual stream (model.upcast_frozen)
            # attends in the autocast dtype, as SDPA's flash path would
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            out = _call_kernel(kernel, q.to(half), k.to(half), v.to(half), cu, int(max_len), scale).to(q.dtype)
        else:
            out = _call_kernel(kernel, q, k, v, cu, int(max_len), scale)
    else:
        out = _per_example_sdpa(q, k, v, cu, scale)
    return out.unsqueeze(0), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for padding-free rows (the boundaries travel as cu_seq_lens); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("padding_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _varlen_mask)
    return NAME
