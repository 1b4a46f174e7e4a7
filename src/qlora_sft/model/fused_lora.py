"""`lora.fused`: a frozen 4-bit layer and its LoRA pair computed in one autograd function
(`FusedLoraMatmul`), given to peft's bitsandbytes LoRA layers by changing their class
(`fuse_lora_layers`): parameters, state dict, saving and merging stay peft's."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..launch import LaunchMode
from ..recipe import Recipe, fused_lora_obstacles

log = logging.getLogger("qlora_sft")

# QLORA_SFT_ABSMAX_CACHE=1 (a benchmark switch, off by default): each 4-bit weight's block scales
# dequantized once and kept (fp32, 4 bytes per 64 weights: +0.4 GiB for an 8B Llama) instead of
# once per use, which measures what bitsandbytes' nested dequantization costs the host
ABSMAX_CACHE_ENV = "QLORA_SFT_ABSMAX_CACHE"
# QLORA_SFT_DIRECT_DEQUANT=0 (a benchmark switch): bitsandbytes' public `dequantize_4bit` even where
# the host savings are on, which measures what the direct kernel calls alone change
DIRECT_DEQUANT_ENV = "QLORA_SFT_DIRECT_DEQUANT"
# read when the layers are fused (`fuse_lora_layers`), not per call: each call is host time
_ABSMAX_CACHE = False
_DIRECT = True  # bitsandbytes' CUDA kernels called without torch's op dispatch (`direct_dequant`)
_CHECKED = False  # the direct call compared once with bitsandbytes' dequantize_4bit


def direct_dequant(env: Mapping[str, str] | None = None) -> bool:
    """Whether `dequantized` calls bitsandbytes' CUDA kernels directly: with the host savings
    (QLORA_SFT_HOST_SAVINGS), unless QLORA_SFT_DIRECT_DEQUANT=0 (checked, `launch.env_switch`)."""
    from ..hostwork import host_savings_enabled
    from ..launch import env_switch

    return env_switch(DIRECT_DEQUANT_ENV, env) is not False and host_savings_enabled(env)


def absmax_cached(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_ABSMAX_CACHE, checked (`launch.env_switch`): 1 keeps the block scales, 0 or unset does not."""
    from ..launch import env_switch

    return env_switch(ABSMAX_CACHE_ENV, env) is True


@functools.cache
def _cuda_kernels() -> tuple[Any, Any] | None:
    """bitsandbytes' CUDA dequantization functions behind its `dequantize_blockwise` and
    `dequantize_4bit` ops (they fill a given output), or None where this bitsandbytes has no such
    functions (then its public `dequantize_4bit` serves)."""
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:  # no CUDA build of bitsandbytes, or another layout
        return None
    blockwise = getattr(ops, "_dequantize_blockwise_impl", None)
    four_bit = getattr(ops, "_dequantize_4bit_impl", None)
    return (blockwise, four_bit) if callable(blockwise) and callable(four_bit) else None


def _direct_kernels(data: torch.Tensor) -> tuple[Any, Any] | None:
    """The kernels `dequantized` calls directly for a weight's packed `data`, or None."""
    return _cuda_kernels() if _DIRECT and data.is_cuda else None


def _block_scales(state: Any, kernels: tuple[Any, Any] | None) -> torch.Tensor:
    """The fp32 scale of each block of a 4-bit weight: `state.absmax`, or where it is itself quantized
    (double quantization) its dequantized values plus the offset, as bitsandbytes computes them."""
    if not state.nested:
        return state.absmax
    cached = getattr(state, "_qlora_sft_absmax", None) if _ABSMAX_CACHE else None
    if cached is not None:
        return cached
    inner = state.state2
    if kernels is not None and inner.code.device == state.absmax.device:
        absmax = torch.empty(state.absmax.shape, dtype=inner.dtype, device=state.absmax.device)
        kernels[0](state.absmax, inner.absmax, inner.code, inner.blocksize, inner.dtype, absmax)
    else:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(state.absmax, inner)
    absmax += state.offset
    absmax = _as(absmax, torch.float32)
    if _ABSMAX_CACHE:
        state._qlora_sft_absmax = absmax
    return absmax


def dequantized(weight: Any) -> torch.Tensor:
    """The 4-bit `weight` (bitsandbytes' Params4bit) dequantized, the same values as
    `bitsandbytes.functional.dequantize_4bit` returns. On a GPU its CUDA kernels are called
    directly: through torch's op dispatch the two kernel calls of a double-quantized weight cost
    the host more than the rest of the layer's Python (host profile of 8B on an H200, 2026-12-03),
    and a weight is dequantized three times per layer per micro batch."""
    global _DIRECT, _CHECKED
    state, data = weight.quant_state, weight.data
    kernels = _direct_kernels(data)
    if kernels is None and not (_ABSMAX_CACHE and state.nested):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(data, state)
    if kernels is not None and not _CHECKED:  # once per process: the private functions still do the same
        from bitsandbytes.functional import dequantize_4bit

        try:
            same = torch.equal(_dequantized_with(weight, kernels), dequantize_4bit(data, state))
        except Exception as exc:  # another bitsandbytes: other arguments
            same, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "other values"
        _CHECKED = True
        if not same:
            _DIRECT = False
            log.warning(
                "fused LoRA layer: bitsandbytes' CUDA dequantization called directly gave %s than its "
                "dequantize_4bit; using dequantize_4bit (slower on the host)",
                why,
            )
            return dequantize_4bit(data, state)
    return _dequantized_with(weight, kernels)


def _dequantized_with(weight: Any, kernels: tuple[Any, Any] | None) -> torch.Tensor:
    state, data = weight.quant_state, weight.data
    absmax = _block_scales(state, kernels)
    if kernels is not None:
        out = torch.empty(state.shape, dtype=state.dtype, device=data.device)
        kernels[1](data, absmax, state.blocksize, state.quant_type, state.dtype, out)
    else:  # (bitsandbytes' CPU backend has no `.out` form)
        out = torch.ops.bitsandbytes.dequantize_4bit.default(
            data, absmax, state.blocksize, state.quant_type, state.shape, state.dtype
        )
    return out.t() if data.shape[0] == 1 else out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call where `t` has it already (the common case: a call per tensor
    per layer is host time on a GPU that waits for the host)."""
    return t if t.dtype == dtype else t.to(dtype)


class FusedLoraMatmul(torch.autograd.Function):
    """`x W^T + s (x A^T) B^T` for a frozen 4-bit W and a LoRA pair (A, B), s = alpha / r, with the
    LoRA term added into the base GEMM's output in place (`addmm_`, its scale an `alpha` of the
    GEMM) instead of peft's copy of the output, scaling and sum, each a pass over the output. The
    backward does the same: `g W + s (g B) A` into one buffer, and the adapter gradients from the
    rank-r products. Saved for the backward: x (which the layer's callers hold anyway) and x A^T
    (r columns). The matmuls run in the compute dtype; the adapter gradients are returned in the
    adapters' own dtype, as autocast returns them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Any, scaling: float) -> torch.Tensor:
        kind = x.device.type  # every dtype below is chosen here: autocast is off for the call
        if not torch.is_autocast_enabled(kind):
            return FusedLoraMatmul.compute(ctx, x, a, b, base, scaling)
        torch.set_autocast_enabled(kind, False)  # (torch.autocast(enabled=False) does this, with more Python)
        try:
            return FusedLoraMatmul.compute(ctx, x, a, b, base, scaling)
        finally:
            torch.set_autocast_enabled(kind, True)

    @staticmethod
    def compute(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Any, scaling: float) -> torch.Tensor:
        dtype = base.compute_dtype or x.dtype
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        a_c, b_c = _as(a, dtype), _as(b, dtype)
        xa = x2 @ a_c.t()
        out = x2 @ _as(dequantized(base.weight), dtype).t()
        out.addmm_(xa, b_c.t(), alpha=scaling)
        if base.bias is not None:
            out += _as(base.bias, dtype)
        ctx.save_for_backward(x2, xa, a_c, b_c)
        ctx.base, ctx.scaling, ctx.x_dtype, ctx.x_shape = base, scaling, x.dtype, x.shape
        ctx.w_dtypes = (a.dtype, b.dtype)
        return _as(out.reshape(*x.shape[:-1], out.shape[-1]), x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x2, xa, a_c, b_c = ctx.saved_tensors
        g = _as(grad.reshape(-1, grad.shape[-1]), x2.dtype)
        gxa = (g @ b_c).mul_(ctx.scaling)  # d/d(xA^T), r columns
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _as(dequantized(ctx.base.weight), x2.dtype)
            grad_x.addmm_(gxa, a_c)
            grad_x = _as(grad_x.reshape(ctx.x_shape), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = _as(gxa.t() @ x2, ctx.w_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = _as((g.t() @ xa).mul_(ctx.scaling), ctx.w_dtypes[1])
        return grad_x, grad_a, grad_b, None, None


@functools.cache
def fused_lora_class() -> type:
    """peft's LoRA layer for bitsandbytes 4-bit base layers, with `FusedLoraMatmul` as its forward
    wherever it applies (one plain LoRA adapter, active and unmerged, without dropout, and no extra
    arguments); everything else, and every other use of the layer, is peft's."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit

    class FusedLinear4bit(Linear4bit):
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            adapters = self.active_adapters
            name = adapters[0] if len(adapters) == 1 else None
            if (
                args
                or kwargs
                or name is None
                or self.disable_adapters
                or self.merged
                or name not in self.lora_A
                or name in getattr(self, "lora_variant", {})
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            ):
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            fix_4bit_weight_quant_state_from_module(base)  # as bitsandbytes' own forward does
            if getattr(base.weight.quant_state, "packing_format_for_cpu", False) or (
                base.bias is not None and base.bias.requires_grad
            ):  # repacked for bitsandbytes' CPU inference, or a trained bias (lora.bias): peft's
                return super().forward(x, *args, **kwargs)
            if base.compute_dtype is None:
                base.set_compute_type(x)
                base.compute_type_is_set = True
            return FusedLoraMatmul.apply(
                x, self.lora_A[name].weight, self.lora_B[name].weight, base, self.scaling[name]
            )

    return FusedLinear4bit


def fuse_lora_layers(model: Any) -> int:
    """Give every peft LoRA layer over a bitsandbytes 4-bit layer the fused forward (`lora.fused`);
    returns how many. Only the class changes: parameters, state dict, saving and merging stay peft's."""
    from peft.tuners.lora.bnb import Linear4bit

    global _ABSMAX_CACHE, _DIRECT
    _ABSMAX_CACHE, _DIRECT = absmax_cached(), direct_dequant()
    fused = fused_lora_class()
    count = 0
    for module in model.modules():
        if type(module) is Linear4bit:
            module.__class__ = fused
            count += 1
    return count


def uses_fused_lora(recipe: Recipe, mode: LaunchMode) -> bool:
    """`lora.fused`, resolved for this launch."""
    return recipe.lora.fused is not False and mode.layers_run_whole and not fused_lora_obstacles(recipe)
