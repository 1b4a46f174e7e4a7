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

Batches with an attention mask (no packing), several rows, or a single sequence go to transformers'
SDPA path, which builds the block-diagonal mask from the positions itself. Packed rows that the
kernel cannot take (attention dropout in training, value heads narrower than query heads as in
DeepSeek's MLA) run per example. Softcapping, sliding windows and attention sinks are refused: they
need `eager`/`sdpa`/`flex_attention`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any

import torch

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
    """The kernel exists and the GPU runs flash attention (Ampere, sm80, or newer)."""
    if not torch.cuda.is_available() or varlen_kernel() is None:
        return False
    return torch.cuda.get_device_capability() >= (8, 0) and torch.backends.cuda.is_flash_attention_available()


def half_dtype() -> torch.dtype:
    """The half precision flash kernels run in: autocast's, else bf16 where supported, else fp16."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


UNSUPPORTED = ("softcap", "sliding_window", "s_aux")


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


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, Hkv, D) -> (T, Hkv x groups, D): each KV head serves `groups` query heads (GQA)."""
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


@functools.cache
def _parameters(kernel: Any) -> frozenset[str]:
    """The kernel's keyword names, read once (the kernel runs in every layer of every step)."""
    return frozenset(inspect.signature(kernel).parameters)


def _causal(params: frozenset[str]) -> dict[str, Any]:
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


@functools.cache
def _takes_fewer_kv_heads(kernel: Any, device: str) -> bool:
    """Whether a kernel without `enable_gqa` computes GQA from K/V with fewer heads as they are
    (torch 2.11's passes them to the flash kernel, which does), so they need not be repeated (one
    copy of K and V per query head, 128 MiB per layer for an 8B Llama at 8192 tokens, and the
    sum over the copies in the backward). Checked once per device, at the first call (on the rank's
    own GPU), against repeated K/V: the output and the gradients of q, k and v."""
    try:
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=g).to(torch.bfloat16).requires_grad_(True)

        q, k, v, w = rand(24, 4, 64), rand(24, 2, 64), rand(24, 2, 64), rand(24, 4, 64)
        cu = torch.tensor([0, 9, 24], dtype=torch.int32, device=device)
        kwargs = _causal(_parameters(kernel))
        # its own autograd, outside any checkpointing of the forward that may call it first
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            results = []
            for kk, vv in ((k, v), _repeat_kv(k, v, 2)):
                out = kernel(q, kk, vv, cu, cu, 15, 15, **kwargs)
                results.append([out, *torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))])
        return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(*results, strict=True))
    except Exception:  # any refusal or difference means: repeat them
        return False


def _call_kernel(
    kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D), causal within each example. Adapts to the
    kernel's signature, which changed between torch releases (`is_causal` -> `window_size`, GQA)."""
    params = _parameters(kernel)
    kwargs = _causal(params)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif not (q.is_cuda and _takes_fewer_kv_heads(kernel, str(q.device))):
            k, v = _repeat_kv(k, v, groups)
    default_scale = q.shape[-1] ** -0.5
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - default_scale) > 1e-12:
        q = q * (scale / default_scale)
    return kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _per_example_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """The same contract as the kernel, one example at a time (devices without the kernel, and
    what the kernel cannot do: attention dropout, value heads of another size)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = _repeat_kv(k, v, groups)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    edges = cu.tolist()
    for s, e in itertools.pairwise(edges):
        if e <= s:
            continue
        seg = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k[s:e].transpose(0, 1),
            v[s:e].transpose(0, 1),
            is_causal=True,
            scale=scale,
            dropout_p=dropout,
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

    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(
            f"attn_implementation 'varlen' does not implement {', '.join(unsupported)} "
            f"({type(module).__name__}); use model.attn_implementation: sdpa (or eager / flex_attention)"
        )
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[0] != 1 or (cu is None and not _is_packed(position_ids)):
        # (several rows: _varlen_mask gave SDPA the block-diagonal mask from the positions)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            "attn_implementation 'varlen' got a packed row on top of a KV cache without an attention "
            "mask; pass attention_mask (generate() does) or use sdpa"
        )
    if cu is None or max_len is None:
        cu, max_len = boundaries(position_ids)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    dropout = dropout if module.training else 0.0
    kernel = varlen_kernel() if q.is_cuda and not dropout and v.shape[-1] == q.shape[-1] else None
    if kernel is not None:
        cu = cu.to(device=q.device, dtype=torch.int32)
        if q.dtype not in (torch.float16, torch.bfloat16):
            # flash kernels take half precision only; a fp32 residual stream (model.upcast_frozen)
            # attends in the autocast dtype, as SDPA's flash path would
            half = half_dtype()
            out = _call_kernel(kernel, q.to(half), k.to(half), v.to(half), cu, int(max_len), scale).to(q.dtype)
        else:
            out = _call_kernel(kernel, q, k, v, cu, int(max_len), scale)
    else:
        out = _per_example_sdpa(q, k, v, cu, scale, dropout)
    return out.unsqueeze(0), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for one padding-free row (the boundaries travel as cu_seq_lens); SDPA's mask
    otherwise, which for several packed rows is block-diagonal from the positions."""
    from transformers.masking_utils import sdpa_mask

    one_row = kwargs.get("batch_size", 1) == 1
    if one_row and kwargs.get("attention_mask") is None and kwargs.get("padding_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _varlen_mask)
    return NAME
