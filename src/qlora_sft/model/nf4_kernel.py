"""One Triton kernel that dequantizes a bitsandbytes NF4 weight, its double-quantized block scales
included: what bitsandbytes does in three kernels (the 8-bit block scales, their offset added, then
the 4-bit values), with the same float32 operations in the same order, so the same values bit for
bit (the fused LoRA layer checks that once per process against `bitsandbytes.functional.dequantize_4bit`
and falls back to bitsandbytes where they differ).

Why: every 4-bit weight is dequantized three times per decoder layer and micro batch (the forward,
its recompute, the backward), a fixed cost per micro batch whatever its tokens (at 8B about 28 ms
on a whole H200 and 0.19 s on 16 of its SMs, from the time per weight, 2026-12-04). One kernel
reads the packed bytes once and is one launch instead of three: 1.14-1.52x faster per weight,
1.005-1.010x end to end at 8B on an H200 (docs/benchmarks.md).

`QLORA_SFT_TRITON_DEQUANT=0` (a benchmark switch) keeps bitsandbytes' kernels. Used on CUDA
tensors where Triton is installed (it comes with PyTorch's CUDA builds); on the CPU only under
Triton's interpreter (`TRITON_INTERPRET=1`, the tests)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch

TRITON_DEQUANT_ENV = "QLORA_SFT_TRITON_DEQUANT"
BYTES_PER_PROGRAM = 1024  # packed bytes per program: 2,048 weights, 32 blocks of 64
tl: Any = None  # triton.language, once `_kernel` has imported it


def triton_dequant(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_TRITON_DEQUANT, checked (`launch.env_switch`): on unless set to 0."""
    from ..launch import env_switch

    return env_switch(TRITON_DEQUANT_ENV, env) is not False


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, or None where Triton cannot be imported (built on first use, so that
    TRITON_INTERPRET set by then applies). `tl` is made a module global: the interpreter replaces
    what the kernel's globals name."""
    global tl
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def nf4_dequant(
        packed,  # uint8, two 4-bit codes per byte, the first in the high nibble
        scales,  # uint8 (nested) or float32 (plain): one per block of BLOCKSIZE weights
        scales2,  # float32: one per BLOCKSIZE2 nested scales (nested only)
        code2,  # float32 x 256: the nested scales' 8-bit code (nested only)
        offset,  # float32 x 1: added to each nested scale (nested only)
        code,  # float32 x 16: the 4-bit code (NF4)
        out,
        n_out,
        BYTES: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        first = pid.to(tl.int64) * BYTES
        byte = first + tl.arange(0, BYTES)
        inside = byte * 2 < n_out
        b = tl.load(packed + byte, mask=inside, other=0).to(tl.int32)
        block = byte * 2 // BLOCKSIZE  # (even blocks: both weights of a byte share one)
        if NESTED:
            q = tl.load(scales + block, mask=inside, other=0).to(tl.int32)
            s = tl.load(code2 + q) * tl.load(scales2 + block // BLOCKSIZE2, mask=inside, other=0.0)
            s = s + tl.load(offset)
        else:
            s = tl.load(scales + block, mask=inside, other=0.0)
        high = tl.load(code + (b >> 4)) * s
        low = tl.load(code + (b & 15)) * s
        # tl.interleave(high, low) as Triton writes it (a join, then a reshape), with builtins only:
        # the interpreter runs those where Triton was imported before it was switched on
        values = tl.reshape(tl.join(high, low), (2 * BYTES,))
        at = first * 2 + tl.arange(0, 2 * BYTES)
        tl.store(out + at, values.to(out.dtype.element_ty), mask=at < n_out)

    return nf4_dequant


def usable(data: torch.Tensor, state: Any) -> bool:
    """Whether `dequantize_nf4` serves this weight: NF4 with even blocks, a Triton that imports,
    and a CUDA tensor (or the interpreter)."""
    if state.quant_type != "nf4" or state.blocksize % 2:
        return False
    if not (data.is_cuda or _interpreted()):
        return False
    return _kernel() is not None


def dequantize_nf4(data: torch.Tensor, state: Any) -> torch.Tensor:
    """The NF4 weight (`data`, `state`: bitsandbytes' packed bytes and quant state) in `state.dtype`
    and `state.shape`, as `bitsandbytes.functional.dequantize_4bit` computes it (callers check
    `usable` first)."""
    out = torch.empty(state.shape, dtype=state.dtype, device=data.device)
    n = out.numel()
    if state.nested:
        inner = state.state2
        scales, scales2, code2 = state.absmax, inner.absmax, inner.code
        offset = state.offset if torch.is_tensor(state.offset) else torch.tensor(float(state.offset))
        offset = offset.to(device=data.device, dtype=torch.float32).reshape(1)
        blocksize2 = inner.blocksize
    else:
        scales = state.absmax if state.absmax.dtype == torch.float32 else state.absmax.float()
        scales2 = code2 = offset = scales  # (not read)
        blocksize2 = 1
    code = state.code.to(device=data.device, dtype=torch.float32)
    packed = data.reshape(-1)
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage (bf16 under FSDP): the same bytes
        packed = packed.view(torch.uint8)
    grid = (-(-n // (2 * BYTES_PER_PROGRAM)),)
    _kernel()[grid](
        packed,
        scales,
        scales2,
        code2,
        offset,
        code,
        out.reshape(-1),
        n,
        BYTES=BYTES_PER_PROGRAM,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=blocksize2,
        NESTED=bool(state.nested),
        enable_fp_fusion=False,  # a scale times its code, then plus the offset: two roundings, as bitsandbytes
    )
    return out
