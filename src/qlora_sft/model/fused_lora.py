"""`lora.fused`: a frozen 4-bit layer and its LoRA pair computed in one autograd function
(`FusedLoraMatmul`), given to peft's bitsandbytes LoRA layers by changing their class
(`fuse_lora_layers`): parameters, state dict, saving and merging stay peft's.

Sibling layers that read the same input (a decoder layer's q/k/v projections, its MLP's gate and
up projections) are computed together (`GroupedLoraMatmul`) when the first of them is called: one
autograd node, one product of the input with their stacked LoRA A matrices, one input gradient
summed in place in the backward. The others' calls with that same input tensor take their
outputs; any other call (another input, other arguments, no grad where the first had one)
computes alone, so a model that calls its projections otherwise gets the same values."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..launch import LaunchMode
from ..recipe import Recipe, fused_lora_obstacles
from . import nf4_kernel

log = logging.getLogger("qlora_sft")

# QLORA_SFT_ABSMAX_CACHE=1 (a benchmark switch, off by default): each double-quantized 4-bit
# weight's block scales dequantized at its first use and kept in place of their 8-bit form (its
# quant state made plain: fp32, 4 bytes per 64 weights, +0.3 GiB for an 8B Llama), so that each
# later dequantization is one kernel instead of three, the same values
ABSMAX_CACHE_ENV = "QLORA_SFT_ABSMAX_CACHE"
# QLORA_SFT_DIRECT_DEQUANT=0 (a benchmark switch): bitsandbytes' public `dequantize_4bit` even where
# the host savings are on, which measures what the direct kernel calls alone change
DIRECT_DEQUANT_ENV = "QLORA_SFT_DIRECT_DEQUANT"
# QLORA_SFT_GROUPED_LORA=0 (a benchmark switch): each projection computed alone, as before the groups
GROUPED_ENV = "QLORA_SFT_GROUPED_LORA"
# the sibling projections computed together (`GroupedLoraMatmul`), the first named leading: names
# as transformers' Llama, Mistral, Qwen2/3, Gemma and most decoder models call them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# read when the layers are fused (`fuse_lora_layers`), not per call: each call is host time
_ABSMAX_CACHE = False
_DIRECT = True  # bitsandbytes' CUDA kernels called without torch's op dispatch (`direct_dequant`)
_TRITON = True  # NF4 weights dequantized by one Triton kernel (`nf4_kernel`, QLORA_SFT_TRITON_DEQUANT)
_CHECKED = False  # the direct call compared once with bitsandbytes' dequantize_4bit
_TRITON_CHECKED = False  # the Triton kernel compared once with it


def direct_dequant(env: Mapping[str, str] | None = None) -> bool:
    """Whether `dequantized` calls bitsandbytes' CUDA kernels directly: with the host savings
    (QLORA_SFT_HOST_SAVINGS), unless QLORA_SFT_DIRECT_DEQUANT=0 (checked, `launch.env_switch`)."""
    from ..hostwork import host_savings_enabled
    from ..launch import env_switch

    return env_switch(DIRECT_DEQUANT_ENV, env) is not False and host_savings_enabled(env)


def grouped(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_GROUPED_LORA, checked (`launch.env_switch`): on unless set to 0."""
    from ..launch import env_switch

    return env_switch(GROUPED_ENV, env) is not False


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
    inner = state.state2
    if kernels is not None and inner.code.device == state.absmax.device:
        absmax = torch.empty(state.absmax.shape, dtype=inner.dtype, device=state.absmax.device)
        kernels[0](state.absmax, inner.absmax, inner.code, inner.blocksize, inner.dtype, absmax)
    else:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(state.absmax, inner)
    absmax += state.offset
    absmax = _as(absmax, torch.float32)
    if _ABSMAX_CACHE:  # the state made plain: bitsandbytes' own functions read the same scales
        state.absmax, state.nested, state.state2, state.offset = absmax, False, None, None
    return absmax


def dequantized(weight: Any) -> torch.Tensor:
    """The 4-bit `weight` (bitsandbytes' Params4bit) dequantized, the same values as
    `bitsandbytes.functional.dequantize_4bit` returns. On a GPU its CUDA kernels are called
    directly: through torch's op dispatch the two kernel calls of a double-quantized weight cost
    the host more than the rest of the layer's Python (host profile of 8B on an H200, 2026-12-03),
    and a weight is dequantized three times per layer per micro batch. An NF4 weight on a GPU is
    dequantized by one Triton kernel instead (`nf4_kernel`; QLORA_SFT_TRITON_DEQUANT=0: not)."""
    global _DIRECT, _TRITON, _CHECKED, _TRITON_CHECKED
    state, data = weight.quant_state, weight.data
    if _TRITON and nf4_kernel.usable(data, state):
        if _TRITON_CHECKED:
            return _dequantized_with(weight, None, triton=True)
        _TRITON_CHECKED = True  # once per process: still bitsandbytes' values
        out = _checked(weight, lambda: _dequantized_with(weight, None, triton=True), "the Triton kernel (nf4_kernel)")
        if out is not None:
            return out
        _TRITON = False  # (the direct kernels below keep their own check)
    kernels = _direct_kernels(data)
    if kernels is not None and not _CHECKED:
        _CHECKED = True  # once per process: the private functions still do the same
        what = "bitsandbytes' CUDA dequantization called directly"
        out = _checked(weight, lambda: _dequantized_with(weight, kernels), what)
        if out is not None:
            return out
        _DIRECT, kernels = False, None
    if kernels is None and not (_ABSMAX_CACHE and state.nested):  # (cached: made plain below)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(data, state)
    return _dequantized_with(weight, kernels)


def _checked(weight: Any, compute: Any, what: str) -> torch.Tensor | None:
    """`compute()` where it gives exactly `bitsandbytes.functional.dequantize_4bit`'s values for
    `weight`, else None, with a warning naming `what` and why (other values, or its exception)."""
    from bitsandbytes.functional import dequantize_4bit

    try:
        out = compute()
        same = torch.equal(out, dequantize_4bit(weight.data, weight.quant_state))
    except Exception as exc:  # another bitsandbytes or Triton: other arguments, a failed compile
        same, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "other values"
    if same:
        return out
    log.warning(
        "fused LoRA layer: %s gave %s than bitsandbytes' dequantize_4bit; using bitsandbytes' kernels instead",
        what,
        why,
    )
    return None


def _dequantized_with(weight: Any, kernels: tuple[Any, Any] | None = None, triton: bool = False) -> torch.Tensor:
    state, data = weight.quant_state, weight.data
    if triton:
        if _ABSMAX_CACHE and state.nested:  # (the state made plain once, as below)
            _block_scales(state, None)
        out = nf4_kernel.dequantize_nf4(data, state)
        return out.t() if data.shape[0] == 1 else out
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


def _autocast_off(compute: Any, kind: str, *args: Any) -> Any:
    """`compute(*args)` with autocast off on device `kind`: the fused functions choose every dtype
    themselves. (`torch.autocast(enabled=False)` does the same, with more Python per call.)"""
    if not torch.is_autocast_enabled(kind):
        return compute(*args)
    torch.set_autocast_enabled(kind, False)
    try:
        return compute(*args)
    finally:
        torch.set_autocast_enabled(kind, True)


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
        return _autocast_off(FusedLoraMatmul.compute, x.device.type, ctx, x, a, b, base, scaling)

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


class GroupedLoraMatmul(torch.autograd.Function):
    """`FusedLoraMatmul` for sibling layers that read the same input x: outputs
    `x W_i^T + s_i (x A_i^T) B_i^T`, one per layer, each its own tensor (as if computed alone).
    The rank-r products of all of them are one matmul with the stacked A's; the backward sums the
    input gradient of every layer into one buffer (`addmm_`) instead of autograd adding the
    layers' gradients, and the A gradients are one matmul. Each 4-bit weight is dequantized alone,
    used and freed, as in `FusedLoraMatmul`: no more memory at any moment than the layers alone.
    Called as `apply(x, bases, scalings, a_0, b_0, a_1, b_1, ...)`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bases: tuple[Any, ...], scalings: tuple[float, ...], *ab: torch.Tensor
    ) -> Any:
        return _autocast_off(GroupedLoraMatmul.compute, x.device.type, ctx, x, bases, scalings, ab)

    @staticmethod
    def compute(
        ctx: Any, x: torch.Tensor, bases: tuple[Any, ...], scalings: tuple[float, ...], ab: tuple[torch.Tensor, ...]
    ) -> Any:
        dtype = bases[0].compute_dtype or x.dtype
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        a_cat = _as(torch.cat(ab[0::2]), dtype)
        b_c = tuple(_as(b, dtype) for b in ab[1::2])
        xa = x2 @ a_cat.t()  # every layer's rank-r product, side by side
        outs, start = [], 0
        for base, b, scaling in zip(bases, b_c, scalings, strict=True):
            out = x2 @ _as(dequantized(base.weight), dtype).t()
            out.addmm_(xa[:, start : start + b.shape[1]], b.t(), alpha=scaling)
            if base.bias is not None:
                out += _as(base.bias, dtype)
            outs.append(_as(out.reshape(*x.shape[:-1], out.shape[-1]), x.dtype))
            start += b.shape[1]
        ctx.save_for_backward(x2, xa, a_cat, *b_c)
        ctx.bases, ctx.scalings, ctx.x_dtype, ctx.x_shape = bases, scalings, x.dtype, x.shape
        ctx.w_dtypes = tuple(t.dtype for t in ab)
        ctx.set_materialize_grads(False)  # an unused output: its adapters get no gradient, as alone
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        x2, xa, a_cat, *b_c = ctx.saved_tensors
        dtype, needs = x2.dtype, ctx.needs_input_grad
        gs = [None if g is None else _as(g.reshape(-1, g.shape[-1]), dtype) for g in grads]
        gxa = torch.empty(xa.shape, dtype=dtype, device=xa.device)  # d/d(x A^T), every layer's r columns
        spans, start = [], 0
        for g, b, scaling in zip(gs, b_c, ctx.scalings, strict=True):
            span = slice(start, start + b.shape[1])
            if g is None:
                gxa[:, span].zero_()
            else:  # (beta=0: the empty buffer's contents are not read)
                gxa[:, span].addmm_(g, b, beta=0, alpha=scaling)
            spans.append(span)
            start = span.stop
        grad_x = None
        if needs[0]:
            for g, base in zip(gs, ctx.bases, strict=True):
                if g is None:
                    continue
                w = _as(dequantized(base.weight), dtype)
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            grad_x = gxa @ a_cat if grad_x is None else grad_x.addmm_(gxa, a_cat)
            grad_x = _as(grad_x.reshape(ctx.x_shape), ctx.x_dtype)
        grad_ab: list[torch.Tensor | None] = [None] * (2 * len(b_c))
        grad_a_cat = gxa.t() @ x2 if any(needs[3::2]) else None
        for i, (g, span) in enumerate(zip(gs, spans, strict=True)):
            if needs[3 + 2 * i] and grad_a_cat is not None and g is not None:  # (a copy: no view of another's)
                grad_ab[2 * i] = grad_a_cat[span].to(ctx.w_dtypes[2 * i], copy=True)
            if needs[4 + 2 * i] and g is not None:
                grad_ab[2 * i + 1] = _as((g.t() @ xa[:, span]).mul_(ctx.scalings[i]), ctx.w_dtypes[2 * i + 1])
        return (grad_x, None, None, *grad_ab)


class LoraGroup:
    """Sibling fused layers of one module that read the same input (`GROUPS`). The first of them
    called with an input computes all of them (`GroupedLoraMatmul`) and keeps the others' outputs
    for their calls with that same tensor and the same grad mode; each output is handed out once,
    and nothing is kept once all are. A model that calls its siblings otherwise (another input for
    one of them, as cross-attention does, or one called twice) would waste kept outputs: at the
    first such call the group stops for good (`on`), the kept outputs are dropped, and each layer
    computes alone from then on (the same values, as before the groups)."""

    __slots__ = ("_grad", "_outputs", "_x", "members", "on")

    def __init__(self, members: tuple[Any, ...]) -> None:
        self.members = members
        self.on = True
        self._x: torch.Tensor | None = None
        self._grad = False
        self._outputs: dict[int, torch.Tensor] = {}

    def kept_output(self, member: Any, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output for input x kept from its group's computation (handed out once), or None."""
        if not self._outputs:
            return None
        out = self._outputs.pop(id(member), None) if self._x is x and self._grad == torch.is_grad_enabled() else None
        if out is None:  # kept outputs this model does not take: the group stops
            self.on = False
            log.debug("fused LoRA layers %s: called apart, each computed alone from now on", self.members)
            self._outputs.clear()
        if not self._outputs:
            self._x = None
        return out

    def output(self, member: Any, x: torch.Tensor, own: tuple[Any, ...]) -> torch.Tensor | None:
        """`member`'s output for input x computed now with the whole group, the others' kept for
        their calls; None where the group cannot compute together (then the caller computes
        `member` alone). `own` is `member`'s fused arguments (`FusedLinear4bit.fused_args`)."""
        if not self.on:
            return None
        args = [own if m is member else m.fused_args(x) for m in self.members]
        if any(a is None for a in args) or len({a[2].compute_dtype for a in args}) != 1:  # type: ignore[index]
            return None
        ab = [t for a in args for t in a[:2]]  # type: ignore[index]
        outs = GroupedLoraMatmul.apply(x, tuple(a[2] for a in args), tuple(a[3] for a in args), *ab)  # type: ignore[index]
        self._outputs = {id(m): o for m, o in zip(self.members, outs, strict=True) if m is not member}
        self._x, self._grad = x, torch.is_grad_enabled()
        return outs[self.members.index(member)]


@functools.cache
def fused_lora_class() -> type:
    """peft's LoRA layer for bitsandbytes 4-bit base layers, with `FusedLoraMatmul` as its forward
    wherever it applies (one plain LoRA adapter, active and unmerged, without dropout, and no extra
    arguments); everything else, and every other use of the layer, is peft's."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit

    class FusedLinear4bit(Linear4bit):
        def fused_args(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any, float] | None:
            """(A, B, base layer, scaling), `FusedLoraMatmul`'s arguments after x, where the fused
            computation applies to input x; else None (peft's forward)."""
            adapters = self.active_adapters
            name = adapters[0] if len(adapters) == 1 else None
            if (
                name is None
                or self.disable_adapters
                or self.merged
                or name not in self.lora_A
                or name in getattr(self, "lora_variant", {})
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            ):
                return None
            base = self.get_base_layer()
            fix_4bit_weight_quant_state_from_module(base)  # as bitsandbytes' own forward does
            if getattr(base.weight.quant_state, "packing_format_for_cpu", False) or (
                base.bias is not None and base.bias.requires_grad
            ):  # repacked for bitsandbytes' CPU inference, or a trained bias (lora.bias): peft's
                return None
            if base.compute_dtype is None:
                base.set_compute_type(x)
                base.compute_type_is_set = True
            return self.lora_A[name].weight, self.lora_B[name].weight, base, self.scaling[name]

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:
                return super().forward(x, *args, **kwargs)
            group = self.__dict__.get("_qlora_sft_group")
            out = None if group is None else group.kept_output(self, x)
            if out is not None:  # computed with the group's first layer, for this same x
                return out
            own = self.fused_args(x)
            if own is None:
                return super().forward(x, *args, **kwargs)
            out = None if group is None else group.output(self, x, own)
            return FusedLoraMatmul.apply(x, *own) if out is None else out

    return FusedLinear4bit


def fuse_lora_layers(model: Any) -> int:
    """Give every peft LoRA layer over a bitsandbytes 4-bit layer the fused forward (`lora.fused`),
    and group the siblings that read one input (`GROUPS`, unless QLORA_SFT_GROUPED_LORA=0); returns
    how many layers. Only the class changes, and a plain attribute (`_qlora_sft_group`) is set:
    parameters, state dict, saving and merging stay peft's."""
    from peft.tuners.lora.bnb import Linear4bit

    global _ABSMAX_CACHE, _DIRECT, _TRITON
    _ABSMAX_CACHE, _DIRECT, _TRITON = absmax_cached(), direct_dequant(), nf4_kernel.triton_dequant()
    fused = fused_lora_class()
    count = 0
    for module in model.modules():
        if type(module) is Linear4bit:
            module.__class__ = fused
            count += 1
    if grouped():
        group_siblings(model)
    return count


def group_siblings(model: Any) -> int:
    """Make each set of fused sibling layers named in `GROUPS` (all present, one input size) a
    `LoraGroup`; returns how many groups."""
    fused = fused_lora_class()
    count = 0
    for module in model.modules():
        for names in GROUPS:
            members = tuple(getattr(module, n, None) for n in names)
            if all(type(m) is fused for m in members) and len({m.in_features for m in members}) == 1:
                group = LoraGroup(members)
                for m in members:
                    m._qlora_sft_group = group
                count += 1
    return count


def uses_fused_lora(recipe: Recipe, mode: LaunchMode) -> bool:
    """`lora.fused`, resolved for this launch."""
    return recipe.lora.fused is not False and mode.layers_run_whole and not fused_lora_obstacles(recipe)
